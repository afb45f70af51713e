"""CrewAI's own LLM call hooks, routing every model call through one guard.

``install(guard)`` registers three global CrewAI hooks:

- a ``before_llm_call`` hook, run by the agent executor just before the model
  call, in the context where the request is made. It attributes the call
  (``crew``, ``agent``, ``task``, ``iteration``) and either enters
  ``allowance.seen_by(..., guard=guard)`` so the SDK layer beneath charges it
  exactly (CrewAI's native OpenAI and Anthropic LLMs), or reserves the call's
  worst case itself (every other LLM). A call refused here raises an exception
  that is both an ``allowance.BudgetExceeded`` and CrewAI's ``HookAborted``:
  CrewAI propagates it at once (no retry, no request) to the caller of
  ``kickoff``. A call the SDK layer refuses raises ``BudgetExceeded`` inside
  the model call, which CrewAI's agent retries: the before hook of that retry
  raises the refusal again as ``HookAborted``, so the crew stops there.
- an ``after_llm_call`` hook that settles what the before hook opened;
- an ``execution_end`` hook that settles whatever is still open when a crew
  finishes or fails (CrewAI skips after hooks for tool-call answers and for
  calls that raised), so no scope leaks into the caller's context.
"""

from __future__ import annotations

import logging
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from crewai.hooks.dispatch import HookAborted, InterceptionPoint, register, unregister
from crewai.hooks.llm_hooks import (
    register_after_llm_call_hook,
    register_before_llm_call_hook,
    unregister_after_llm_call_hook,
    unregister_before_llm_call_hook,
)

import allowance
from allowance import plugins
from allowance.integration import (
    current_adapters,
    current_route,
    estimate_chat,
    sdk_layer,
)
from allowance_crewai._compat import scope_value, sdk_provider

if TYPE_CHECKING:
    from collections.abc import Mapping

    from crewai.hooks.llm_hooks import LLMCallHookContext

__all__ = ["NAME", "CrewBudgetExceeded", "current_guard", "install", "uninstall"]

NAME: Final = "crewai"
"""The adapter's name: in ``allowance.patch(adapters=[...])`` and the call log."""

logger = logging.getLogger("allowance")

# Provider ids as CrewAI names them -> the ids allowance's price table knows.
_PROVIDER_IDS: Final[Mapping[str, str]] = {
    "gemini": "google",
    "google": "google",
    "vertex_ai": "google",
    "claude": "anthropic",
}


# BudgetExceeded is marked @final for type checkers; this is the one subclass the
# contract needs (see the class docstring). Runtime does not enforce @final.
class CrewBudgetExceeded(allowance.BudgetExceeded, HookAborted):
    """``allowance.BudgetExceeded`` raised from a CrewAI hook.

    Also a CrewAI ``HookAborted``, the one exception CrewAI lets out of a hook:
    the crew stops at once and the caller of ``kickoff`` catches it as
    ``allowance.BudgetExceeded``. Nothing was sent.
    """

    __module__ = "allowance_crewai"

    def __init__(
        self, error: allowance.BudgetExceeded | str, *, model: str = ""
    ) -> None:
        """Carry ``error``'s violations and model (or, from an event, its message)."""
        if isinstance(error, allowance.BudgetExceeded):
            allowance.BudgetExceeded.__init__(self, error.violations, model=error.model)
        else:  # the SDK layer refused this call before; its message says why
            allowance.BudgetExceeded.__init__(self, (), model=model)
            self.args = (error,)
        self.reason = str(self.args[0])
        self.source = NAME


