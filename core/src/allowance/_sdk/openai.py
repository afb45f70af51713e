"""OpenAI SDK (2.x and 3.x): codec, adapter and plugin hooks.

Endpoints charged: ``/chat/completions``, ``/responses``, ``/embeddings``,
the legacy ``/completions`` and ``/responses/compact``. Everything else
(models, files, ``/responses/input_tokens``, ...) passes through. Chat and
completions streams get ``stream_options.include_usage`` added when the caller
did not ask for it, and the extra usage-only chunk is then hidden from them.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

from allowance._estimate import (
    chat_input_bound,
    completions_input_bound,
    completions_output_cap,
    default_output_cap,
    exact_input_tokens,
    make_estimate,
    make_usage,
    output_cap,
    plain_estimate,
    plain_tokens,
    responses_input_bound,
    text_bytes,
    whole_count,
)
from allowance._sdk._adapter import SdkAdapter
from allowance._sdk._common import NO_CAP, CappedAccumulator
from allowance.plugins import hookimpl

if TYPE_CHECKING:
    from collections.abc import (
        AsyncIterable,
        AsyncIterator,
        Iterable,
        Iterator,
        Mapping,
        Sequence,
    )

    from allowance._sdk._common import SdkBinding
    from allowance._sdk._common import _StreamTracker as Tracker
    from allowance.typing import Adapter, Estimate, ProviderCodec, Usage

__all__ = ["OpenAIAdapter", "OpenAICodec"]

_CHAT = "chat"
_RESPONSES = "responses"
_EMBEDDINGS = "embeddings"
_COMPLETIONS = "completions"  # the legacy Completions API
_COMPACT = "compact"  # /responses/compact: a Responses body, usage, no stream
# Chat's usage fields, and its stream usage asked for and hidden.
_STREAM_USAGE: Final = frozenset({_CHAT, _COMPLETIONS})
# service_tier="priority" (Chat, Responses) is billed at about 1.7-2x the
# listed (standard) price, which genai-prices does not hold: 2x bounds it.
_PRIORITY: Final = "priority"
_PRIORITY_FACTOR: Final = 2


@lru_cache(maxsize=64)
def _api(path: str) -> str | None:
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return _CHAT
    if path.endswith("/responses"):
        return _RESPONSES
    if path.endswith("/embeddings"):
        return _EMBEDDINGS
    if path.endswith("/completions"):
        return _COMPLETIONS
    if path.endswith("/responses/compact"):
        return _COMPACT
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


def _at_tier(estimate: Estimate, body: Mapping[str, Any]) -> Estimate:
    """``estimate`` at the priority tier's price when the request asks for it."""
    if body.get("service_tier") == _PRIORITY:
        return replace(estimate, price_factor=_PRIORITY_FACTOR)
    return estimate


def served_factor(served: Any, asked: int) -> int:
    """The price factor of a call reserved at ``asked``, by the tier that served it.

    ``served``: the response, or a stream's accumulator. A response naming
    another tier than priority (``"default"``: the provider fell back) is
    billed at the listed price; one naming none keeps the bound.
    """
    tier = getattr(served, "service_tier", None)
    return asked if tier is None or tier == _PRIORITY else 1


def _completion_choices(body: Mapping[str, Any]) -> int:
    """The choices of a completion: ``n`` per prompt (for a synthetic answer)."""
    n = body.get("n")
    per_prompt = n if type(n) is int and n > 0 else 1
    prompt = body.get("prompt")
    if (  # a list of prompts, not one list of token ids: as the estimate
        isinstance(prompt, list)
        and prompt
        and not all(type(item) is int for item in prompt)
    ):
        return per_prompt * len(prompt)
    return per_prompt


