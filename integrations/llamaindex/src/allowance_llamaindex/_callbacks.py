"""The legacy ``CallbackManager`` handler: the path that blocks non-patched LLMs.

llama-index-core's instrumentation dispatcher swallows every exception its
handlers raise, so it can attribute but never refuse a call. Its older
``CallbackManager`` does not: ``llm_chat_callback``/``llm_completion_callback``
call ``on_event_start(CBEventType.LLM)`` just before the LLM's request, and an
exception raised there reaches the caller. For an LLM class whose SDK
``allowance`` does not patch (Gemini, Bedrock, Ollama, a ``CustomLLM``...), the
span handler in ``_instrument`` marks the call as pending and adds this handler
to the LLM's callback manager; this handler then reserves the worst case
(``guard.begin``: ``BudgetExceeded`` blocks the call before it is sent) and
settles the ticket with the usage the response reports (an error: released
only when the provider did no work, ``provider_did_no_work``; else the worst
case is kept).
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.callbacks.base_handler import BaseCallbackHandler

import allowance
from allowance.integration import estimate_chat, provider_did_no_work, whole_count

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["AllowanceCallbackHandler", "Pending", "pending", "usage_of"]


NAME = "llamaindex"


@dataclass(eq=False)
class Pending:
    """A model call through a non-patched LLM class, seen by the span handler."""

    guard: allowance.Guard
    provider: str
    model: str
    max_tokens: int | None
    ticket: allowance.Ticket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: bool = True
    """False once its span is over, in every context still holding it."""


pending: contextvars.ContextVar[Pending | None] = contextvars.ContextVar(
    "allowance_llamaindex_pending", default=None
)
"""Set by the span handler around a non-patched LLM's call, read here."""


def _messages(payload: Mapping[str, Any]) -> list[dict[str, Any] | str]:
    messages = payload.get(EventPayload.MESSAGES)
    if messages is not None:
        out: list[dict[str, Any] | str] = []
        for message in messages:
            role = getattr(message, "role", "user")
            out.append(
                {
                    "role": str(getattr(role, "value", role)),
                    "content": str(getattr(message, "content", "") or ""),
                }
            )
        return out
    prompt = payload.get(EventPayload.PROMPT)
    return [str(prompt or "")]


def _from_mapping(data: Mapping[str, Any]) -> allowance.Usage | None:
    """Return the usage ``data`` reports; None for none, or one not readable.

    A missing input or output count is not zero (``whole_count``).
    """
    for inp, out in (
        ("prompt_tokens", "completion_tokens"),
        ("input_tokens", "output_tokens"),
    ):
        if inp in data or out in data:
            inputs, outputs = whole_count(data.get(inp)), whole_count(data.get(out))
            if inputs is None or outputs is None:
                return None
            return allowance.Usage(input_tokens=inputs, output_tokens=outputs)
    return None


def usage_of(response: object) -> allowance.Usage | None:
    """Return the usage a LlamaIndex ``ChatResponse``/``CompletionResponse`` reports.

    Looks at ``response.raw`` (``usage`` of the provider's object or dict) and
    at ``response.additional_kwargs`` (``prompt_tokens``/``completion_tokens``,
    where llama-index's own integrations put them). None when neither says.
    """
    raw = getattr(response, "raw", None)
    usage = raw.get("usage") if isinstance(raw, dict) else getattr(raw, "usage", None)
    if usage is not None:
        data = usage if isinstance(usage, dict) else getattr(usage, "__dict__", {})
        found = _from_mapping(data)
        if found is not None:
            return found
    extra = getattr(response, "additional_kwargs", None)
    if isinstance(extra, dict):
        return _from_mapping(extra)
    return None


class AllowanceCallbackHandler(BaseCallbackHandler):
    """Reserve before a non-patched LLM's call (raising blocks it), settle after."""

    def __init__(self) -> None:
        """Listen to LLM events only."""
        others: list[CBEventType] = [t for t in CBEventType if t is not CBEventType.LLM]
        super().__init__(event_starts_to_ignore=others, event_ends_to_ignore=others)
        self._tickets: dict[str, Pending] = {}
        self._lock = threading.Lock()

    def on_event_start(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        parent_id: str = "",  # noqa: ARG002 - the callback signature
        **kwargs: Any,  # noqa: ARG002
    ) -> str:
        """Reserve the call's worst case; ``BudgetExceeded`` blocks it here.

        Raises:
            BudgetExceeded: The call fits no budget (``on_limit="raise"``, or
                ``"stop"``: no synthetic response can be returned from here).
        """
        call = pending.get()
        if event_type is not CBEventType.LLM or call is None or not call.live:
            return event_id
        with call.lock:
            if call.ticket is not None and not call.ticket.settled:  # nested
                return event_id
            estimate = estimate_chat(
                call.provider,
                call.model,
                _messages(payload or {}),
                max_output_tokens=call.max_tokens,
            )
            ticket = call.guard.begin(estimate, adapters=(NAME,))
            if ticket.stopped:
                ticket.release(outcome="stopped")
                raise allowance.BudgetExceeded(ticket.violations, model=call.model)
            call.ticket = ticket
        with self._lock:
            self._tickets[event_id] = call
        return event_id

    def on_event_end(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        **kwargs: Any,  # noqa: ARG002 - the callback signature
    ) -> None:
        """Charge the usage the response reports, or keep the reservation."""
        if event_type is not CBEventType.LLM:
            return
        with self._lock:
            call = self._tickets.pop(event_id, None)
        ticket = None if call is None else call.ticket
        if ticket is None or ticket.settled:
            return
        payload = payload or {}
        error = payload.get(EventPayload.EXCEPTION)
        if isinstance(error, GeneratorExit):
            # A stream the consumer dropped: what it produced is unknown here,
            # so the reservation (its worst case) is charged.
            ticket.keep(outcome="partial")
            return
        if error is not None:
            if provider_did_no_work(error):
                ticket.release()  # an HTTP error status, or never connected
            else:
                # A timeout, a dropped connection, an error not read: the
                # provider may have billed. Never charged nothing.
                ticket.keep(outcome="error")
            return
        response = payload.get(
            EventPayload.RESPONSE, payload.get(EventPayload.COMPLETION)
        )
        usage = usage_of(response)
        if usage is None:
            ticket.keep()
        else:
            ticket.commit(usage)

    def start_trace(self, trace_id: str | None = None) -> None:
        """Nothing to do: traces are not budgeted."""

    def end_trace(
        self,
        trace_id: str | None = None,
        trace_map: dict[str, list[str]] | None = None,
    ) -> None:
        """Nothing to do: traces are not budgeted."""