class _RefusalObserver:
    """Remembers which agent's call the SDK layer just refused.

    The SDK layer raises ``BudgetExceeded`` inside the model call, which CrewAI's
    agent retries (``max_retry_limit`` times) as if it were a transient error.
    The before hook of such a retry raises ``CrewBudgetExceeded`` (a
    ``HookAborted``, which CrewAI never retries) instead: the crew stops after
    the first refusal, nothing is sent, one refusal is logged.

    It wants refusals only: the calls the SDK layer admits keep its express
    lane (an observer of every event would send them the full way).
    """

    allowance_event_kinds = frozenset({"blocked"})

    @allowance.hookimpl
    def allowance_event(self, event: allowance.Event) -> None:
        """Remember a refusal (or stop) of a call this adapter routed to the SDK."""
        if event.kind != "blocked":
            return
        entry = _open.get()
        route = current_route()
        if entry is None or entry.key is None or entry.ticket is not None:
            return  # not an agent's call this adapter routed to the SDK layer
        if route is None or route[1] or NAME not in current_adapters():
            return
        violations = _violations(event.data.get("violations", ()))
        _refused[entry.key] = _Refusal(
            str(event.data.get("message", "")),
            str(event.data.get("model", "")),
            violations,
            stopped=event.data.get("outcome") == "stopped",
        )


def _violations(found: object) -> tuple[allowance.Violation, ...]:
    """The event's violations (objects or their dicts), or () if it has none."""
    if not isinstance(found, tuple | list):
        return ()
    try:
        return tuple(
            v if isinstance(v, allowance.Violation) else allowance.Violation(**v)
            for v in found
        )
    except TypeError:  # not violations after all
        return ()


@dataclass(frozen=True, slots=True)
class _Refusal:
    message: str
    model: str
    violations: tuple[allowance.Violation, ...]
    stopped: bool

    def error(self) -> HookAborted:
        """What the before hook of CrewAI's retry raises instead of sending."""
        if self.stopped:
            return _stop(self.message)
        if self.violations:
            return CrewBudgetExceeded(
                allowance.BudgetExceeded(self.violations, model=self.model)
            )
        return CrewBudgetExceeded(self.message, model=self.model)


def _stop(message: str) -> HookAborted:
    """What ``on_limit="stop"`` raises in a crew: CrewAI's deliberate stop."""
    return HookAborted(f"allowance stopped the crew: {message}", source=NAME)


_Key = tuple[int, int, int]
"""Identity of an agent's call: ``id()`` of its crew, agent and task objects."""


@dataclass(slots=True)
class _Open:
    """A call the before hook admitted and no hook has settled yet."""

    seen: allowance.seen_by
    thread: int
    key: _Key | None
    ticket: allowance.Ticket | None = None
    llm: Any = None
    before: tuple[int, int, int, int, int] | None = None


_lock = threading.Lock()
_guard: allowance.Guard | None = None
_open: ContextVar[_Open | None] = ContextVar("allowance_crewai_open", default=None)
_refused: dict[_Key, _Refusal] = {}
_observer = _RefusalObserver()
_OBSERVER_NAME: Final = "allowance_crewai.refusals"


def _call_key(ctx: Any) -> _Key | None:
    """Who makes this call (the same objects when CrewAI retries it), or None.

    Only an agent working on a task retries a failed call; a direct
    ``LLM.call`` has no key, so no refusal is remembered for it.
    """
    agent, task = getattr(ctx, "agent", None), getattr(ctx, "task", None)
    if agent is None or task is None:
        return None
    return (id(getattr(ctx, "crew", None)), id(agent), id(task))


def current_guard() -> allowance.Guard | None:
    """Return the guard calls are charged to, or None when not installed."""
    return _guard


def install(guard: allowance.Guard) -> None:
    """Charge every CrewAI model call to ``guard``; again: swap the guard.

    Executors copy CrewAI's global hook list when they are built: install
    before ``kickoff``. Crews built earlier are covered as long as their
    executors are built after (CrewAI builds them at ``kickoff``).

    Raises:
        ConfigurationError: ``guard`` is not an ``allowance.Guard``.
    """
    global _guard  # noqa: PLW0603 - one process-wide registration
    if not isinstance(guard, allowance.Guard):
        raise allowance.ConfigurationError("guard", guard, "an allowance.Guard")
    with _lock:
        if _guard is None:
            register_before_llm_call_hook(_before_llm_call)
            register_after_llm_call_hook(_after_llm_call)
            register(InterceptionPoint.EXECUTION_END, _execution_end)
            _observe(register=True)
        else:
            logger.debug(
                "allowance: adapter 'crewai' already installed; guard replaced"
            )
        _guard = guard


