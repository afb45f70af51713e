"""OpenAI SDK (2.x and 3.x): codec, adapter and plugin hooks.

Endpoints charged: ``/chat/completions``, ``/responses``, ``/embeddings``.
Everything else (models, files, ``/responses/input_tokens``, ...) passes
through. Chat streams get ``stream_options.include_usage`` added when the caller
did not ask for it, and the extra usage-only chunk is then hidden from them.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from allowance._estimate import (
    chat_input_bound,
    exact_input_tokens,
    output_cap,
    responses_input_bound,
    text_bytes,
    token_count,
)
from allowance._sdk._adapter import SdkAdapter
from allowance.plugins import hookimpl
from allowance.typing import Estimate, Usage

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from allowance._sdk._common import SdkBinding
    from allowance.typing import Adapter, ProviderCodec

__all__ = ["OpenAIAdapter", "OpenAICodec"]

_CHAT = "chat"
_RESPONSES = "responses"
_EMBEDDINGS = "embeddings"


@lru_cache(maxsize=64)
def _api(path: str) -> str | None:
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return _CHAT
    if path.endswith("/responses"):
        return _RESPONSES
    if path.endswith("/embeddings"):
        return _EMBEDDINGS
    return None


def _embedding_bound(body: Mapping[str, Any]) -> int:
    value = body.get("input")
    items = value if isinstance(value, list) else [value]
    total = 0
    for item in items:
        if isinstance(item, str):
            total += len(item) if item.isascii() else len(item.encode())
        elif isinstance(item, list):
            total += len(item)  # a list of token ids
        elif item is not None:
            total += len(json.dumps(item, default=str))
    return max(total, 1)


def _embedding_count(body: Mapping[str, Any]) -> int:
    value = body.get("input")
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


class OpenAICodec:
    """Reads and writes the Chat Completions, Responses and Embeddings formats."""

    name = "openai"

    def is_billable(self, path: str) -> bool:
        """Return True for the generation and embedding endpoints."""
        return _api(path) is not None

    def estimate(self, path: str, body: Mapping[str, Any]) -> Estimate:
        """Bound the input and take the output cap of a request."""
        model = str(body.get("model") or "")
        api = _api(path)
        if api == _CHAT:
            return Estimate(
                "openai",
                model,
                chat_input_bound(body),
                output_cap("openai", model, body),
            )
        if api == _RESPONSES:
            return Estimate(
                "openai",
                model,
                responses_input_bound(body),
                output_cap("openai", model, body),
            )
        return Estimate("openai", model, _embedding_bound(body), 0)

    def with_model(self, body: Mapping[str, Any], model: str) -> dict[str, Any]:
        """Return a copy of ``body`` asking for ``model``."""
        return {**body, "model": model}

    def refine(
        self, path: str, body: Mapping[str, Any], estimate: Estimate
    ) -> Estimate | None:
        """Count the input with tiktoken when its encoding is cached locally."""
        if _api(path) == _EMBEDDINGS:
            return None
        exact = exact_input_tokens("openai", estimate.model, body)
        if exact is None:
            return None
        return replace(estimate, input_tokens=exact, exact_input=True)

    def usage(self, path: str, response: Any) -> Usage | None:
        """Read usage from a parsed ChatCompletion, Response or embeddings list."""
        usage = getattr(response, "usage", None)
        if usage is None:
            return None
        if _api(path) == _RESPONSES:
            return _responses_usage(usage)
        return _chat_usage(usage)

    def response_model(self, response: Any) -> str | None:
        """Return the model that answered."""
        model = getattr(response, "model", None)
        return model if isinstance(model, str) else None

    def stream_accumulator(
        self, path: str, *, hide_usage_only: bool
    ) -> _ChatAccumulator | _ResponsesAccumulator:
        """Return an accumulator for a chat or responses stream."""
        if _api(path) == _RESPONSES:
            return _ResponsesAccumulator()
        return _ChatAccumulator(hide_usage_only=hide_usage_only)

    def synthetic_body(
        self, path: str, body: Mapping[str, Any], *, reason: str, call_id: str
    ) -> dict[str, Any]:
        """Return an empty, marked response for ``on_limit="stop"``."""
        model = str(body.get("model") or "")
        ident = f"allowance-stop-{call_id}"
        if _api(path) == _RESPONSES:
            return _stopped_response(ident, model, reason)
        if _api(path) == _EMBEDDINGS:
            # One empty vector per input: the SDK rejects a response without data.
            empty: str | list[float] = (
                "" if body.get("encoding_format") == "base64" else []
            )
            return {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": empty}
                    for i in range(_embedding_count(body))
                ],
                "model": model,
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
                "allowance": {"stopped": True, "reason": reason},
            }
        return {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "allowance-stop",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "", "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "allowance": {"stopped": True, "reason": reason},
        }

    def synthetic_sse(
        self, path: str, body: Mapping[str, Any], *, reason: str, call_id: str
    ) -> bytes:
        """Return an empty, marked stream for ``on_limit="stop"``."""
        model = str(body.get("model") or "")
        ident = f"allowance-stop-{call_id}"
        if _api(path) == _RESPONSES:
            response = _stopped_response(ident, model, reason)
            events = [
                (
                    "response.created",
                    {
                        "type": "response.created",
                        "sequence_number": 0,
                        "response": {**response, "status": "in_progress"},
                    },
                ),
                (
                    "response.completed",
                    {
                        "type": "response.completed",
                        "sequence_number": 1,
                        "response": response,
                    },
                ),
            ]
            return b"".join(
                f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                for name, data in events
            )
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "allowance-stop",
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "allowance": {"stopped": True, "reason": reason},
        }
        return f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()


def _stopped_response(ident: str, model: str, reason: str) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [],
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
        "metadata": {"allowance_stopped": "true", "allowance_reason": reason[:512]},
        "usage": {
            "input_tokens": 0,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 0,
        },
    }


def _read_usage(usage: Any, prefix: str, output: str) -> Usage:
    """Read a usage object of either API: their fields differ only by name."""
    inputs = getattr(usage, f"{prefix}_tokens_details", None)
    outputs = getattr(usage, f"{output}_tokens_details", None)
    return Usage(
        input_tokens=token_count(getattr(usage, f"{prefix}_tokens", 0)),
        output_tokens=token_count(getattr(usage, f"{output}_tokens", 0)),
        cache_read_tokens=token_count(getattr(inputs, "cached_tokens", 0)),
        cache_write_tokens=token_count(getattr(inputs, "cache_write_tokens", 0)),
        reasoning_tokens=token_count(getattr(outputs, "reasoning_tokens", 0)),
    )


def _chat_usage(usage: Any) -> Usage:
    return _read_usage(usage, "prompt", "completion")


def _responses_usage(usage: Any) -> Usage:
    return _read_usage(usage, "input", "output")


class _ChatAccumulator:
    """Usage of a chat stream: the last chunk carries it when include_usage is on."""

    __slots__ = ("_bytes", "_hide", "_model", "_usage")

    def __init__(self, *, hide_usage_only: bool) -> None:
        self._hide = hide_usage_only
        self._usage: Usage | None = None
        self._model: str | None = None
        self._bytes = 0

    def observe(self, event: Any) -> bool:
        if self._model is None:
            self._model = getattr(event, "model", None)
        choices = getattr(event, "choices", None)
        if choices:
            for choice in choices:
                delta = getattr(choice, "delta", None)
                if delta is None:
                    continue
                # Once per chunk: the common case (a text delta) inline.
                content = getattr(delta, "content", None)
                if isinstance(content, str):
                    self._bytes += (
                        len(content) if content.isascii() else len(content.encode())
                    )
                tool_calls = getattr(delta, "tool_calls", None)
                if tool_calls:
                    for tool_call in tool_calls:
                        function = getattr(tool_call, "function", None)
                        arguments = getattr(function, "arguments", None)
                        self._bytes += text_bytes(arguments)
        usage = getattr(event, "usage", None)
        if usage is not None:
            self._usage = _chat_usage(usage)
            if self._hide and not choices:
                return False
        return True

    def usage(self) -> Usage | None:
        return self._usage

    def produced_text_bytes(self) -> int:
        return self._bytes

    def response_model(self) -> str | None:
        return self._model


class _ResponsesAccumulator:
    """Usage of a Responses stream: ``response.completed`` carries it."""

    __slots__ = ("_bytes", "_model", "_usage")

    def __init__(self) -> None:
        self._usage: Usage | None = None
        self._model: str | None = None
        self._bytes = 0

    def observe(self, event: Any) -> bool:
        kind = getattr(event, "type", "")
        if kind.endswith(".delta"):
            self._bytes += text_bytes(getattr(event, "delta", None))
            return True
        response = getattr(event, "response", None)
        if response is not None:
            model = getattr(response, "model", None)
            if isinstance(model, str):
                self._model = model
            usage = getattr(response, "usage", None)
            if usage is not None:
                self._usage = _responses_usage(usage)
        return True

    def usage(self) -> Usage | None:
        return self._usage

    def produced_text_bytes(self) -> int:
        return self._bytes

    def response_model(self) -> str | None:
        return self._model


def _binding() -> SdkBinding:
    import openai  # noqa: PLC0415 - only when the adapter is used
    from openai import _legacy_response, _response  # noqa: PLC0415

    from allowance._sdk._common import SdkBinding  # noqa: PLC0415

    def provider_of(client: Any) -> str:
        return (
            "azure"
            if isinstance(client, openai.AzureOpenAI | openai.AsyncAzureOpenAI)
            else "openai"
        )

    return SdkBinding(
        name="openai",
        codec=CODEC,
        stream_types=(openai.Stream,),
        async_stream_types=(openai.AsyncStream,),
        raw_types=(_legacy_response.LegacyAPIResponse,),
        lazy_types=(_response.APIResponse,),
        async_lazy_types=(_response.AsyncAPIResponse,),
        release_errors=(openai.APIStatusError, openai.APIConnectionError),
        keep_errors=(openai.APITimeoutError,),
        provider_of=provider_of,
        wants_stream_usage=lambda path: _api(path) == _CHAT,
    )


class OpenAIAdapter(SdkAdapter):
    """Guards every OpenAI client, including ones built before ``patch()``."""

    name = "openai"
    requires = ("openai>=2.30,<4",)
    module = "openai"
    base_module = "openai._base_client"

    def binding(self) -> SdkBinding:
        """Return the OpenAI binding (imports openai)."""
        return _binding()


CODEC = OpenAICodec()
ADAPTER = OpenAIAdapter()


@hookimpl
def allowance_adapters() -> Sequence[Adapter]:
    """Register the OpenAI adapter."""
    return [ADAPTER]


@hookimpl
def allowance_providers() -> Sequence[ProviderCodec]:
    """Register the OpenAI codec."""
    return [CODEC]
