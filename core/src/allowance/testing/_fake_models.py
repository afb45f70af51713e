"""The fake provider's data model: usage, scripted replies, logged requests.

Token conventions follow :mod:`allowance.typing`: ``FakeUsage.input_tokens``
includes cache reads and writes and ``output_tokens`` includes reasoning. The
wire formats (:mod:`allowance.testing._fake_wire`) turn a resolved
:class:`Generation` into what each API sends.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allowance._errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "DEFAULT_TEXT",
    "GENERATION_ROUTES",
    "FakeReply",
    "FakeRequest",
    "FakeUsage",
    "Generation",
    "route_of",
]

DEFAULT_TEXT = "Hello from the fake provider."
GENERATION_ROUTES = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/responses",
        "/responses/compact",
        "/messages",
    }
)
"""Routes (without the ``/v1`` prefix) that generate text and consume replies."""
COMPLETIONS_MAX_TOKENS = 16
"""The legacy Completions API's ``max_tokens`` when the request gives none."""

_TEXT_KEYS = ("messages", "system", "input", "instructions", "prompt", "suffix")
_NESTED_TEXT_KEYS = ("content", "text", "output")
_MAX_TOKEN_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_OK = 200
_ERRORS = range(400, 600)
_WORD = re.compile(r"\s*\S+")