def uninstall() -> None:
    """Unregister the hooks; a no-op when not installed.

    Executors built while installed keep a copy of the hook list: the hooks
    they hold do nothing from now on.
    """
    global _guard  # noqa: PLW0603
    with _lock:
        if _guard is None:
            return
        _guard = None
        unregister_before_llm_call_hook(_before_llm_call)
        unregister_after_llm_call_hook(_after_llm_call)
        unregister(InterceptionPoint.EXECUTION_END, _execution_end)
        _observe(register=False)
        _refused.clear()


def _observe(*, register: bool) -> None:
    """(Un)register the refusal observer; tolerant of a plugin manager reset."""
    try:
        if register:
            plugins.register(_observer, name=_OBSERVER_NAME)
        else:
            plugins.unregister(_observer)
    except (ValueError, AssertionError, KeyError):  # already (un)registered
        logger.debug("allowance: crewai refusal observer already %s", register)


# -- the hooks ------------------------------------------------------------------


def _before_llm_call(ctx: LLMCallHookContext) -> None:
    # An entry still open here belongs to a call whose after hook CrewAI skipped
    # (a tool-call answer): settle it first.
    _settle(failed=False)
    guard = _guard
    if guard is None:
        return
    key = _call_key(ctx)
    refused = None if key is None else _refused.pop(key, None)
    if refused is not None:  # CrewAI retries a call the SDK layer refused
        raise refused.error()
    dims = dimensions(ctx)
    llm = ctx.llm
    provider = sdk_provider(llm)
    if provider is not None and sdk_layer(provider):
        seen = allowance.seen_by(NAME, guard=guard, **_kwargs(dims))
        seen.__enter__()
        _open.set(_Open(seen, threading.get_ident(), key))
        return
    _admit(guard, ctx, llm, dims)


def _admit(
    guard: allowance.Guard,
    ctx: LLMCallHookContext,
    llm: Any,
    dims: Mapping[str, str | int],
) -> None:
    """Reserve a call no SDK layer sees; the framework's usage settles it."""
    seen = allowance.seen_by(NAME, guard=guard, charged=True, **_kwargs(dims))
    seen.__enter__()
    try:
        estimate = estimate_chat(
            _provider_id(llm),
            str(getattr(llm, "model", "") or type(llm).__name__),
            [dict(m) for m in ctx.messages],
            max_output_tokens=_max_tokens(llm),
        )
        ticket = guard.begin(estimate, adapters=current_adapters())
    except allowance.BudgetExceeded as err:
        seen.__exit__(None, None, None)
        raise CrewBudgetExceeded(err) from err
    except allowance.AllowanceError as err:
        # CrewAI swallows any other exception a hook raises and sends the call:
        # fail closed instead (an unpriced model under a USD budget...).
        seen.__exit__(None, None, None)
        raise HookAborted(str(err), source=NAME) from err
    except BaseException:
        seen.__exit__(None, None, None)
        raise
    if ticket.stopped:
        seen.__exit__(None, None, None)
        raise _stop("; ".join(v.describe() for v in ticket.violations))
    _open.set(_Open(seen, threading.get_ident(), None, ticket, llm, _usage_of(llm)))


def _after_llm_call(ctx: LLMCallHookContext) -> None:
    _settle(failed=False)
    key = _call_key(ctx)
    if key is not None:
        _refused.pop(key, None)


def _execution_end(ctx: Any) -> None:
    _settle(failed=getattr(ctx, "status", "completed") == "failed")
    crew = id(getattr(ctx, "crew", None))
    for key in [k for k in _refused if k[0] == crew]:
        _refused.pop(key, None)


