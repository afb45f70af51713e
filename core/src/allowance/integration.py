"""What a framework adapter needs from the core, in one public place.

A framework adapter (LangChain, CrewAI, LlamaIndex, or a third party's) sees
model calls with rich attribution (run, agent, task, query) but often cannot
degrade the model or read exact usage; the SDK layer beneath sees the bytes.
The contract, one call charged once:

- A call to a provider whose SDK ``allowance`` patches (``sdk_layer(provider)``
  returns True): enter ``allowance.seen_by(name, guard=guard, **dimensions)``
  around it. The SDK layer estimates, reserves (and blocks, and degrades)
  against ``guard`` and commits the provider's exact usage.
- Any other call: estimate it (``estimate_chat``), ``guard.begin(estimate)``
  before it is sent (``BudgetExceeded`` blocks it), enter
  ``seen_by(name, guard=guard, charged=True, **dimensions)`` so no SDK layer
  charges it again, and settle the ticket with the framework's usage. Read
  its counts with ``whole_count``: one that cannot be read (missing, null,
  text) makes the usage unknown, ``ticket.keep()``, not zero. A call that
  raised: ``ticket.release()`` only when ``provider_did_no_work(err)``,
  else ``ticket.keep(outcome="error")`` (a timeout, a dropped connection, an
  unknown error: the provider may have billed). A stream broken off:
  ``commit_partial`` with what it produced, or ``keep`` when that is unknown.
- A framework call that returns a stream which sends its request when first
  iterated, after the adapter's code has returned: ``seen.bind(stream)``.
  The route stays set in the caller's context but is in force only while
  the stream runs; ``seen.end()`` once its request is sent.

An adapter that takes ``wrap``-style budget arguments builds its guard with
``make_guard`` (the same checks and messages as ``wrap`` and ``patch``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from allowance import plugins
from allowance._errors import ConfigurationError
from allowance._estimate import estimate as _estimate
from allowance._estimate import whole_count
from allowance._failure import provider_did_no_work
from allowance._scope import current_adapters, current_route, seen_by
from allowance._wrap import make_guard

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from allowance.typing import Estimate

__all__ = [
    "SDK_PROVIDERS",
    "current_adapters",
    "current_route",
    "estimate_chat",
    "make_guard",
    "provider_did_no_work",
    "sdk_layer",
    "seen_by",
    "whole_count",
]

SDK_PROVIDERS: Mapping[str, str] = {
    "openai": "openai",
    "azure": "openai",
    "azure_openai": "openai",
    "anthropic": "anthropic",
}
"""Provider id (as frameworks name it) -> the SDK adapter that sees its calls."""


def sdk_layer(provider: str) -> bool:
    """Make sure the SDK layer for ``provider`` is hooked; return True if it is.

    Hooks the SDK adapter class-wide if ``patch()`` has not (calls then pass
    through untouched unless routed with ``seen_by(guard=...)``). Cheap once
    hooked: call it for every model call. Returns False for a provider whose
    SDK ``allowance`` does not patch, an SDK that is not installed in a
    supported version, or an adapter disabled with
    ``ALLOWANCE_DISABLED_ADAPTERS``: then the framework adapter charges the
    call itself.

    Args:
        provider: ``"openai"``, ``"azure"``, ``"anthropic"``, or any other id.
    """
    name = SDK_PROVIDERS.get(provider.lower())
    if name is None:
        return False
    adapter = plugins.adapters().get(name)
    if getattr(adapter, "hooked", False) is True:
        return True  # the per-call case: no version check again
    hook = getattr(adapter, "hook", None)
    if adapter is None or hook is None or not adapter.available():
        return False
    hook()
    return True


def estimate_chat(
    provider: str,
    model: str,
    messages: Iterable[Mapping[str, Any] | str],
    *,
    max_output_tokens: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> Estimate:
    """Return the worst case of a chat call made through a framework.

    The input bound is the same as the SDK layer's (UTF-8 bytes of every text
    plus per-message framing; media count a documented constant each); the
    output cap is ``max_output_tokens`` or the model family's largest output.

    Args:
        provider: The provider id the price table knows (``"google"``...).
        model: The model asked for.
        messages: Chat messages as ``{"role": ..., "content": ...}`` mappings
            (content a string or a list of content blocks), or plain strings.
        max_output_tokens: The call's output cap, if it has one.
        tools: Tool definitions sent with the call (JSON-like mappings).

    Raises:
        ConfigurationError: ``model`` is empty, or ``max_output_tokens`` is not
            a non-negative int.

    Example:
        >>> estimate_chat("google", "gemini-2.0-flash",
        ...               [{"role": "user", "content": "Hello"}],
        ...               max_output_tokens=100).output_tokens
        100
    """
    if not model:
        raise ConfigurationError("model", model, "a non-empty model name")
    body: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": m} if isinstance(m, str) else m
            for m in messages
        ]
    }
    if max_output_tokens is not None:
        body["max_tokens"] = max_output_tokens
    if tools:
        body["tools"] = list(tools)
    return _estimate(provider, "chat", model, body)
