"""Events to observers and webhooks: never on the call path, never raising into it.

Webhooks are POSTed as JSON from one daemon thread through a bounded queue:
``send`` returns at once, a full queue drops the event (logged), each POST has a
timeout, and a failed POST (connection error, 408, 425, 429 or 5xx) is retried
with exponential backoff and jitter; a redirect is not followed (a failed
POST). Each POST carries ``X-Allowance-Event-Id`` (the same on every retry, so
a receiver can drop duplicates) and, with a secret, ``X-Allowance-Timestamp``
and ``X-Allowance-Signature: sha256=<hex>``, the HMAC-SHA256 of
``"<timestamp>.<body>"``: check it with ``verify_signature``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from allowance._errors import ConfigurationError
from allowance._exit import at_exit

if TYPE_CHECKING:
    import urllib.request
    from collections.abc import Callable, Mapping

    from allowance.typing import Event

__all__ = [
    "WebhookSender",
    "call_safely",
    "check_webhook_url",
    "event_payload",
    "sign",
    "verify_signature",
    "webhooks",
]

logger = logging.getLogger("allowance")

SECRET_ENV = "ALLOWANCE_WEBHOOK_SECRET"  # noqa: S105 - a variable name
SIGNATURE_HEADER = "X-Allowance-Signature"
TIMESTAMP_HEADER = "X-Allowance-Timestamp"
EVENT_ID_HEADER = "X-Allowance-Event-Id"
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_RETRY_STATUS = {408, 425, 429}
_SERVER_ERROR = 500
_REDIRECT = range(300, 400)
_EXIT_FLUSH = 2.0  # seconds the process's exit waits for queued events


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


def check_webhook_url(url: object, *, allow_http: bool = False) -> str:
    """Return ``url`` if a webhook may be sent there, else raise.

    ``https://`` always; ``http://`` to the loopback, or anywhere with
    ``allow_http=True``.

    Raises:
        ConfigurationError: Not an http(s) URL, or plain http to another host
            without ``allow_http``.
    """
    from urllib.parse import urlsplit  # noqa: PLC0415 - only webhooks parse URLs

    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigurationError("webhook threshold to", url, "an https:// URL")
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConfigurationError("webhook threshold to", url, "a URL with a host")
    if parts.scheme == "http" and not allow_http and parts.hostname not in _LOOPBACK:
        raise ConfigurationError(
            "webhook threshold to",
            url,
            "an https:// URL (plain http:// only to localhost, "
            "or with Threshold(..., allow_http=True))",
        )
    return url


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Return the signature header value: ``sha256=<hex HMAC of "<ts>.<body>">``."""
    import hashlib  # noqa: PLC0415 - loaded only when used
    import hmac  # noqa: PLC0415 - loaded only when used

    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    body: bytes,
    timestamp: str,
    signature: str,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """Check a webhook's signature and that its timestamp is recent.

    Args:
        secret: The shared secret.
        body: The raw request body, as received.
        timestamp: The ``X-Allowance-Timestamp`` header.
        signature: The ``X-Allowance-Signature`` header.
        tolerance: The most seconds the timestamp may be off (replays).
        now: The current time (tests).
    """
    import hmac  # noqa: PLC0415 - loaded only when used

    try:
        sent = float(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class _Delivery:
    __slots__ = ("body", "event_id", "secret", "url")

    def __init__(
        self, url: str, body: bytes, event_id: str, secret: str | None
    ) -> None:
        self.url = url
        self.body = body
        self.event_id = event_id
        self.secret = secret


class WebhookSender:
    """POSTs events as JSON from one daemon thread, through a bounded queue.

    A full queue drops the event (logged); a failed POST is retried
    ``retries`` times with exponential backoff (``backoff * 2**n`` seconds, with
    jitter, at most ``max_backoff``), then logged. Nothing ever reaches the
    LLM call that caused the event.

    Args:
        maxsize: The most events waiting to be sent.
        timeout: Seconds for one POST (connect and read).
        retries: Extra attempts after a failed POST.
        backoff: The first retry's delay, in seconds.
        max_backoff: The longest delay between attempts.
    """

    def __init__(
        self,
        *,
        maxsize: int = 1000,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        """Create the sender; its thread starts on the first event."""
        self._queue: queue.Queue[_Delivery | None] = queue.Queue(maxsize)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.retried = 0
        _senders.add(self)

    def send(
        self,
        url: str,
        event: Event,
        *,
        secret: str | None = None,
        allow_http: bool = False,
    ) -> None:
        """Queue ``event`` for ``url``; returns at once, never raises."""
        try:
            check_webhook_url(url, allow_http=allow_http)
            body = json.dumps(event_payload(event), default=str).encode()
            delivery = _Delivery(
                url, body, os.urandom(16).hex(), secret or os.environ.get(SECRET_ENV)
            )
            self._queue.put_nowait(delivery)
        except queue.Full:
            self.dropped += 1
            logger.error(  # noqa: TRY400 - no traceback to show
                "allowance: webhook queue full; event %r dropped", event.kind
            )
            return
        except Exception:
            self.dropped += 1
            logger.exception("allowance: webhook event %r not sent", event.kind)
            return
        self._start()

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, name="allowance-webhook", daemon=True
                )
                thread.start()
                self._thread = thread

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event is sent or given up; True if done in time."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _start_fresh(self) -> None:
        # A forked child has the parent's queue (the parent sends those) and
        # lock, but not its thread: it starts its own on its first event.
        self._queue = queue.Queue(self._queue.maxsize)
        self._lock = threading.Lock()
        self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._deliver(item)
            except Exception:
                logger.exception("allowance: webhook delivery failed")
            finally:
                self._queue.task_done()

    def _deliver(self, item: _Delivery) -> None:
        import random  # noqa: PLC0415 - loaded on the sender's thread

        for attempt in range(self.retries + 1):
            retry, reason = self._post(item)
            if not retry:
                return
            if attempt == self.retries:
                break
            self.retried += 1
            delay = min(self.max_backoff, self.backoff * 2**attempt)
            time.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter
        self.failed += 1
        logger.warning(
            "allowance: webhook POST to %s failed after %d attempts: %s",
            item.url,
            self.retries + 1,
            reason,
        )

    def _post(self, item: _Delivery) -> tuple[bool, str]:
        """POST once; return (retry?, why it failed)."""
        import urllib.error  # noqa: PLC0415 - loaded only when used
        import urllib.request  # noqa: PLC0415 - loaded only when used

        headers: Mapping[str, str] = {
            "content-type": "application/json",
            "user-agent": "allowance-webhook",
            EVENT_ID_HEADER: item.event_id,
        }
        if item.secret:
            stamp = str(int(time.time()))
            headers = {
                **headers,
                TIMESTAMP_HEADER: stamp,
                SIGNATURE_HEADER: sign(item.secret, stamp, item.body),
            }
        request = urllib.request.Request(  # noqa: S310 - http(s) checked on send
            item.url, data=item.body, headers=dict(headers), method="POST"
        )
        try:
            with _no_redirects().open(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as err:
            err.close()
            retry = err.code in _RETRY_STATUS or err.code >= _SERVER_ERROR
            if not retry:
                self.failed += 1
                moved = err.headers.get("location") if err.code in _REDIRECT else None
                logger.warning(
                    "allowance: webhook POST to %s refused: HTTP %d%s",
                    item.url,
                    err.code,
                    f" (redirect to {moved}, not followed)" if moved else "",
                )
            return retry, f"HTTP {err.code}"
        except (OSError, ValueError) as err:
            return True, str(err)
        self.sent += 1
        return False, ""


@functools.cache
def _no_redirects() -> urllib.request.OpenerDirector:
    """Return an opener that raises a redirect as an ``HTTPError``.

    urllib follows a 301, 302 or 303 as a GET without the body (the event is
    lost), sending the signature to a URL ``check_webhook_url`` never saw.
    """
    import urllib.request  # noqa: PLC0415 - loaded only when used

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *_: object) -> None:
            return None

    return urllib.request.build_opener(NoRedirect)


_senders: weakref.WeakSet[WebhookSender] = weakref.WeakSet()


def _flush_at_exit() -> None:
    """Send the queued events before the process ends; say what is lost."""
    for sender in list(_senders):
        if sender._thread is not None and not sender.flush(_EXIT_FLUSH):  # noqa: SLF001 - this module's own
            logger.error(
                "allowance: %d webhook events not sent before exit; they are lost",
                sender._queue.unfinished_tasks,  # noqa: SLF001 - idem
            )


def _forget_in_child() -> None:
    for sender in list(_senders):
        sender._start_fresh()  # noqa: SLF001 - the class's own fork hook


# Last in a forked multiprocessing child (as atexit, which runs it after the
# guards' and ledgers' exit hooks, registered later): those send no events.
at_exit(_flush_at_exit, priority=-1)
os.register_at_fork(after_in_child=_forget_in_child)
webhooks = WebhookSender()
