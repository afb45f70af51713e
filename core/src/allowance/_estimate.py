"""Worst-case size of a request, computed before it is sent, without the network.

Input bound
    A byte-level BPE token (tiktoken's, Anthropic's) covers at least one UTF-8
    byte, so the UTF-8 length of a text bounds its token count from above. The
    bound of a request is the UTF-8 length of every text it carries plus:

    - ``MESSAGE_TOKENS`` (4) per message or input item: OpenAI's documented
      framing is 3 per message plus its role (1), and 1 more for a chat
      message with a ``name``;
    - ``REQUEST_TOKENS`` (3) per request: the priming of the reply;
    - tools: the UTF-8 bytes of each tool definition's JSON (on the exact
      path too: the TypeScript-like form OpenAI renders can take more tokens
      than the JSON, never more than its bytes) plus ``TOOL_TOKENS`` (8) per
      tool, ``BUILTIN_TOOL_TOKENS`` (1,000) per provider-typed tool
      (Anthropic's bash ~245, text editor ~700, computer use ~500, beyond
      their definitions) and, once per request with tools,
      ``OPENAI_TOOLS_TOKENS`` (32, the ``namespace functions`` wrapper) or
      ``ANTHROPIC_TOOLS_TOKENS`` (1,000: Anthropic adds a tool-use system
      prompt of a few hundred tokens, more for newer models, depending on
      ``tool_choice``);
    - structured output schemas (``response_format``, ``text.format``,
      ``output_format``): their JSON plus ``SCHEMA_TOKENS`` (32);
    - tool-call arguments: the argument string (OpenAI) or the JSON of
      ``input`` (Anthropic ``tool_use``).

    Strings under keys this module does not know are counted too. Parameters
    that are not prompt (``model``, ``temperature``, ``stop``, ``metadata``...)
    are not.

Media are not bounded by bytes (base64 would give absurd numbers); each counts
a documented figure:

    - OpenAI image, ``detail`` high or auto: ``OPENAI_IMAGE_TOKENS`` (1,600).
      Tile-priced models charge a base plus a price per 512 px tile, at most 8
      tiles (a 2048x768 image): gpt-4o 85+8x170 = 1,445, o-series 75+8x150,
      gpt-5 70+8x140. ``detail="low"``: 100 (85 / 75 / 70).
      Exceptions: gpt-4o-mini bills 2,833 + 5,667 per tile, so 48,169
      (low: 2,833); patch-priced ``*-mini`` and ``*-nano`` models bill at most
      1,536 patches times up to 2.46, so 3,800 whatever the detail.
    - Anthropic image: ``ANTHROPIC_IMAGE_TOKENS`` (1,600): Anthropic resizes
      images to about 1.15 megapixels, ~1,600 tokens (width x height / 750).
    - PDF or other non-text document, whatever its size:
      ``DOCUMENT_TOKENS`` (30,000), ten pages at the upper end of Anthropic's
      1,500-3,000 tokens per page (text plus page image). Longer documents
      exceed it. Plain-text documents count their text.
    - Audio: ``AUDIO_TOKENS_PER_KB`` (10) per kB of decoded audio, which holds
      for audio of at least 8 kbit/s at no more than 10 tokens a second.
      Audio passed by reference rather than inline counts ``DOCUMENT_TOKENS``.

    The guard charges the real usage afterwards and counts an estimate miss
    when it exceeds the estimate. Inputs the request only references are
    unknown here and not counted: ``previous_response_id``, ``conversation``,
    ``item_reference`` items, stored prompts, results of server-side tools.

Exact count
    ``exact_input_tokens`` counts the same texts with tiktoken, plus the same
    allowances, for OpenAI models whose encoding file is already in tiktoken's
    cache. It checks the file (path and SHA-256) first, so tiktoken is never
    asked to download anything.

Completions (the legacy ``/completions`` API)
    Each prompt (a string, a list of token ids, or each item of a list of
    strings or of token-id lists) is generated on its own: its UTF-8 bytes
    (a token id counts 1) plus ``REQUEST_TOKENS`` (a BOS token, an empty
    prompt's ``<|endoftext|>``), plus ``suffix`` once per prompt. Its output
    cap is ``max_tokens``, 16 when absent (the API's default) and the model
    family's largest output when null (a server may read null as no limit),
    times ``max(n, best_of)`` and times the number of prompts.

Output cap
    ``max_completion_tokens`` / ``max_tokens`` (chat, times ``n``),
    ``max_output_tokens`` (responses), ``max_tokens`` (Anthropic). Without one,
    the model family's largest output, which is what a request without a cap
    can produce:

    ================================  =======
    gpt-4o, gpt-4o-mini, chatgpt-4o    16,384
    gpt-4.1                            32,768
    gpt-4.5                            16,384
    gpt-4-turbo and dated previews      4,096
    gpt-4-32k                          32,768
    gpt-4                               8,192
    gpt-3.5                             4,096
    o1-mini                            65,536
    o1-preview                         32,768
    o1, o3, o4                        100,000
    gpt-5 (all 5.x)                   128,000
    claude (max_tokens is required)     8,192
    anything else                      16,384
    ================================  =======
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

from allowance._errors import ConfigurationError
from allowance.typing import CallRecord, Estimate, Usage

if TYPE_CHECKING:
    from tiktoken import Encoding

    from allowance.typing import Outcome

__all__ = [
    "chat_input_bound",
    "completions_input_bound",
    "completions_output_cap",
    "default_output_cap",
    "estimate",
    "exact_input_tokens",
    "make_estimate",
    "make_record",
    "make_usage",
    "messages_input_bound",
    "output_cap",
    "plain_bound",
    "plain_estimate",
    "plain_tokens",
    "responses_input_bound",
    "text_bytes",
    "token_count",
    "whole_count",
]

MESSAGE_TOKENS: Final = 4
REQUEST_TOKENS: Final = 3
TOOL_TOKENS: Final = 8
OPENAI_TOOLS_TOKENS: Final = 32
ANTHROPIC_TOOLS_TOKENS: Final = 1_000
BUILTIN_TOOL_TOKENS: Final = 1_000
SCHEMA_TOKENS: Final = 32
OPENAI_IMAGE_TOKENS: Final = 1_600
OPENAI_IMAGE_LOW_TOKENS: Final = 100
ANTHROPIC_IMAGE_TOKENS: Final = 1_600
DOCUMENT_TOKENS: Final = 30_000
AUDIO_TOKENS_PER_KB: Final = 10
DEFAULT_OUTPUT_TOKENS: Final = 16_384
COMPLETIONS_MAX_TOKENS: Final = 16  # the Completions API's default max_tokens

# (prefix, high or auto detail, low detail), first match wins.
_OPENAI_IMAGES: Final = (
    ("gpt-4o-mini", 48_169, 2_833),
    ("chatgpt-4o", OPENAI_IMAGE_TOKENS, OPENAI_IMAGE_LOW_TOKENS),
    ("gpt-4o", OPENAI_IMAGE_TOKENS, OPENAI_IMAGE_LOW_TOKENS),
)
_PATCH_IMAGE_TOKENS: Final = 3_800

# (prefix, largest output), first match wins: more specific prefixes first.
_OUTPUT_CAPS: Final = (
    ("gpt-4o-mini", 16_384),
    ("gpt-4o", 16_384),
    ("chatgpt-4o", 16_384),
    ("gpt-4.1", 32_768),
    ("gpt-4.5", 16_384),
    ("gpt-4-turbo", 4_096),
    ("gpt-4-1106", 4_096),
    ("gpt-4-0125", 4_096),
    ("gpt-4-vision", 4_096),
    ("gpt-4-32k", 32_768),
    ("gpt-4", 8_192),
    ("gpt-3.5", 4_096),
    ("gpt-35", 4_096),
    ("o1-mini", 65_536),
    ("o1-preview", 32_768),
    ("o1", 100_000),
    ("o3", 100_000),
    ("o4", 100_000),
    ("gpt-5-pro", 272_000),
    ("gpt-5", 128_000),
    ("codex-mini", 100_000),
    ("claude", 8_192),
)

# Top-level request keys that carry no prompt text.
_NOT_PROMPT: Final = frozenset(
    {
        "model", "stream", "stream_options", "temperature", "top_p", "top_k", "n",
        "seed", "stop", "stop_sequences", "logit_bias", "logprobs", "top_logprobs",
        "presence_penalty", "frequency_penalty", "user", "metadata", "store",
        "service_tier", "prompt_cache_key", "prompt_cache_retention",
        "safety_identifier", "reasoning_effort", "reasoning", "verbosity",
        "modalities", "audio", "parallel_tool_calls", "max_tokens",
        "max_completion_tokens", "max_output_tokens", "max_tool_calls",
        "previous_response_id", "conversation", "include", "truncation",
        "background", "thinking", "container", "context_management", "betas",
        "extra_headers", "extra_query", "extra_body", "timeout",
    }
)  # fmt: skip
# The parameters of the commonest body: not ``service_tier``, whose priority
# tier is billed at more than the listed price (the codec's estimate says).
_PLAIN_PARAMS: Final = _NOT_PROMPT - {"service_tier"}
# Keys inside messages and blocks whose values are not read by the model.
_NOT_TEXT: Final = frozenset({"type", "role", "cache_control", "signature", "detail"})
# What a request body can hold. Anything else is an SDK placeholder for an
# argument not given (openai's and anthropic's NotGiven/Omit): never sent.
_JSON: Final = (str, int, float, list, tuple, dict, Mapping, type(None))
# The exact types of almost every body value: no isinstance walk for them.
_JSON_EXACT: Final = frozenset({str, int, float, bool, list, tuple, dict, type(None)})
# Other types seen, whether they are JSON (a Mapping) or placeholders: anthropic
# bodies carry a dozen ``Omit`` values, each an ABC check without this.
_json_types: dict[type, bool] = {}
_JSON_TYPES_KEPT: Final = 64
_IMAGE_TYPES: Final = frozenset(
    {"image_url", "input_image", "image", "computer_screenshot"}
)
_DOCUMENT_TYPES: Final = frozenset({"file", "input_file", "document"})
_AUDIO_TYPES: Final = frozenset({"input_audio"})
_TOOL_USE_TYPES: Final = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def _draft(
    cls: type, names: tuple[str, ...], *, skip_post_init: bool = False
) -> type | None:
    """A plain class with the slots of ``cls``, a frozen slots dataclass of ``names``.

    The hot path builds one instance per call of ``Usage``, ``Estimate`` and
    ``CallRecord``: their ``__init__`` sets each field through
    ``object.__setattr__`` (frozen), a C call each. A draft's slots take plain
    attribute stores instead; then the instance's ``__class__`` becomes
    ``cls`` (the same slots, so the same layout): the very object the
    constructor builds, frozen from then on, at a fraction of the cost.
    None when ``cls`` is not such a class, or refuses the swap: callers then
    call the constructor. A ``__post_init__`` (a check of the caller's values)
    is skipped only with ``skip_post_init``: for values this library computed.
    """
    try:
        fields = tuple(f.name for f in dataclasses.fields(cls))
        slots = tuple(cls.__dict__["__slots__"])
    except (TypeError, KeyError):  # pragma: no cover - not a slots dataclass
        return None
    if (
        fields != names
        or set(slots) != set(names)
        or (hasattr(cls, "__post_init__") and not skip_post_init)
    ):
        return None  # pragma: no cover - changed shape
    draft = type(f"_{cls.__name__}Draft", (), {"__slots__": slots})
    probe: Any = _new(draft)
    try:
        probe.__class__ = cls
    except TypeError:  # pragma: no cover - a layout the swap refuses
        return None
    return draft


_new: Final = object.__new__
# Estimate checks a caller's counts (``__post_init__``); make_estimate's are ours.
_ESTIMATE_DRAFT: Final = _draft(
    Estimate,
    (
        "provider",
        "model",
        "input_tokens",
        "output_tokens",
        "exact_input",
        "price_factor",
    ),
    skip_post_init=True,
)
_USAGE_DRAFT: Final = _draft(
    Usage,
    (
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
    ),
)
_RECORD_DRAFT: Final = _draft(
    CallRecord,
    (
        "call_id",
        "ts",
        "scope",
        "provider",
        "model",
        "requested_model",
        "usage",
        "cost_micros",
        "adapters",
        "outcome",
        "estimate_tokens",
        "estimate_micros",
        "latency_ms",
    ),
)


def make_estimate(
    provider: str, model: str, input_tokens: int, output_tokens: int
) -> Estimate:
    """Return ``Estimate(provider, model, input_tokens, output_tokens)``, built fast.

    For values this library computed (no validation to run): the hot path
    builds one per call (see ``_draft``).
    """
    if _ESTIMATE_DRAFT is None:  # pragma: no cover - Estimate changed shape
        return Estimate(provider, model, input_tokens, output_tokens)
    draft: Any = _new(_ESTIMATE_DRAFT)
    draft.provider = provider
    draft.model = model
    draft.input_tokens = input_tokens
    draft.output_tokens = output_tokens
    draft.exact_input = False
    draft.price_factor = 1
    draft.__class__ = Estimate
    estimate: Estimate = draft
    return estimate


def whole_count(value: object) -> int | None:
    """A token count a provider reported, or None where it gave none.

    An int (not a bool), or a float that is a whole number (a JSON ``12.0``
    from an OpenAI-compatible server, which the SDKs pass on unvalidated).
    None for anything else (missing, null, text): a count that cannot be read
    is not zero.
    """
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def make_usage(
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> Usage:
    """Return the ``Usage`` of these counts, built fast (see ``_draft``)."""
    if _USAGE_DRAFT is None:  # pragma: no cover - Usage changed shape
        return Usage(
            input_tokens,
            output_tokens,
            cache_read_tokens,
            cache_write_tokens,
            reasoning_tokens,
        )
    draft: Any = _new(_USAGE_DRAFT)
    draft.input_tokens = input_tokens
    draft.output_tokens = output_tokens
    draft.cache_read_tokens = cache_read_tokens
    draft.cache_write_tokens = cache_write_tokens
    draft.reasoning_tokens = reasoning_tokens
    draft.__class__ = Usage
    usage: Usage = draft
    return usage


def make_record(  # noqa: PLR0917 - CallRecord's fields, in order
    call_id: str,
    ts: float,
    scope: Mapping[str, str],
    provider: str,
    model: str,
    requested_model: str,
    usage: Usage,
    cost_micros: int | None,
    adapters: tuple[str, ...],
    outcome: Outcome,
    estimate_tokens: int,
    estimate_micros: int | None,
    latency_ms: float,
) -> CallRecord:
    """Return ``CallRecord(...)`` of these fields, built fast (see ``_draft``)."""
    if _RECORD_DRAFT is None:  # pragma: no cover - CallRecord changed shape
        return CallRecord(
            call_id,
            ts,
            scope,
            provider,
            model,
            requested_model,
            usage,
            cost_micros,
            adapters,
            outcome,
            estimate_tokens,
            estimate_micros,
            latency_ms,
        )
    draft: Any = _new(_RECORD_DRAFT)
    draft.call_id = call_id
    draft.ts = ts
    draft.scope = scope
    draft.provider = provider
    draft.model = model
    draft.requested_model = requested_model
    draft.usage = usage
    draft.cost_micros = cost_micros
    draft.adapters = adapters
    draft.outcome = outcome
    draft.estimate_tokens = estimate_tokens
    draft.estimate_micros = estimate_micros
    draft.latency_ms = latency_ms
    draft.__class__ = CallRecord
    record: CallRecord = draft
    return record


def _utf8_len(text: str) -> int:
    """Return the UTF-8 length of ``text`` (lone surrogates count 3 bytes)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def text_bytes(text: object) -> int:
    """Return the UTF-8 length of ``text``; 0 when it is not a string."""
    return _utf8_len(text) if isinstance(text, str) else 0


def token_count(value: object) -> int:
    """Return ``value`` when it is a token count (an int, not a bool), else 0."""
    return value if type(value) is int else 0


# ``json.dumps(value, ensure_ascii=False, default=str)`` builds this encoder
# on every call; the one instance encodes the same.
_encode: Final = json.JSONEncoder(ensure_ascii=False, default=str).encode


def _dumps(value: object) -> str:
    return _encode(value)


def _is_json(value: object) -> bool:
    """Return True unless ``value`` is an SDK placeholder (not sent)."""
    cls = type(value)
    if cls in _JSON_EXACT:
        return True
    known = _json_types.get(cls)
    if known is None:
        known = isinstance(value, _JSON)
        # Per type, unless its instances can claim another ``__class__`` (proxies).
        if len(_json_types) < _JSON_TYPES_KEPT and not any(
            "__class__" in vars(base) for base in cls.__mro__[:-1]
        ):
            _json_types[cls] = known
    return known


@dataclass(frozen=True, slots=True)
class _Count:
    """How a request is measured: texts counted by ``text``; media by figures."""

    text: Callable[[str], int]
    image: int
    image_low: int

    def json(self, value: object) -> int:
        return self.text(_dumps(value))


def _family(model: object) -> str:
    """Return the bare, lower-case model name (no ``ft:``, no ``provider/``)."""
    name = str(model or "").strip().lower()
    name = name.removeprefix("ft:")
    return name.rsplit("/", 1)[-1]


@lru_cache(maxsize=256)
def _openai_images(model: str) -> tuple[int, int]:
    family = _family(model)
    for prefix, high, low in _OPENAI_IMAGES:
        if family.startswith(prefix):
            return high, low
    if "-mini" in family or "-nano" in family:
        return _PATCH_IMAGE_TOKENS, _PATCH_IMAGE_TOKENS
    return OPENAI_IMAGE_TOKENS, OPENAI_IMAGE_LOW_TOKENS


def _openai_count(model: object, text: Callable[[str], int] = _utf8_len) -> _Count:
    if text is _utf8_len:
        return _openai_bytes(str(model or ""))
    high, low = _openai_images(str(model or ""))
    return _Count(text, high, low)


@lru_cache(maxsize=256)
def _openai_bytes(model: str) -> _Count:
    """The byte-bound measure of a model's requests (built once per model)."""
    high, low = _openai_images(model)
    return _Count(_utf8_len, high, low)


_ANTHROPIC_BYTES: Final = _Count(
    _utf8_len, ANTHROPIC_IMAGE_TOKENS, ANTHROPIC_IMAGE_TOKENS
)


# -- walking -------------------------------------------------------------------


def _walk(count: _Count, value: object) -> int:
    """Return the tokens of any JSON-like value: its strings, media by figure."""
    cls = type(value)  # exact types first: no isinstance walk (ABCs) for them
    if cls is str:
        return count.text(value)  # type: ignore[arg-type]
    if cls is dict:
        return _mapping(count, value)  # type: ignore[arg-type]
    if cls is list or cls is tuple:
        return _items(count, value)  # type: ignore[arg-type]
    return _walk_other(count, value)


def _walk_other(count: _Count, value: object) -> int:
    """``_walk`` of subclasses (of str, list...), any Mapping, and non-JSON values."""
    if isinstance(value, str):
        return count.text(value)
    if isinstance(value, Mapping):
        return _mapping(count, value)
    if isinstance(value, list | tuple):
        return _items(count, value)
    return 0


def _mapping(count: _Count, value: Mapping[str, Any]) -> int:
    """A block of a known ``type`` by its handler, else its strings."""
    kind = value.get("type")
    if kind is not None and isinstance(kind, str):
        handler = _BLOCKS.get(kind)
        if handler is not None:
            return handler(count, value)
    text = count.text
    total = 0
    for k, v in value.items():
        if k not in _NOT_TEXT:
            total += text(v) if type(v) is str else _walk(count, v)
    return total


def _items(count: _Count, values: list[Any] | tuple[Any, ...]) -> int:
    text = count.text
    total = 0
    for v in values:
        total += text(v) if type(v) is str else _walk(count, v)
    return total


def _image(count: _Count, block: Mapping[str, Any]) -> int:
    detail = block.get("detail")
    inner = block.get("image_url")
    if isinstance(inner, Mapping):
        detail = inner.get("detail", detail)
    return count.image_low if detail == "low" else count.image


def _document(count: _Count, block: Mapping[str, Any]) -> int:
    """A PDF or file counts ``DOCUMENT_TOKENS``; a plain-text document its text."""
    source = block.get("source")
    if isinstance(source, Mapping) and source.get("type") in ("text", "content"):
        inner = (
            source.get("data")
            if source.get("type") == "text"
            else source.get("content")
        )
        # title, context and the like: the model reads them too
        extra = sum(
            _walk(count, v)
            for k, v in block.items()
            if k != "source" and k not in _NOT_TEXT
        )
        return _walk(count, inner) + extra
    return DOCUMENT_TOKENS


def _audio(_count: _Count, block: Mapping[str, Any]) -> int:
    inner = block.get("input_audio")
    data = inner.get("data") if isinstance(inner, Mapping) else None
    if not isinstance(data, str):
        return DOCUMENT_TOKENS  # referenced, not inlined: size unknown
    decoded_kb = len(data) * 3 // 4 / 1000
    return int(decoded_kb * AUDIO_TOKENS_PER_KB) + 1


def _tool_use(count: _Count, block: Mapping[str, Any]) -> int:
    """Anthropic's ``input`` is an object: count its JSON, keys and numbers too."""
    return sum(
        count.json(v) if k == "input" else _walk(count, v)
        for k, v in block.items()
        if k not in _NOT_TEXT
    )


_Block = Callable[[_Count, Mapping[str, Any]], int]
_BLOCKS: Final[dict[str, _Block]] = {
    **dict.fromkeys(
        ("image_url", "input_image", "image", "computer_screenshot"), _image
    ),
    **dict.fromkeys(("file", "input_file", "document"), _document),
    "input_audio": _audio,
    **dict.fromkeys(("tool_use", "server_tool_use", "mcp_tool_use"), _tool_use),
}


def _tools(count: _Count, tools: object, per_request: int) -> int:
    """Tool definitions, by their JSON's UTF-8 bytes even on the exact path.

    The provider renders them in a form of its own (OpenAI's TypeScript-like
    ``namespace functions``), which can take more tokens than their JSON: an
    enum of 3,000 values, 17,035 against the JSON's 14,102. Bytes bound both.
    """
    del count  # not tokenized: see above
    if not tools:
        return 0
    if not isinstance(tools, list | tuple):
        return per_request + TOOL_TOKENS + _utf8_len(_dumps(tools)) + _builtin(tools)
    return per_request + sum(
        TOOL_TOKENS + _utf8_len(_dumps(tool)) + _builtin(tool) for tool in tools
    )


def _builtin(tool: object) -> int:
    """What a provider adds for a typed tool of its own, beyond its definition.

    Anthropic's bash, text editor, computer use; OpenAI's built-in tools.
    """
    if not isinstance(tool, Mapping):
        return 0
    kind = tool.get("type")
    if not isinstance(kind, str) or kind in {"custom", "function"}:
        return 0
    return BUILTIN_TOOL_TOKENS


def _messages(count: _Count, messages: object) -> int:
    if not isinstance(messages, list | tuple):
        return MESSAGE_TOKENS + _walk(count, messages)
    text = count.text
    utf8 = text is _utf8_len
    total = MESSAGE_TOKENS * len(messages)
    for message in messages:
        # The common message, a dict without a block ``type``: inline.
        if type(message) is not dict or "type" in message:
            total += _walk(count, message)
            continue
        if "name" in message:
            total += 1  # OpenAI's framing: 1 more for a named message
        for k, v in message.items():
            if k in _NOT_TEXT:
                continue
            if type(v) is str:
                total += len(v) if utf8 and v.isascii() else text(v)
            else:
                total += _walk(count, v)
    return total


def _chat(count: _Count, body: Mapping[str, Any]) -> int:
    total = REQUEST_TOKENS
    for key, value in body.items():
        # Parameters first (no special key below is one), then placeholders.
        if key in _NOT_PROMPT or (
            type(value) not in _JSON_EXACT and not _is_json(value)
        ):
            continue
        if key == "messages":
            total += _messages(count, value)
        elif key in ("tools", "functions"):
            total += _tools(count, value, OPENAI_TOOLS_TOKENS)
        elif key == "response_format":
            total += SCHEMA_TOKENS + count.json(value)
        else:
            total += _walk(count, value)
    return total


def _responses(count: _Count, body: Mapping[str, Any]) -> int:
    total = REQUEST_TOKENS
    for key, value in body.items():
        # Parameters first (no special key below is one), then placeholders.
        if key in _NOT_PROMPT or (
            type(value) not in _JSON_EXACT and not _is_json(value)
        ):
            continue
        if key in ("input", "instructions"):
            total += _messages(count, value)
        elif key == "tools":
            total += _tools(count, value, OPENAI_TOOLS_TOKENS)
        elif key == "text":
            if isinstance(value, Mapping) and value.get("format") is not None:
                total += SCHEMA_TOKENS + count.json(value["format"])
        else:
            total += _walk(count, value)
    return total


def _anthropic(count: _Count, body: Mapping[str, Any]) -> int:
    total = REQUEST_TOKENS
    for key, value in body.items():
        # Parameters first (no special key below is one), then placeholders.
        if key in _NOT_PROMPT or (
            type(value) not in _JSON_EXACT and not _is_json(value)
        ):
            continue
        if key == "system":
            total += MESSAGE_TOKENS + _walk(count, value)
        elif key == "messages":
            total += _messages(count, value)
        elif key == "tools":
            total += _tools(count, value, ANTHROPIC_TOOLS_TOKENS)
        elif key == "output_format":
            total += SCHEMA_TOKENS + count.json(value)
        else:
            total += _walk(count, value)
    return total


def plain_bound(  # noqa: C901, PLR0911, PLR0912 - one function, on purpose
    body: Mapping[str, Any], system_tokens: int | None = None
) -> tuple[int, int | None] | None:
    """``(input bound, request's output cap)`` of the commonest body, or None.

    The commonest body: ``messages``, a list of dicts of str values without a
    block ``type``; every other key a parameter (or an SDK placeholder, or
    with ``system_tokens`` an Anthropic ``system`` str, counted that much more
    than its text); ``n`` absent. There the input bound equals
    ``chat_input_bound`` (``system_tokens=None``) or ``messages_input_bound``
    (``MESSAGE_TOKENS``), and the cap is ``output_cap``'s before the model's
    default (None: the request sets none); a property test holds them
    together. None: any other body, for them to measure. One small function,
    as the SDK layer's hot path runs it from cold CPU caches, where each
    function and module global it touches costs a cache miss.
    """
    total = REQUEST_TOKENS
    cap = None
    not_prompt = _PLAIN_PARAMS
    for key, value in body.items():
        if key == "messages":
            if type(value) is not list:
                return None
            total += MESSAGE_TOKENS * len(value)
            for message in value:
                if type(message) is not dict or "type" in message:
                    return None
                if "name" in message:
                    total += 1  # OpenAI's framing: 1 more for a named message
                for k, v in message.items():
                    if type(v) is not str:
                        if k in _NOT_TEXT:
                            continue
                        return None
                    if k not in _NOT_TEXT:
                        total += len(v) if v.isascii() else _utf8_len(v)
        elif key in not_prompt:
            if key in _CAP_FIELD_SET and value is not None:
                if type(value) is not int or value < 0:
                    return None
                if cap is None or value > cap:
                    cap = value
            elif key == "n" and value is not None:
                return None
        elif key == "system" and system_tokens is not None and type(value) is str:
            total += system_tokens + _utf8_len(value)
        elif type(value) in _JSON_EXACT or _is_json(value):
            return None  # some other prompt-bearing key: the full walk
    return total, cap


def plain_tokens(
    model: str, body: Mapping[str, Any], system_tokens: int | None = None
) -> tuple[int, int] | None:
    """``(input bound, output cap)`` of the commonest body (see ``plain_bound``).

    None: any other body. The output cap is the model's default when the
    request sets none, as ``output_cap`` has it.
    """
    plain = plain_bound(body, system_tokens)
    if plain is None:
        return None
    bound, cap = plain
    return bound, default_output_cap(model) if cap is None else cap


def plain_estimate(
    provider: str,
    model: str,
    body: Mapping[str, Any],
    system_tokens: int | None = None,
) -> Estimate | None:
    """The ``Estimate`` of the commonest body (see ``plain_tokens``), or None."""
    plain = plain_tokens(model, body, system_tokens)
    if plain is None:
        return None
    return make_estimate(provider, model, plain[0], plain[1])


def chat_input_bound(body: Mapping[str, Any], model: str | None = None) -> int:
    """Return an upper bound of the input tokens of an OpenAI chat completion.

    Args:
        body: The request body, as the SDK sends it (``messages``, ``tools``...).
        model: ``str(body.get("model") or "")`` when the caller has it already.

    Returns:
        UTF-8 bytes of every text plus the allowances in the module docstring.
    """
    if model is None:
        return _chat(_openai_count(body.get("model")), body)
    return _chat(_openai_bytes(model), body)


def responses_input_bound(body: Mapping[str, Any], model: str | None = None) -> int:
    """Return an upper bound of the input tokens of an OpenAI Responses request.

    Args:
        body: The request body (``input``, ``instructions``, ``tools``, ``text``...).
        model: ``str(body.get("model") or "")`` when the caller has it already.

    Returns:
        UTF-8 bytes of every text plus the allowances in the module docstring.
    """
    if model is None:
        return _responses(_openai_count(body.get("model")), body)
    return _responses(_openai_bytes(model), body)


def messages_input_bound(body: Mapping[str, Any]) -> int:
    """Return an upper bound of the input tokens of an Anthropic messages request.

    Args:
        body: The request body (``system``, ``messages``, ``tools``...).

    Returns:
        UTF-8 bytes of every text plus the allowances in the module docstring.
    """
    return _anthropic(_ANTHROPIC_BYTES, body)


# Completions body keys read below or carrying no prompt (besides _NOT_PROMPT).
_COMPLETIONS_KEYS: Final = frozenset({"prompt", "suffix", "best_of", "echo"})


def _completion_prompts(body: Mapping[str, Any]) -> list[object]:
    """The prompts of a Completions body: the API generates each on its own.

    A string, a list of token ids (every item an int) or nothing is one
    prompt; any other list is a list of prompts (strings or token-id lists).
    """
    prompt = body.get("prompt")
    if (
        isinstance(prompt, list | tuple)
        and prompt
        and not all(type(item) is int for item in prompt)
    ):
        return list(prompt)
    return [prompt if _is_json(prompt) else None]


def _prompt_tokens(count: _Count, prompt: object) -> int:
    """A bound of one prompt: its UTF-8 bytes, one per token id."""
    if prompt is None or not _is_json(prompt):
        return 0
    if isinstance(prompt, str):
        return count.text(prompt)
    if isinstance(prompt, list | tuple):
        return sum(1 if type(item) is int else count.json(item) for item in prompt)
    if type(prompt) is int:
        return 1
    return count.json(prompt)


def completions_input_bound(body: Mapping[str, Any], model: str | None = None) -> int:
    """Return an upper bound of the input tokens of an OpenAI (legacy) completion.

    Args:
        body: The request body (``prompt``, ``suffix``...).
        model: ``str(body.get("model") or "")`` when the caller has it already.

    Returns:
        Per prompt its UTF-8 bytes (a token id counts 1), ``suffix``'s and
        ``REQUEST_TOKENS``; plus the strings under keys this module does not
        know, as for chat.
    """
    count = _openai_bytes(str(body.get("model") or "") if model is None else model)
    suffix = body.get("suffix")
    per_prompt = REQUEST_TOKENS + (
        _walk(count, suffix) if suffix is not None and _is_json(suffix) else 0
    )
    total = sum(
        per_prompt + _prompt_tokens(count, prompt)
        for prompt in _completion_prompts(body)
    )
    for key, value in body.items():
        if key in _NOT_PROMPT or key in _COMPLETIONS_KEYS or not _is_json(value):
            continue
        total += _walk(count, value)
    return total


# -- exact counting with tiktoken, offline only --------------------------------


@dataclass(frozen=True, slots=True)
class _EncodingFile:
    """Where tiktoken downloads an encoding from, its hash, and how to build it."""

    url: str
    sha256: str
    build: Callable[[str], Encoding]


def _from_registry(name: str) -> Callable[[str], Encoding]:
    def build(_path: str) -> Encoding:
        import tiktoken  # noqa: PLC0415 - 17 ms, only when counting exactly

        return tiktoken.get_encoding(name)

    return build


_BLOBS: Final = "https://openaipublic.blob.core.windows.net/encodings/"
# URLs and hashes as in tiktoken_ext/openai_public.py (tiktoken 0.14).
_ENCODING_FILES: dict[str, _EncodingFile] = {
    "o200k_base": _EncodingFile(
        _BLOBS + "o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _from_registry("o200k_base"),
    ),
    "cl100k_base": _EncodingFile(
        _BLOBS + "cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _from_registry("cl100k_base"),
    ),
}
# (prefix of the bare model name, encoding), first match wins.
_ENCODING_BY_PREFIX: list[tuple[str, str]] = [
    ("gpt-4o", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),
]
_loaded: dict[tuple[str, str], Encoding] = {}
_load_lock = threading.Lock()


def _tiktoken_cache_path(url: str) -> str | None:
    """Return where tiktoken caches ``url`` (its ``load.read_file_cached`` rule).

    None when caching is disabled (``TIKTOKEN_CACHE_DIR=""``): tiktoken would
    then always download.
    """
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")  # noqa: PTH118 - as tiktoken
    if not cache_dir:
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())  # noqa: PTH118, S324 - tiktoken's cache key