class OpenAICodec:
    """Reads and writes the Chat, Responses, Embeddings and Completions formats."""

    name = "openai"

    def is_billable(self, path: str) -> bool:
        """Return True for the generation and embedding endpoints."""
        return _api(path) is not None

    def estimate(self, path: str, body: Mapping[str, Any]) -> Estimate:
        """Bound the input and take the output cap of a request."""
        model = body.get("model")
        if type(model) is not str:
            model = str(model or "")
        api = _api(path)
        if api == _CHAT:
            plain = plain_estimate("openai", model, body)
            if plain is not None:  # the commonest body, in one small function
                return plain
        if api in {_CHAT, _RESPONSES}:  # a service tier prices these
            bound = chat_input_bound if api == _CHAT else responses_input_bound
            estimate = make_estimate(
                "openai", model, bound(body, model), output_cap("openai", model, body)
            )
            return _at_tier(estimate, body)
        if api == _COMPLETIONS:
            return make_estimate(
                "openai",
                model,
                completions_input_bound(body, model),
                completions_output_cap(model, body),
            )
        if api == _COMPACT:  # no output cap to ask for: the model's largest
            return make_estimate(
                "openai",
                model,
                responses_input_bound(body, model),
                default_output_cap(model),
            )
        return make_estimate("openai", model, _embedding_bound(body), 0)

    def plain(self, path: str, body: Mapping[str, Any]) -> tuple[str, int, int] | None:
        """``(model, input bound, output cap)`` of the commonest chat body, or None.

        What ``estimate`` returns for it, without building the ``Estimate``:
        the SDK layer's express lane.
        """
        model = body.get("model")
        if type(model) is not str or _api(path) != _CHAT:
            return None
        plain = plain_tokens(model, body)
        return None if plain is None else (model, plain[0], plain[1])

    def with_model(self, body: Mapping[str, Any], model: str) -> dict[str, Any]:
        """Return a copy of ``body`` asking for ``model``."""
        return {**body, "model": model}

    def refine(
        self, path: str, body: Mapping[str, Any], estimate: Estimate
    ) -> Estimate | None:
        """Count the input with tiktoken when its encoding is cached locally."""
        if _api(path) in (_EMBEDDINGS, _COMPLETIONS):  # not chat or Responses
            return None
        exact = exact_input_tokens("openai", estimate.model, body)
        if exact is None:
            return None
        return replace(estimate, input_tokens=exact, exact_input=True)

    def usage(self, path: str, response: Any) -> Usage | None:
        """Read usage from a parsed ChatCompletion, Response or embeddings list.

        Completions report chat's fields; a CompactedResponse, Responses'.
        """
        usage = getattr(response, "usage", None)
        if usage is None:
            return None
        api = _api(path)
        if api in _STREAM_USAGE:  # chat (the hot path, first), completions
            return _read_usage(usage, _CHAT_USAGE)
        if api == _EMBEDDINGS:  # input only: no completion_tokens to read
            inputs = whole_count(getattr(usage, "prompt_tokens", None))
            return None if inputs is None else make_usage(inputs, 0)
        return _read_usage(usage, _RESPONSES_USAGE)  # Responses, compact

    def response_model(self, response: Any) -> str | None:
        """Return the model that answered."""
        model = getattr(response, "model", None)
        return model if isinstance(model, str) else None

    def stream_accumulator(
        self, path: str, *, hide_usage_only: bool
    ) -> _ChatAccumulator | _ResponsesAccumulator | _CompletionsAccumulator:
        """Return an accumulator for a chat, responses or completions stream."""
        api = _api(path)
        if api == _RESPONSES:
            return _ResponsesAccumulator()
        if api == _COMPLETIONS:
            return _CompletionsAccumulator(hide_usage_only=hide_usage_only)
        return _ChatAccumulator(hide_usage_only=hide_usage_only)

    def synthetic_body(
        self, path: str, body: Mapping[str, Any], *, reason: str, call_id: str
    ) -> dict[str, Any]:
        """Return an empty, marked response for ``on_limit="stop"``."""
        model = str(body.get("model") or "")
        ident = f"allowance-stop-{call_id}"
        api = _api(path)
        if api == _RESPONSES:
            return _stopped_response(ident, model, reason)
        if api == _COMPACT:
            return {
                "id": ident,
                "object": "response.compaction",
                "created_at": int(time.time()),
                "output": [],
                "usage": _zero_responses_usage(),
                "allowance": {"stopped": True, "reason": reason},
            }
        if api == _COMPLETIONS:
            return {
                **_stopped_completion(ident, model, _completion_choices(body)),
                "usage": {
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "total_tokens": 0,
                },
                "allowance": {"stopped": True, "reason": reason},
            }
        if api == _EMBEDDINGS:
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
        if _api(path) == _COMPLETIONS:
            completion = {
                **_stopped_completion(ident, model, _completion_choices(body)),
                "allowance": {"stopped": True, "reason": reason},
            }
            return f"data: {json.dumps(completion)}\n\ndata: [DONE]\n\n".encode()
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