def _settle(*, failed: bool) -> None:
    """Settle and close the call the before hook opened in this context, if any."""
    entry = _open.get()
    if entry is None:
        return
    _open.set(None)
    try:
        if entry.ticket is not None:
            _settle_ticket(entry, failed=failed)
    finally:
        if entry.thread == threading.get_ident():
            try:
                entry.seen.__exit__(None, None, None)
            except (ValueError, RuntimeError):  # a copied context: the original resets
                logger.debug("allowance: crewai scope closed in another context")


def _settle_ticket(entry: _Open, *, failed: bool) -> None:
    ticket = entry.ticket
    if ticket is None or ticket.settled:
        return
    after = _usage_of(entry.llm)
    if entry.before is not None and after is not None:
        prompt, completion, cached, reasoning, created = (
            a - b for a, b in zip(after, entry.before, strict=True)
        )
        if prompt > 0 or completion > 0:
            ticket.commit(
                allowance.Usage(
                    input_tokens=prompt,
                    output_tokens=completion,
                    cache_read_tokens=max(0, cached),
                    cache_write_tokens=max(0, created),
                    reasoning_tokens=max(0, reasoning),
                )
            )
            return
    if failed:
        ticket.release()
    else:
        ticket.keep()


# -- attribution --------------------------------------------------------------


def dimensions(ctx: LLMCallHookContext) -> dict[str, str | int]:
    """Return the scope CrewAI's hook context tells: crew, agent, task, iteration.

    ``crew`` is the crew's ``name`` when set (else its ``id``), ``agent`` the
    agent's ``role``, ``task`` the task's ``name`` (else its ``id``),
    ``iteration`` the executor's iteration count. Unknown parts are left out
    (a direct ``LLM.call`` has no crew or task).
    """
    dims: dict[str, str | int] = {}
    crew = getattr(ctx, "crew", None)
    if crew is not None:
        name = getattr(crew, "name", None)
        value = scope_value(
            name if name and name != "crew" else getattr(crew, "id", None)
        )
        if value:
            dims["crew"] = value
    agent = getattr(ctx, "agent", None)
    role = scope_value(getattr(agent, "role", None))
    if role:
        dims["agent"] = role
    task = getattr(ctx, "task", None)
    if task is not None:
        value = scope_value(getattr(task, "name", None) or getattr(task, "id", None))
        if value:
            dims["task"] = value
    if getattr(ctx, "executor", None) is not None:
        iterations = getattr(ctx, "iterations", None)
        if isinstance(iterations, int) and not isinstance(iterations, bool):
            dims["iteration"] = iterations
    return dims


def _kwargs(dims: Mapping[str, str | int]) -> dict[str, Any]:
    """``dims`` as ``seen_by`` keywords (typed loosely: they are scope names only)."""
    return dict(dims)


def _provider_id(llm: Any) -> str:
    provider = str(getattr(llm, "provider", "") or "").lower()
    return _PROVIDER_IDS.get(provider, provider or "unknown")


def _max_tokens(llm: Any) -> int | None:
    for attr in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = getattr(llm, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _usage_of(llm: Any) -> tuple[int, int, int, int, int] | None:
    """Return the LLM object's lifetime usage counters, or None if it keeps none."""
    summary = getattr(llm, "get_token_usage_summary", None)
    if summary is None:
        return None
    try:
        usage = summary()
    except Exception:  # noqa: BLE001 - a custom LLM's own bug must not break the call
        return None
    return (
        int(getattr(usage, "prompt_tokens", 0) or 0),
        int(getattr(usage, "completion_tokens", 0) or 0),
        int(getattr(usage, "cached_prompt_tokens", 0) or 0),
        int(getattr(usage, "reasoning_tokens", 0) or 0),
        int(getattr(usage, "cache_creation_tokens", 0) or 0),
    )