def _encoding_for(model: str) -> str | None:
    family = _family(model)
    for prefix, name in _ENCODING_BY_PREFIX:
        if family.startswith(prefix):
            return name
    return None


def _is_intact(path: str, sha256: str) -> bool:
    """Return True when ``path`` exists and hashes to ``sha256``.

    tiktoken deletes a cached file with the wrong hash and downloads it again:
    that must never happen here.
    """
    try:
        with open(path, "rb") as file:  # noqa: PTH123 - a plain read
            data = file.read()
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest() == sha256


def _load_encoding(name: str) -> Encoding | None:
    """Return the encoding if its file is cached and intact, else None (no download)."""
    source = _ENCODING_FILES.get(name)
    path = _tiktoken_cache_path(source.url) if source is not None else None
    if source is None or path is None:
        return None
    key = (name, path)
    encoding = _loaded.get(key)
    if encoding is None:
        with _load_lock:
            encoding = _loaded.get(key)
            if encoding is None and _is_intact(path, source.sha256):
                encoding = _loaded[key] = source.build(path)
    return encoding


def exact_input_tokens(
    provider: str, model: str, body: Mapping[str, Any]
) -> int | None:
    """Count the input tokens of an OpenAI request with tiktoken, if possible offline.

    Texts are counted exactly; media, framing and tools get the same
    allowances as the bound. Use it only when the bound changes a decision:
    it costs about 0.13 ms per 1,000 tokens (and ~0.5 s to load an encoding
    the first time).

    Args:
        provider: ``"openai"`` or ``"azure"``; any other provider gives None.
        model: The model asked for; its family picks the encoding.
        body: A chat completions (``messages``) or Responses (``input``) body.

    Returns:
        The count, or None when the provider has no local tokenizer, the
        encoding file is not in tiktoken's cache, or the body is not understood.
        Never raises and never touches the network.
    """
    try:
        if provider not in ("openai", "azure") or not isinstance(body, Mapping):
            return None
        name = _encoding_for(model)
        encoding = _load_encoding(name) if name is not None else None
        if encoding is None:
            return None

        encode = encoding.encode_ordinary

        def text(value: str) -> int:
            return len(encode(value))

        count = _openai_count(model, text)
        if "messages" in body:
            return _chat(count, body)
        if "input" in body or "instructions" in body:
            return _responses(count, body)
    except Exception:  # noqa: BLE001 - documented: an odd body gives None, never an error
        return None
    return None