def _stopped_completion(ident: str, model: str, choices: int) -> dict[str, Any]:
    """An empty ``text_completion`` (a whole one, or a stream's one chunk)."""
    return {
        "id": ident,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "allowance-stop",
        "choices": [
            {"index": i, "text": "", "finish_reason": "stop", "logprobs": None}
            for i in range(choices)
        ],
    }


def _zero_responses_usage() -> dict[str, Any]:
    return {
        "input_tokens": 0,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 0,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 0,
    }


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
        "usage": _zero_responses_usage(),
    }


def _read_usage(usage: Any, names: tuple[str, str, str, str]) -> Usage | None:
    """Read a usage object of either API: their fields differ only by name.

    None when its input or output count is not a count (``whole_count``):
    such a usage is charged as a missing one, the worst case.
    """
    inputs_name, outputs_name, inputs_details, outputs_details = names
    inputs = getattr(usage, inputs_name, None)
    outputs = getattr(usage, outputs_name, None)
    if type(inputs) is not int or type(outputs) is not int:
        inputs, outputs = whole_count(inputs), whole_count(outputs)
        if inputs is None or outputs is None:
            return None
    details = getattr(usage, inputs_details, None)
    if details is None:
        cache_read = cache_write = 0
    else:
        cache_read = getattr(details, "cached_tokens", 0)
        cache_write = getattr(details, "cache_write_tokens", 0)
    details = getattr(usage, outputs_details, None)
    reasoning = 0 if details is None else getattr(details, "reasoning_tokens", 0)
    # The details' counts are ints, never bools: anything else (absent) counts 0.
    return make_usage(
        inputs,
        outputs,
        cache_read if type(cache_read) is int else 0,
        cache_write if type(cache_write) is int else 0,
        reasoning if type(reasoning) is int else 0,
    )


_CHAT_USAGE: Final = (
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
)
_RESPONSES_USAGE: Final = (
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "output_tokens_details",
)


def _chat_usage(usage: Any) -> Usage | None:
    return _read_usage(usage, _CHAT_USAGE)


def _responses_usage(usage: Any) -> Usage | None:
    return _read_usage(usage, _RESPONSES_USAGE)


def _arguments_bytes(tool_calls: Any) -> int:
    produced = 0
    for tool_call in tool_calls:
        function = getattr(tool_call, "function", None)
        produced += text_bytes(getattr(function, "arguments", None))
    return produced


def _chat_bytes(event: Any) -> int:
    """The text bytes of a chunk, any attribute possibly missing."""
    produced = 0
    choices = getattr(event, "choices", None)
    if choices:
        for choice in choices:
            delta = getattr(choice, "delta", None)
            if delta is None:
                continue
            produced += text_bytes(getattr(delta, "content", None))
            tool_calls = getattr(delta, "tool_calls", None)
            if tool_calls:
                produced += _arguments_bytes(tool_calls)
    return produced


