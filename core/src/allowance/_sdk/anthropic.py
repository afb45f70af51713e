"""Anthropic SDK (0.73+ and 2.x): codec, adapter and plugin hooks.

Endpoint charged: ``/v1/messages`` (beta included: its ``?beta=true`` query is
ignored). ``/v1/messages/count_tokens``, batches and models pass through.
Anthropic's ``input_tokens`` excludes cache reads and writes; they are added
back so ``Usage.input_tokens`` counts every input token.
"""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING, Any, Final

from allowance._estimate import (
    MESSAGE_TOKENS,
    make_estimate,
    make_usage,
    messages_input_bound,
    output_cap,
    plain_estimate,
    plain_tokens,
    text_bytes,
    whole_count,
)
from allowance._sdk._adapter import SdkAdapter
from allowance._sdk._common import NO_CAP, CappedAccumulator
from allowance.plugins import hookimpl

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from allowance._sdk._common import SdkBinding
    from allowance.typing import Adapter, Estimate, ProviderCodec, Usage

__all__ = ["AnthropicAdapter", "AnthropicCodec"]


def _usage(usage: Any) -> Usage | None:
    # None when the input or output count is not a count (``whole_count``):
    # charged as a missing usage. The cache counts are ints, never bools:
    # anything else (absent, null) counts 0.
    uncached = getattr(usage, "input_tokens", None)
    output = getattr(usage, "output_tokens", None)
    if type(uncached) is not int or type(output) is not int:
        uncached, output = whole_count(uncached), whole_count(output)
        if uncached is None or output is None:
            return None
    cache_read = getattr(usage, "cache_read_input_tokens", 0)
    if type(cache_read) is not int:
        cache_read = 0
    cache_write = getattr(usage, "cache_creation_input_tokens", 0)
    if type(cache_write) is not int:
        cache_write = 0
    return make_usage(
        uncached + cache_read + cache_write, output, cache_read, cache_write
    )


class AnthropicCodec:
    """Reads and writes Anthropic's Messages wire format."""

    name = "anthropic"

    def is_billable(self, path: str) -> bool:
        """Return True for ``/v1/messages`` only."""
        return path.rstrip("/").endswith("/messages")

    def estimate(self, path: str, body: Mapping[str, Any]) -> Estimate:
        """Bound the input and take ``max_tokens`` of a request."""
        del path  # one billable endpoint
        model = body.get("model")
        if type(model) is not str:
            model = str(model or "")
        plain = plain_estimate("anthropic", model, body, MESSAGE_TOKENS)
        if plain is not None:  # the commonest body, in one small function
            return plain
        return make_estimate(
            "anthropic",
            model,
            messages_input_bound(body),
            output_cap("anthropic", model, body),
        )

    def plain(self, path: str, body: Mapping[str, Any]) -> tuple[str, int, int] | None:
        """``(model, input bound, output cap)`` of the commonest body, or None.

        What ``estimate`` returns for it, without building the ``Estimate``:
        the SDK layer's express lane.
        """
        del path  # one billable endpoint
        model = body.get("model")
        if type(model) is not str:
            return None
        plain = plain_tokens(model, body, MESSAGE_TOKENS)
        return None if plain is None else (model, plain[0], plain[1])

    def with_model(self, body: Mapping[str, Any], model: str) -> dict[str, Any]:
        """Return a copy of ``body`` asking for ``model``."""
        return {**body, "model": model}

    def refine(
        self, path: str, body: Mapping[str, Any], estimate: Estimate
    ) -> Estimate | None:
        """Anthropic has no local tokenizer for current models: the bound stands."""
        del path, body, estimate
        return None

    def usage(self, path: str, response: Any) -> Usage | None:
        """Read usage from a parsed Message (or BetaMessage)."""
        del path  # one billable endpoint
        usage = getattr(response, "usage", None)
        return None if usage is None else _usage(usage)

    def response_model(self, response: Any) -> str | None:
        """Return the model that answered."""
        model = getattr(response, "model", None)
        return model if isinstance(model, str) else None

    def stream_accumulator(
        self, path: str, *, hide_usage_only: bool
    ) -> _MessagesAccumulator:
        """Return an accumulator for a messages stream."""
        del path, hide_usage_only  # no usage-only events to hide in these streams
        return _MessagesAccumulator()

    def synthetic_body(
        self, path: str, body: Mapping[str, Any], *, reason: str, call_id: str
    ) -> dict[str, Any]:
        """Return an empty, marked Message for ``on_limit="stop"``."""
        del path  # one billable endpoint
        return {
            "id": f"msg_allowance-stop-{call_id}",
            "type": "message",
            "role": "assistant",
            "model": str(body.get("model") or ""),
            # One empty text block: ``message.content[0].text`` and the stream
            # helper's ``get_final_text()`` read "" (as OpenAI's stop reads "").
            "content": [{"type": "text", "text": ""}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
            "allowance": {"stopped": True, "reason": reason},
        }

    def synthetic_sse(
        self, path: str, body: Mapping[str, Any], *, reason: str, call_id: str
    ) -> bytes:
        """Return an empty, marked message stream for ``on_limit="stop"``."""
        message = self.synthetic_body(path, body, reason=reason, call_id=call_id)
        events = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {**message, "content": [], "stop_reason": None},
                },
            ),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 0},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return b"".join(
            f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            for name, data in events
        )


