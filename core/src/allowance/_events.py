"""Events to observers and webhooks: never on the call path, never raising into it."""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.request
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from allowance.typing import Event

__all__ = ["WebhookSender", "call_safely", "event_payload", "webhooks"]

logger = logging.getLogger("allowance")


def call_safely(func: Callable[[Event], object], event: Event, *, what: str) -> None:
    """Call an observer; log and drop its exception (observers never break a call)."""
    try:
        func(event)
    except Exception:
        logger.exception("allowance: %s failed on event %r; ignored", what, event.kind)


def event_payload(event: Event) -> dict[str, Any]:
    """Return a JSON-ready dict of an event."""
    return {
        "kind": event.kind,
        "budget": event.budget,
        "scope": dict(event.scope),
        "data": {k: v for k, v in event.data.items() if _jsonable(v)},
    }


def _jsonable(value: object) -> bool:
    return isinstance(value, str | int | float | bool | type(None) | list | dict)


class WebhookSender:
    """POSTs events as JSON from one daemon thread, through a bounded queue.

    A full queue drops the event (logged); a failed POST is logged. Neither ever
    reaches the LLM call that caused the event.
    """

    def __init__(self, *, maxsize: int = 1000, timeout: float = 5.0) -> None:
        """Create the sender; its thread starts on the first event."""
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize)
        self._timeout = timeout
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def send(self, url: str, event: Event) -> None:
        """Queue ``event`` for ``url``; returns at once."""
        body = json.dumps(event_payload(event), default=str).encode()
        try:
            self._queue.put_nowait((url, body))
        except queue.Full:
            self.dropped += 1
            logger.error(  # noqa: TRY400 - no traceback to show
                "allowance: webhook queue full; event %r dropped", event.kind
            )
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="allowance-webhook", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._post(*item)
            finally:
                self._queue.task_done()

    def _post(self, url: str, body: bytes) -> None:
        request = urllib.request.Request(  # noqa: S310 - the URL scheme is checked by Threshold
            url, data=body, headers={"content-type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                response.read()
            self.sent += 1
        except Exception as err:  # noqa: BLE001 - a webhook failure is logged, never raised
            self.failed += 1
            logger.warning("allowance: webhook POST to %s failed: %s", url, err)


webhooks = WebhookSender()