class _TextAccumulator(CappedAccumulator):
    """What every OpenAI stream's accumulator keeps: text bytes, model, usage."""

    __slots__ = ("_bytes", "_model", "_usage", "service_tier")

    def __init__(self) -> None:
        self.enough = NO_CAP
        self._usage: Any = None  # the provider's usage object, read at the end
        self._model: str | None = None
        self._bytes = 0
        self.service_tier: object = None  # the tier the usage was reported with

    def produced_text_bytes(self) -> int:
        return self._bytes

    def response_model(self) -> str | None:
        return self._model


class _ChunksAccumulator(_TextAccumulator):
    """Usage of a chat or completions stream: the last chunk carries it.

    When include_usage is on; the usage-only chunk the layer asked for is
    hidden (``hide_usage_only``). Subclasses count the text of the chunks.
    """

    __slots__ = ("_hide",)

    def __init__(self, *, hide_usage_only: bool) -> None:
        super().__init__()
        self._hide = hide_usage_only

    def usage(self) -> Usage | None:
        usage = self._usage
        return None if usage is None else _chat_usage(usage)


class _ChatAccumulator(_ChunksAccumulator):
    """A chat stream's: text in ``choices[].delta`` (content, tool arguments)."""

    __slots__ = ()

    def observe(self, event: Any) -> bool:
        if self._model is None:
            self._model = getattr(event, "model", None)
        if self._bytes < self.enough:
            # Plain attribute reads (getattr with a default costs a call each);
            # a chunk they do not fit is read again by _chat_bytes.
            try:
                produced = 0
                for choice in event.choices:
                    delta = choice.delta
                    content = delta.content
                    if isinstance(content, str):
                        produced += (
                            len(content) if content.isascii() else text_bytes(content)
                        )
                    if delta.tool_calls:
                        produced += _arguments_bytes(delta.tool_calls)
            except (AttributeError, TypeError):
                produced = _chat_bytes(event)
            self._bytes += produced
        usage = getattr(event, "usage", None)
        if usage is not None:
            self._usage = usage
            self.service_tier = getattr(event, "service_tier", None)
            if self._hide and not getattr(event, "choices", None):
                return False  # the usage-only chunk we asked for
        return True

    # ``observe`` inline in the stream loop (a call per chunk costs more than
    # the reading): _common's ``_observed`` loop with this body. Keep in step.

    def track(self, events: Iterable[Any], tracker: Tracker) -> Iterator[Any]:  # noqa: C901
        """The chunks the caller sees; ``tracker`` settles when they end or stop."""
        hide = self._hide
        enough = self.enough  # set by the tracker before the first chunk
        counted = self._bytes  # kept in a local, stored back once per chunk
        try:
            for event in events:
                if self._model is None:
                    self._model = getattr(event, "model", None)
                if counted < enough:
                    try:
                        produced = 0
                        for choice in event.choices:
                            delta = choice.delta
                            content = delta.content
                            if content is not None:  # a str; anything else: below
                                produced += (
                                    len(content)
                                    if content.isascii()
                                    else text_bytes(content)
                                )
                            if delta.tool_calls:
                                produced += _arguments_bytes(delta.tool_calls)
                    except (AttributeError, TypeError):
                        produced = _chat_bytes(event)
                    counted += produced
                    self._bytes = counted
                usage = getattr(event, "usage", None)
                if usage is not None:
                    self._usage = usage
                    self.service_tier = getattr(event, "service_tier", None)
                    if hide and not getattr(event, "choices", None):
                        continue  # the usage-only chunk we asked for
                yield event
        except BaseException:  # cut short: an error, a break, a close
            tracker.abandon()
            raise
        tracker.finish()

    async def atrack(  # noqa: C901 - observe inline, on purpose
        self, events: AsyncIterable[Any], tracker: Tracker
    ) -> AsyncIterator[Any]:
        """Async twin of ``track``."""
        hide = self._hide
        enough = self.enough  # set by the tracker before the first chunk
        counted = self._bytes  # kept in a local, stored back once per chunk
        try:
            async for event in events:
                if self._model is None:
                    self._model = getattr(event, "model", None)
                if counted < enough:
                    try:
                        produced = 0
                        for choice in event.choices:
                            delta = choice.delta
                            content = delta.content
                            if content is not None:  # a str; anything else: below
                                produced += (
                                    len(content)
                                    if content.isascii()
                                    else text_bytes(content)
                                )
                            if delta.tool_calls:
                                produced += _arguments_bytes(delta.tool_calls)
                    except (AttributeError, TypeError):
                        produced = _chat_bytes(event)
                    counted += produced
                    self._bytes = counted
                usage = getattr(event, "usage", None)
                if usage is not None:
                    self._usage = usage
                    self.service_tier = getattr(event, "service_tier", None)
                    if hide and not getattr(event, "choices", None):
                        continue  # the usage-only chunk we asked for
                yield event
        except GeneratorExit:
            tracker.abandon()
            raise
        except BaseException:
            await tracker.aabandon()
            raise
        await tracker.afinish()


