"""Wire formats of the fake provider: the JSON bodies and SSE events it sends.

Everything here is pure: it turns a resolved :class:`Generation` into the
bodies the OpenAI Chat Completions, (legacy) Completions, Responses (and
``/responses/compact``) and Anthropic Messages APIs send, in the shapes the
real SDKs parse. Only the Anthropic renderers subtract the cache from
``input_tokens``, as that API does. The HTTP server lives in
:mod:`allowance.testing._fake_provider`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from base64 import b64encode
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from allowance.testing._fake_models import FakeRequest, FakeUsage, Generation

__all__ = [
    "Frame",
    "chat_completion",
    "chat_stream",
    "compacted_response",
    "completion",
    "completion_stream",
    "embeddings",
    "error_body",
    "message",
    "message_stream",
    "models",
    "response",
    "response_stream",
]

_TOO_MANY_REQUESTS = 429
_EMBEDDING_DIMENSIONS = 8
_MAX_EMBEDDING_DIMENSIONS = 4096
_OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
_ANTHROPIC_MODELS = {
    "claude-haiku-4-5": "Claude Haiku 4.5",
    "claude-sonnet-4-5": "Claude Sonnet 4.5",
}
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


@dataclass(frozen=True, slots=True)
class Frame:
    """One server-sent event, encoded, and its role in truncation."""

    data: bytes
    kind: Literal["head", "content", "final"]
    """``content`` frames count for ``truncate_after``; ``final`` ones end the
    stream and are never sent by a truncated one."""


def error_body(flavor: Literal["openai", "anthropic"], status: int, text: str) -> Any:
    """Return the provider's JSON error body for an HTTP ``status``."""
    if flavor == "anthropic":
        kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": text}}
    kind = _OPENAI_ERROR_TYPES.get(status, "server_error")
    code = "rate_limit_exceeded" if status == _TOO_MANY_REQUESTS else None
    return {"error": {"message": text, "type": kind, "param": None, "code": code}}


# -- OpenAI Chat Completions ---------------------------------------------------