_USAGE_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


def _take(fields: dict[str, int], usage: Any) -> None:
    # message_delta usage is cumulative: overwrite the fields it carries.
    for name in _USAGE_FIELDS:
        value = whole_count(getattr(usage, name, None))
        if value is not None:
            fields[name] = value


class _MessagesAccumulator(CappedAccumulator):
    """``message_start`` carries input usage, ``message_delta`` the cumulative usage."""

    __slots__ = ("_bytes", "_fields", "_model", "ended")

    def __init__(self) -> None:
        self.enough = NO_CAP
        self._fields: dict[str, int] = {}
        self._model: str | None = None
        self._bytes = 0
        # The output count is final once ``message_delta`` carried it; until
        # then it is ``message_start``'s 1: a stream the server closed before
        # is charged what it produced (``_StreamTracker.finish``).
        self.ended = False

    def observe(self, event: Any) -> bool:  # noqa: C901 - one call per event, inline
        kind = getattr(event, "type", "")
        if kind == "content_block_delta":
            if self._bytes < self.enough:
                delta: Any = getattr(event, "delta", None)
                try:  # a text delta: plain attribute reads (a getattr is a call)
                    text = delta.text if delta.type == "text_delta" else None
                except AttributeError:
                    text = None
                if not text:  # the first of these the delta sets
                    text = (
                        getattr(delta, "text", None)
                        or getattr(delta, "partial_json", None)
                        or getattr(delta, "thinking", None)
                    )
                if isinstance(text, str):
                    self._bytes += len(text) if text.isascii() else text_bytes(text)
        elif kind == "message_start":
            message = getattr(event, "message", None)
            model = getattr(message, "model", None)
            if isinstance(model, str):
                self._model = model
            usage = getattr(message, "usage", None)
            if usage is not None:
                _take(self._fields, usage)
        elif kind == "message_delta":
            usage = getattr(event, "usage", None)
            if usage is not None:
                _take(self._fields, usage)
                self.ended = True
        return True

    def usage(self) -> Usage | None:
        f = self._fields
        if "input_tokens" not in f or "output_tokens" not in f:
            return None  # not a usage that can be read: charged as none
        cache_read = f.get("cache_read_input_tokens", 0)
        cache_write = f.get("cache_creation_input_tokens", 0)
        return make_usage(
            f.get("input_tokens", 0) + cache_read + cache_write,
            f.get("output_tokens", 0),
            cache_read,
            cache_write,
        )

    def produced_text_bytes(self) -> int:
        return self._bytes

    def response_model(self) -> str | None:
        return self._model


def _optional_types(module: str, *names: str) -> tuple[type[Any], ...]:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return ()
    return tuple(getattr(mod, name) for name in names if hasattr(mod, name))


def _binding() -> SdkBinding:
    import anthropic  # noqa: PLC0415 - only when the adapter is used

    from allowance._sdk._common import SdkBinding  # noqa: PLC0415

    return SdkBinding(
        name="anthropic",
        codec=CODEC,
        stream_types=(anthropic.Stream,),
        async_stream_types=(anthropic.AsyncStream,),
        raw_types=_optional_types("anthropic._legacy_response", "LegacyAPIResponse"),
        lazy_types=_optional_types("anthropic._response", "APIResponse"),
        async_lazy_types=_optional_types("anthropic._response", "AsyncAPIResponse"),
        provider_of=lambda _client: "anthropic",
        wants_stream_usage=lambda _path: False,
        plain=CODEC.plain,
    )


class AnthropicAdapter(SdkAdapter):
    """Guards every Anthropic client, including ones built before ``patch()``."""

    name = "anthropic"
    requires = ("anthropic>=0.73,<3",)
    module = "anthropic"
    base_module = "anthropic._base_client"

    def binding(self) -> SdkBinding:
        """Return the Anthropic binding (imports anthropic)."""
        return _binding()


CODEC = AnthropicCodec()
ADAPTER = AnthropicAdapter()


@hookimpl
def allowance_adapters() -> Sequence[Adapter]:
    """Register the Anthropic adapter."""
    return [ADAPTER]


@hookimpl
def allowance_providers() -> Sequence[ProviderCodec]:
    """Register the Anthropic codec."""
    return [CODEC]