class _ResponsesAccumulator(_TextAccumulator):
    """Usage of a Responses stream: ``response.completed`` carries it."""

    __slots__ = ()

    def observe(self, event: Any) -> bool:
        kind = getattr(event, "type", "")
        if kind.endswith(".delta"):
            if self._bytes < self.enough:
                self._bytes += text_bytes(getattr(event, "delta", None))
            return True
        response = getattr(event, "response", None)
        if response is not None:
            model = getattr(response, "model", None)
            if isinstance(model, str):
                self._model = model
            usage = getattr(response, "usage", None)
            if usage is not None:
                self._usage = usage
                self.service_tier = getattr(response, "service_tier", None)
        return True

    def usage(self) -> Usage | None:
        usage = self._usage
        return None if usage is None else _responses_usage(usage)


def _completion_bytes(event: Any) -> int:
    """The text bytes of a completions chunk, any attribute possibly missing."""
    produced = 0
    choices = getattr(event, "choices", None)
    if choices:
        for choice in choices:
            produced += text_bytes(getattr(choice, "text", None))
    return produced


class _CompletionsAccumulator(_ChunksAccumulator):
    """A (legacy) completions stream's: text in ``choices[].text``.

    With ``echo`` the first chunks repeat the prompt: counted as output when
    the stream is cut short, at most the output cap (never under).
    """

    __slots__ = ()

    def observe(self, event: Any) -> bool:
        if self._model is None:
            model = getattr(event, "model", None)
            self._model = model if isinstance(model, str) else None
        if self._bytes < self.enough:
            self._bytes += _completion_bytes(event)
        usage = getattr(event, "usage", None)
        if usage is not None:
            self._usage = usage
            if self._hide and not getattr(event, "choices", None):
                return False  # the usage-only chunk we asked for
        return True


def _binding() -> SdkBinding:
    import openai  # noqa: PLC0415 - only when the adapter is used
    from openai import _legacy_response, _response  # noqa: PLC0415

    from allowance._sdk._common import SdkBinding  # noqa: PLC0415

    azure = (openai.AzureOpenAI, openai.AsyncAzureOpenAI)

    def provider_of(client: Any) -> str:
        return "azure" if isinstance(client, azure) else "openai"

    def fixed_model(client: Any, path: str) -> bool:
        # Azure routes by the deployment in the URL. Without one in the base URL
        # the SDK builds it from the body's model (``_build_request``); with
        # ``azure_deployment=`` the URL names it, whatever the body says.
        if not isinstance(client, azure):
            return False
        return "/deployments/" in str(client._prepare_url(path).path)  # noqa: SLF001

    return SdkBinding(
        name="openai",
        codec=CODEC,
        stream_types=(openai.Stream,),
        async_stream_types=(openai.AsyncStream,),
        raw_types=(_legacy_response.LegacyAPIResponse,),
        lazy_types=(_response.APIResponse,),
        async_lazy_types=(_response.AsyncAPIResponse,),
        provider_of=provider_of,
        fixed_model=fixed_model,
        served_factor=served_factor,
        wants_stream_usage=lambda path: _api(path) in _STREAM_USAGE,
        plain=CODEC.plain,
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