# -- output cap ----------------------------------------------------------------


def _tokens_field(body: Mapping[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(
            field, value, "a non-negative integer number of tokens"
        )
    return value


_CAP_FIELDS: Final = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_CAP_FIELD_SET: Final = frozenset(_CAP_FIELDS)


@lru_cache(maxsize=256)
def default_output_cap(model: str) -> int:
    """Return the largest output of ``model``'s family (see the module docstring)."""
    family = _family(model)
    for prefix, cap in _OUTPUT_CAPS:
        if family.startswith(prefix):
            return cap
    return DEFAULT_OUTPUT_TOKENS


def output_cap(provider: str, model: str, body: Mapping[str, Any]) -> int:
    """Return the most output tokens the request can produce.

    The request's own cap (``max_completion_tokens``, ``max_tokens`` or
    ``max_output_tokens``; the largest when several are given) times ``n``
    (chat choices), or the model family's largest output.

    Args:
        provider: The provider id (unused for now: model names decide).
        model: The model asked for.
        body: The request body.

    Raises:
        ConfigurationError: A cap or ``n`` is negative, a bool, or not an int.
    """
    del provider
    cap = None
    for field in _CAP_FIELDS:
        value = body.get(field)
        if value is None:
            continue
        if type(value) is not int or value < 0:
            value = _tokens_field(body, field)  # raises unless an int subclass
            if value is None:  # pragma: no cover - checked above
                continue
        if cap is None or value > cap:
            cap = value
    choices = body.get("n")
    if choices is None:
        choices = 1
    elif isinstance(choices, bool) or not isinstance(choices, int) or choices < 1:
        raise ConfigurationError(
            what="n", value=choices, expected="a positive integer number of choices"
        )
    return (default_output_cap(model) if cap is None else cap) * choices


_ABSENT: Final = object()  # a key not in the body


def completions_output_cap(model: str, body: Mapping[str, Any]) -> int:
    """Return the most output tokens an OpenAI (legacy) completion can produce.

    ``max_tokens`` (16 when absent, as the API; the model family's largest
    output when null) times ``max(n, best_of)`` (``best_of`` candidates are
    generated and billed, ``n`` returned) times the number of prompts.

    Args:
        model: The model asked for.
        body: The request body.

    Raises:
        ConfigurationError: ``max_tokens`` is negative, a bool or not an int;
            ``n`` or ``best_of`` is not a positive int.
    """
    value = body.get("max_tokens", _ABSENT)
    if value is _ABSENT or not _is_json(value):  # not sent
        cap = COMPLETIONS_MAX_TOKENS
    elif value is None:
        cap = default_output_cap(model)
    else:
        cap = _tokens_field(body, "max_tokens") or 0
    choices = 1
    for field in ("n", "best_of"):
        value = body.get(field)
        if value is None or not _is_json(value):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(
                what=field,
                value=value,
                expected="a positive integer number of choices",
            )
        choices = max(choices, value)
    return cap * choices * len(_completion_prompts(body))


# -- convenience ---------------------------------------------------------------


def estimate(provider: str, api: str, model: str, body: Mapping[str, Any]) -> Estimate:
    """Return the worst case of a request: input bound and output cap.

    Args:
        provider: The provider id.
        api: ``"chat"``, ``"responses"`` or ``"messages"``.
        model: The model asked for.
        body: The request body, as the SDK sends it.

    Raises:
        ConfigurationError: ``api`` is unknown, or a cap is malformed.

    Example:
        >>> estimate("openai", "chat", "gpt-4o", {"messages": [...], "max_tokens": 500})
    """
    if api == "chat":
        bound = _chat(_openai_count(model), body)
    elif api == "responses":
        bound = _responses(_openai_count(model), body)
    elif api == "messages":
        bound = _anthropic(_ANTHROPIC_BYTES, body)
    else:
        raise ConfigurationError(
            what="api", value=api, expected='"chat", "responses" or "messages"'
        )
    return make_estimate(provider, model, bound, output_cap(provider, model, body))