def _chat_usage(usage: FakeUsage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_finish(gen: Generation) -> str:
    if gen.tool_calls:
        return "tool_calls"
    return "length" if gen.cut else "stop"


def _chat_envelope(gen: Generation, obj: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{gen.ident}",
        "object": obj,
        "created": gen.created,
        "model": gen.model,
        "system_fingerprint": None,
        "service_tier": gen.service_tier,
    }


def chat_completion(gen: Generation) -> dict[str, Any]:
    """Return a ``chat.completion`` object."""
    msg: dict[str, Any] = {
        "role": "assistant",
        "content": gen.content if gen.has_text else None,
        "refusal": None,
        "annotations": [],
    }
    if gen.tool_calls:
        msg["tool_calls"] = [
            {
                "id": f"call_{gen.ident}_{i}",
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            for i, (name, args) in enumerate(gen.tool_calls)
        ]
    body = _chat_envelope(gen, "chat.completion")
    body["choices"] = [
        {
            "index": 0,
            "message": msg,
            "logprobs": None,
            "finish_reason": _chat_finish(gen),
        }
    ]
    if gen.usage is not None:
        body["usage"] = _chat_usage(gen.usage)
    return body


def chat_stream(gen: Generation, *, include_usage: bool) -> list[Frame]:
    """Return ``chat.completion.chunk`` frames, ending with ``data: [DONE]``.

    Usage comes only with ``stream_options.include_usage``, in a last chunk
    whose ``choices`` is empty (every earlier chunk then has ``usage: null``).
    """

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = _chat_envelope(gen, "chat.completion.chunk")
        body["choices"] = [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        ]
        if include_usage:
            body["usage"] = None
        return _sse(body)

    first: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
    if not gen.has_text:
        first["content"] = None
    frames = [Frame(chunk(first), "head")]
    frames += [Frame(chunk({"content": piece}), "content") for piece in gen.pieces]
    for i, (name, args) in enumerate(gen.tool_calls):
        start = {
            "index": i,
            "id": f"call_{gen.ident}_{i}",
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        frames.append(Frame(chunk({"tool_calls": [start]}), "head"))
        more = {"index": i, "function": {"arguments": args}}
        frames.append(Frame(chunk({"tool_calls": [more]}), "content"))
    frames.append(Frame(chunk({}, _chat_finish(gen)), "final"))
    if include_usage and gen.usage is not None:
        body = _chat_envelope(gen, "chat.completion.chunk")
        body["choices"] = []
        body["usage"] = _chat_usage(gen.usage)
        frames.append(Frame(_sse(body), "final"))
    frames.append(Frame(b"data: [DONE]\n\n", "final"))
    return frames


# -- OpenAI (legacy) Completions -------------------------------------------------


def _completion_envelope(gen: Generation) -> dict[str, Any]:
    return {
        "id": f"cmpl-{gen.ident}",
        "object": "text_completion",
        "created": gen.created,
        "model": gen.model,
        "system_fingerprint": None,
    }


def _echoed(request: FakeRequest) -> str:
    """The prompt the answer repeats with ``echo`` (a string prompt only)."""
    body = request.json if isinstance(request.json, dict) else {}
    prompt = body.get("prompt")
    return prompt if body.get("echo") is True and isinstance(prompt, str) else ""


def completion(gen: Generation, request: FakeRequest) -> dict[str, Any]:
    """Return a ``text_completion`` object: one choice, whatever ``n`` or prompts.

    With ``echo`` a string prompt comes back before the text.
    """
    body = _completion_envelope(gen)
    body["choices"] = [
        {
            "index": 0,
            "text": _echoed(request) + gen.content,
            "logprobs": None,
            "finish_reason": "length" if gen.cut else "stop",
        }
    ]
    if gen.usage is not None:
        body["usage"] = _chat_usage(gen.usage)
    return body


def completion_stream(
    gen: Generation, request: FakeRequest, *, include_usage: bool
) -> list[Frame]:
    """Return ``text_completion`` chunks, ending with ``data: [DONE]``.

    One chunk per word (the echoed prompt first, with ``echo``), a last one
    with the ``finish_reason``; usage only with ``stream_options.include_usage``,
    in a chunk whose ``choices`` is empty, as chat's.
    """

    def chunk(text: str, finish: str | None = None) -> bytes:
        body = _completion_envelope(gen)
        body["choices"] = [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        ]
        if include_usage:
            body["usage"] = None
        return _sse(body)

    echoed = _echoed(request)
    frames = [Frame(chunk(echoed), "head")] if echoed else []
    frames += [Frame(chunk(piece), "content") for piece in gen.pieces]
    frames.append(Frame(chunk("", "length" if gen.cut else "stop"), "final"))
    if include_usage and gen.usage is not None:
        body = _completion_envelope(gen)
        body["choices"] = []
        body["usage"] = _chat_usage(gen.usage)
        frames.append(Frame(_sse(body), "final"))
    frames.append(Frame(b"data: [DONE]\n\n", "final"))
    return frames


# -- OpenAI Responses ----------------------------------------------------------


def _responses_usage(usage: FakeUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def _message_item(gen: Generation, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [_output_text(text)]
    return {
        "id": f"msg_{gen.ident}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_item(gen: Generation, i: int, status: str, args: str) -> dict[str, Any]:
    return {
        "id": f"fc_{gen.ident}_{i}",
        "type": "function_call",
        "status": status,
        "call_id": f"call_{gen.ident}_{i}",
        "name": gen.tool_calls[i][0],
        "arguments": args,
    }


def _response_output(gen: Generation) -> list[dict[str, Any]]:
    output = [_message_item(gen, "completed", gen.content)] if gen.has_text else []
    output += [
        _function_item(gen, i, "completed", args)
        for i, (_, args) in enumerate(gen.tool_calls)
    ]
    return output


def response(
    gen: Generation, request: FakeRequest, *, final: bool = True
) -> dict[str, Any]:
    """Return a ``response`` object; ``final=False`` gives the in-progress one.

    A text cut short by ``max_output_tokens`` gives ``status: "incomplete"``
    with ``incomplete_details.reason == "max_output_tokens"``, as the real API.
    """
    body = request.json if isinstance(request.json, dict) else {}
    status = ("incomplete" if gen.cut else "completed") if final else "in_progress"
    return {
        "id": f"resp_{gen.ident}",
        "object": "response",
        "created_at": gen.created,
        "status": status,
        "background": False,
        "completed_at": gen.created if final else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"}
        if final and gen.cut
        else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": gen.model,
        "service_tier": gen.service_tier,
        "output": _response_output(gen) if final else [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text", {"format": {"type": "text"}}),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": _responses_usage(gen.usage)
        if final and gen.usage is not None
        else None,
        "metadata": body.get("metadata", {}),
    }


def response_stream(gen: Generation, request: FakeRequest) -> list[Frame]:
    """Return the typed Responses events, each with its ``sequence_number``.

    ``response.created``, ``response.in_progress``, per output item its
    ``added``/``done`` events with one ``response.output_text.delta`` per word
    (or one ``function_call_arguments.delta`` per tool call), then
    ``response.completed`` (``response.incomplete`` when cut short) carrying
    the usage.
    """
    frames: list[Frame] = []

    def emit(kind: Literal["head", "content", "final"], event: dict[str, Any]) -> None:
        event["sequence_number"] = len(frames)
        frames.append(Frame(_sse(event, event["type"]), kind))

    opening = response(gen, request, final=False)
    emit("head", {"type": "response.created", "response": opening})
    emit("head", {"type": "response.in_progress", "response": opening})
    index = 0
    if gen.has_text:
        item_id = f"msg_{gen.ident}"
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        emit(
            "head",
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": _message_item(gen, "in_progress", None),
            },
        )
        part = {"type": "response.content_part.added", **where}
        emit("head", {**part, "part": _output_text("")})
        for piece in gen.pieces:
            delta = {"type": "response.output_text.delta", **where, "delta": piece}
            emit("content", {**delta, "logprobs": []})
        done = {"type": "response.output_text.done", **where, "text": gen.content}
        emit("head", {**done, "logprobs": []})
        part = {"type": "response.content_part.done", **where}
        emit("head", {**part, "part": _output_text(gen.content)})
        item = _message_item(gen, "completed", gen.content)
        emit(
            "head",
            {"type": "response.output_item.done", "output_index": index, "item": item},
        )
        index += 1
    for i, (name, args) in enumerate(gen.tool_calls):
        where = {"item_id": f"fc_{gen.ident}_{i}", "output_index": index}
        added = _function_item(gen, i, "in_progress", "")
        emit(
            "head",
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": added,
            },
        )
        delta = {"type": "response.function_call_arguments.delta", **where}
        emit("content", {**delta, "delta": args})
        done = {"type": "response.function_call_arguments.done", **where}
        emit("head", {**done, "name": name, "arguments": args})
        item = _function_item(gen, i, "completed", args)
        emit(
            "head",
            {"type": "response.output_item.done", "output_index": index, "item": item},
        )
        index += 1
    kind = "response.incomplete" if gen.cut else "response.completed"
    emit("final", {"type": kind, "response": response(gen, request)})
    return frames


def compacted_response(gen: Generation, request: FakeRequest) -> dict[str, Any]:
    """Return a ``response.compaction`` object (``/responses/compact``).

    Its output: the request's user messages, then one compaction item whose
    ``encrypted_content`` is the answer's text.
    """
    body = request.json if isinstance(request.json, dict) else {}
    raw = body.get("input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw or []
    output: list[dict[str, Any]] = [
        {
            "id": f"msg_{gen.ident}_{i}",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_text", "text": item["content"]}]
            if isinstance(item.get("content"), str)
            else item.get("content", []),
        }
        for i, item in enumerate(items)
        if isinstance(item, dict) and item.get("role") == "user"
    ]
    output.append(
        {
            "id": f"cmp_{gen.ident}",
            "type": "compaction",
            "encrypted_content": gen.content,
            "created_by": "fake",
        }
    )
    compacted: dict[str, Any] = {
        "id": f"resp_{gen.ident}",
        "object": "response.compaction",
        "created_at": gen.created,
        "output": output,
    }
    if gen.usage is not None:
        compacted["usage"] = _responses_usage(gen.usage)
    return compacted


# -- Anthropic Messages --------------------------------------------------------


def _anthropic_usage(usage: FakeUsage, *, output_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_tokens": usage.uncached_input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }
    if usage.reasoning_tokens:
        body["output_tokens_details"] = {"thinking_tokens": usage.reasoning_tokens}
    return body


def _stop_reason(gen: Generation) -> str:
    if gen.tool_calls:
        return "tool_use"
    return "max_tokens" if gen.cut else "end_turn"


def _tool_use(gen: Generation, i: int, tool_input: object) -> dict[str, Any]:
    name = gen.tool_calls[i][0]
    return {
        "type": "tool_use",
        "id": f"toolu_{gen.ident}_{i}",
        "name": name,
        "input": tool_input,
    }


def message(gen: Generation, *, final: bool = True) -> dict[str, Any]:
    """Return a ``message`` object; ``final=False`` gives ``message_start``'s.

    Its ``usage.input_tokens`` excludes cache reads and writes, as the real API.
    """
    content: list[dict[str, Any]] = []
    if final:
        if gen.has_text:
            content.append({"type": "text", "text": gen.content})
        content += [
            _tool_use(gen, i, json.loads(args))
            for i, (_, args) in enumerate(gen.tool_calls)
        ]
    body: dict[str, Any] = {
        "id": f"msg_{gen.ident}",
        "type": "message",
        "role": "assistant",
        "model": gen.model,
        "content": content,
        "stop_reason": _stop_reason(gen) if final else None,
        "stop_sequence": None,
    }
    if gen.usage is not None:
        out = gen.usage.output_tokens if final else 1
        body["usage"] = _anthropic_usage(gen.usage, output_tokens=out)
    return body


def message_stream(gen: Generation) -> list[Frame]:
    """Return the Messages stream events.

    ``message_start`` (usage with ``output_tokens: 1``), per content block
    ``content_block_start``, one ``content_block_delta`` per word (one
    ``input_json_delta`` per tool call) and ``content_block_stop``, then
    ``message_delta`` with the cumulative usage and ``message_stop``.
    """

    def event(name: str, body: dict[str, Any]) -> bytes:
        return _sse({"type": name, **body}, name)

    frames = [
        Frame(event("message_start", {"message": message(gen, final=False)}), "head")
    ]
    index = 0
    if gen.has_text:
        block = {"index": index, "content_block": {"type": "text", "text": ""}}
        frames.append(Frame(event("content_block_start", block), "head"))
        frames.append(Frame(event("ping", {}), "head"))
        frames += [
            Frame(
                event(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "text_delta", "text": piece}},
                ),
                "content",
            )
            for piece in gen.pieces
        ]
        frames.append(Frame(event("content_block_stop", {"index": index}), "head"))
        index += 1
    for i, (_, args) in enumerate(gen.tool_calls):
        block = {"index": index, "content_block": _tool_use(gen, i, {})}
        frames.append(Frame(event("content_block_start", block), "head"))
        delta = {"type": "input_json_delta", "partial_json": args}
        frames.append(
            Frame(
                event("content_block_delta", {"index": index, "delta": delta}),
                "content",
            )
        )
        frames.append(Frame(event("content_block_stop", {"index": index}), "head"))
        index += 1
    end: dict[str, Any] = {
        "delta": {"stop_reason": _stop_reason(gen), "stop_sequence": None}
    }
    if gen.usage is not None:
        usage = _anthropic_usage(gen.usage, output_tokens=gen.usage.output_tokens)
        del usage["service_tier"]
        end["usage"] = usage
    frames.append(Frame(event("message_delta", end), "final"))
    frames.append(Frame(event("message_stop", {}), "final"))
    return frames


# -- Other endpoints -----------------------------------------------------------


def models(flavor: Literal["openai", "anthropic"], model_id: str | None = None) -> Any:
    """Return the model list (or one model) in the provider's shape."""
    if flavor == "anthropic":
        listed = [
            {
                "type": "model",
                "id": name,
                "display_name": _ANTHROPIC_MODELS.get(name, name),
                "created_at": "2025-01-01T00:00:00Z",
            }
            for name in ([model_id] if model_id else _ANTHROPIC_MODELS)
        ]
        if model_id:
            return listed[0]
        return {
            "data": listed,
            "has_more": False,
            "first_id": listed[0]["id"],
            "last_id": listed[-1]["id"],
        }
    items = [
        {"id": name, "object": "model", "created": 1735689600, "owned_by": "allowance"}
        for name in ([model_id] if model_id else _OPENAI_MODELS)
    ]
    return items[0] if model_id else {"object": "list", "data": items}


def embeddings(request: FakeRequest) -> dict[str, Any]:
    """Return deterministic embeddings: SHAKE-256 of each input, as float32 in [-1, 1).

    ``input`` may be a string, a list of strings, a token list or a list of
    token lists. ``dimensions`` (default 8) and ``encoding_format``
    (``"float"`` or ``"base64"``, which the openai SDK asks for by default)
    are honoured. Usage: ``ceil(utf8_bytes / 4)`` (at least 1) per string
    input, one per token of a token input.
    """
    body = request.json if isinstance(request.json, dict) else {}
    raw = body.get("input", "")
    inputs: list[Any]
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and isinstance(raw[0], int)
    ):
        inputs = [raw]
    else:
        inputs = list(raw) if isinstance(raw, list) else [raw]
    dims = body.get("dimensions")
    if not isinstance(dims, int) or not 0 < dims <= _MAX_EMBEDDING_DIMENSIONS:
        dims = _EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data: list[dict[str, Any]] = []
    tokens = 0
    for index, item in enumerate(inputs):
        if isinstance(item, str):
            seed = item.encode()
            tokens += max(1, math.ceil(len(seed) / 4))
        else:
            seed = json.dumps(item, separators=(",", ":")).encode()
            tokens += len(item) if isinstance(item, list) else 1
        words = struct.unpack(f"<{dims}I", hashlib.shake_256(seed).digest(4 * dims))
        packed = struct.pack(f"<{dims}f", *(w / 2**31 - 1.0 for w in words))
        vector: Any = (
            b64encode(packed).decode()
            if as_base64
            else list(struct.unpack(f"<{dims}f", packed))
        )
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": request.model or "text-embedding-3-small",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _sse(data: object, event: str | None = None) -> bytes:
    line = json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {line}\n\n".encode()