@dataclass(frozen=True, slots=True)
class FakeUsage:
    """Token counts the fake provider reports, in allowance's convention.

    Attributes:
        input_tokens: All input tokens, cache reads and cache writes included.
        output_tokens: All output tokens, reasoning included.
        cached_tokens: Input tokens read from the prompt cache.
        cache_write_tokens: Input tokens written to the prompt cache.
        reasoning_tokens: Output tokens spent on reasoning.

    Anthropic responses report ``input_tokens - cached_tokens -
    cache_write_tokens`` as their ``input_tokens``, as the real API does; the
    OpenAI shapes report ``input_tokens`` unchanged.
    """

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    __module__ = "allowance.testing"

    def __post_init__(self) -> None:
        """Reject negative counts and breakdowns larger than their totals."""
        for name in (
            "input_tokens",
            "output_tokens",
            "cached_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(what=name, value=value, expected="an int >= 0")
        cache = self.cached_tokens + self.cache_write_tokens
        if cache > self.input_tokens:
            raise ConfigurationError(
                what="cached_tokens + cache_write_tokens",
                value=cache,
                expected=f"at most input_tokens ({self.input_tokens}), cache included",
            )
        if self.reasoning_tokens > self.output_tokens:
            raise ConfigurationError(
                what="reasoning_tokens",
                value=self.reasoning_tokens,
                expected=f"at most output_tokens ({self.output_tokens})",
            )

    @property
    def uncached_input_tokens(self) -> int:
        """Input tokens neither read from nor written to the cache (Anthropic's)."""
        return self.input_tokens - self.cached_tokens - self.cache_write_tokens

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeReply:
    """Scripted behaviour for one generation request (see ``FakeProvider.enqueue``).

    Every field is optional; ``None`` means "as the provider's defaults".

    Attributes:
        status: HTTP status. 200 is a normal answer; 400-599 answer with the
            provider's JSON error body (429 also sends ``retry-after: 0``).
        usage: The usage to report instead of the computed one.
        text: The answer's text (one word per stream chunk).
        latency: Seconds to wait before answering.
        omit_usage: Send no usage object and no usage event or chunk. (The
            real Anthropic API always reports usage; anthropic's
            ``messages.stream()`` helper fails on a stream without it, the raw
            ``create(stream=True)`` events do not.)
        truncate_after: Streams: close the connection after this many content
            events, without the final events. Non-streams: close the
            connection without any response.
        model: The model to report (default: the request's).
        tool_calls: ``(name, arguments_json)`` pairs answered as tool calls in
            the provider's format. With ``tool_calls`` and no ``text`` the
            answer carries no text.
    """

    status: int | None = None
    usage: FakeUsage | None = None
    text: str | None = None
    latency: float | None = None
    omit_usage: bool = False
    truncate_after: int | None = None
    model: str | None = None
    tool_calls: Sequence[tuple[str, str]] | None = None

    __module__ = "allowance.testing"

    def __post_init__(self) -> None:
        """Reject values the fake cannot act on."""
        status = self.status
        if (
            status is not None
            and status != _OK
            and not _ERRORS.start <= status < _ERRORS.stop
        ):
            raise ConfigurationError(
                what="status", value=status, expected="200 or 400-599"
            )
        if self.latency is not None and not self.latency >= 0:
            raise ConfigurationError(
                what="latency", value=self.latency, expected="seconds >= 0"
            )
        if self.truncate_after is not None and self.truncate_after < 0:
            raise ConfigurationError(
                what="truncate_after", value=self.truncate_after, expected="an int >= 0"
            )
        for name, arguments in self.tool_calls or ():
            try:
                json.loads(arguments)
            except (TypeError, ValueError) as err:
                raise ConfigurationError(
                    what=f"tool_calls[{name!r}]",
                    value=arguments,
                    expected="arguments as a JSON string",
                ) from err


@dataclass(frozen=True, slots=True)
class FakeRequest:
    """One HTTP request the fake provider received.

    Attributes:
        method: ``"GET"``, ``"POST"``...
        path: The path without the query string, e.g. ``"/v1/messages"``.
        query: The query parameters, e.g. ``{"beta": "true"}``.
        headers: The headers, names in lower case.
        json: The decoded JSON body, or ``None`` without a valid one.
    """

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    json: Any

    __module__ = "allowance.testing"

    @property
    def route(self) -> str:
        """The path without a ``/v1`` prefix or trailing slash (``"/messages"``)."""
        return route_of(self.path)

    @property
    def is_generation(self) -> bool:
        """Whether this request generates: see ``GENERATION_ROUTES``."""
        return self.method == "POST" and self.route in GENERATION_ROUTES

    @property
    def model(self) -> str | None:
        """The body's ``model`` field, if it is a string."""
        model = self._field("model")
        return model if isinstance(model, str) else None

    @property
    def stream(self) -> bool:
        """Whether the body asks for a stream (``"stream": true``)."""
        return self._field("stream") is True

    @property
    def max_tokens(self) -> int | None:
        """The output limit asked for, or ``None``.

        ``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``,
        whichever comes first.
        """
        for key in _MAX_TOKEN_KEYS:
            value = self._field(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    @property
    def text(self) -> str:
        """All text of the request, joined by newlines.

        The strings under ``messages``, ``system``, ``input``, ``instructions``,
        ``prompt`` and ``suffix``; inside objects only ``content``, ``text`` and
        ``output`` values count, so roles, types, ids, tool definitions and
        images do not.
        """
        parts: list[str] = []
        for key in _TEXT_KEYS:
            _collect_text(self._field(key), parts)
        return "\n".join(parts)

    @property
    def input_tokens(self) -> int:
        """The default input token count: ``max(1, ceil(utf8_bytes(text) / 4))``."""
        return max(1, math.ceil(len(self.text.encode()) / 4))

    def _field(self, key: str) -> Any:
        return self.json.get(key) if isinstance(self.json, dict) else None


@dataclass(frozen=True, slots=True)
class Generation:
    """One generation request's answer, resolved from defaults and a reply."""

    ident: str
    created: int
    model: str
    pieces: tuple[str, ...]
    """Words with their leading whitespace; one per stream content event."""
    cut: bool
    """Whether the request's max tokens cut the text short."""
    tool_calls: tuple[tuple[str, str], ...]
    usage: FakeUsage | None
    """``None`` when the usage is to be omitted."""
    service_tier: str = "default"
    """OpenAI's tier that served it: the request's, or ``"default"`` (``auto``)."""

    @classmethod
    def resolve(
        cls,
        request: FakeRequest,
        *,
        reply: FakeReply | None,
        text: str,
        usage: FakeUsage | Callable[[FakeRequest], FakeUsage] | None,
        ident: str,
        created: int,
    ) -> Generation:
        """Work out what to answer: the reply's fields, else the defaults.

        Output tokens default to the words sent (after the max-tokens cut) plus
        ``ceil(utf8_bytes(arguments) / 4)`` (at least 1) per tool call. A
        ``/completions`` request without ``max_tokens`` is cut at 16 words, as
        the API's default.
        """
        if reply is not None and reply.text is not None:
            text = reply.text
        tool_calls = tuple(reply.tool_calls or ()) if reply is not None else ()
        if tool_calls and (reply is None or reply.text is None):
            text = ""
        pieces = tuple(_WORD.findall(text))
        limit = request.max_tokens
        if limit is None and request.route == "/completions":
            body = request.json if isinstance(request.json, dict) else {}
            if "max_tokens" not in body:
                limit = COMPLETIONS_MAX_TOKENS
        cut = limit is not None and len(pieces) > limit
        if limit is not None:
            pieces = pieces[: max(limit, 0)]
        resolved: FakeUsage | None
        if reply is not None and reply.omit_usage:
            resolved = None
        elif reply is not None and reply.usage is not None:
            resolved = reply.usage
        elif isinstance(usage, FakeUsage):
            resolved = usage
        elif usage is not None:
            resolved = usage(request)
        else:
            tool_tokens = sum(
                max(1, math.ceil(len(args.encode()) / 4)) for _, args in tool_calls
            )
            resolved = FakeUsage(request.input_tokens, len(pieces) + tool_tokens)
        model = (reply.model if reply is not None else None) or request.model
        tier = request._field("service_tier")  # noqa: SLF001 - its own module
        return cls(
            ident=ident,
            created=created,
            model=model or "fake-model",
            pieces=pieces,
            cut=cut,
            tool_calls=tool_calls,
            usage=resolved,
            service_tier=tier if tier in {"priority", "flex"} else "default",
        )

    @property
    def content(self) -> str:
        """The text sent."""
        return "".join(self.pieces)

    @property
    def has_text(self) -> bool:
        """Whether the answer has a text part (always, unless only tool calls)."""
        return bool(self.pieces) or not self.tool_calls


def route_of(path: str) -> str:
    """Return ``path`` without its query, ``/v1`` prefix and trailing slash."""
    path = path.partition("?")[0].rstrip("/")
    if path == "/v1" or path.startswith("/v1/"):
        path = path[3:]
    return path or "/"


def _collect_text(value: object, parts: list[str]) -> None:
    if isinstance(value, str):
        parts.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect_text(item, parts)
    elif isinstance(value, dict):
        for key in _NESTED_TEXT_KEYS:
            _collect_text(value.get(key), parts)
