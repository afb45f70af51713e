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
- an ``after_llm_call`` hook that closes what the before hook opened;
- an ``execution_end`` hook that settles whatever that crew still has open
  when it finishes or fails (CrewAI skips after hooks for tool-call answers
  and for calls that raised, and runs each agent step in a context of its own).

A call this adapter charges itself (no SDK layer beneath) is settled with its
own usage, never the LLM object's lifetime counters, which concurrent calls on
one LLM (``kickoff_for_each_async``, crews gathered, copies of an agent) share.
The first time it admits a call on an LLM class, the adapter wraps that class's
``call``/``acall`` and ``_track_token_usage_internal`` (restored by
``uninstall``): the usage a call reports to CrewAI is counted to that call's
reservation, and when the call returns or raises the reservation is settled
there (an error: released only when ``provider_did_no_work``, else kept whole).
``install`` wraps ``call``/``acall`` of CrewAI's native ``OpenAICompletion``
and ``AnthropicCompletion`` the same way: a direct ``LLM.call`` on them runs
the before hook inside the call, and the routing it enters there ends when the
call returns or raises (CrewAI skips the after hook for an error or a
tool-call answer).
"""

from __future__ import annotations

import inspect
import logging
import threading
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import wrapt
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
    provider_did_no_work,
    sdk_layer,
    whole_count,
)
from allowance_crewai._compat import native_classes, scope_value, sdk_provider

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

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


_Counts = tuple[int, int, int, int, int]
"""Prompt, completion, cached prompt, reasoning and cache-creation tokens."""


@dataclass(slots=True, eq=False)
class _Open:
    """A call the before hook admitted and no hook has settled yet."""

    seen: allowance.seen_by
    thread: int
    key: _Key | None
    ticket: allowance.Ticket | None = None
    llm: Any = None
    crew: Any = None
    # The LLM's lifetime counters when the call was admitted, and the object
    # holding them (copies of an LLM share it): the fallback for an LLM that
    # reports usage outside the call's context, trusted only when no other
    # call on the same counters was open meanwhile (``overlapped``).
    before: _Counts | None = None
    counters: Any = None
    overlapped: bool = False
    # What the call itself reported to CrewAI (``_track_token_usage_internal``
    # in the call's context); ``unreadable`` when a count could not be read.
    usage: _Counts | None = None
    unreadable: bool = False
    settled: bool = False
    exited: bool = False


_lock = threading.Lock()
_guard: allowance.Guard | None = None
_open: ContextVar[_Open | None] = ContextVar("allowance_crewai_open", default=None)
# Every admitted call not settled yet, wherever CrewAI runs it: settled by the
# call's own end, its after hook, the next before hook of its context, or the
# end of its crew (CrewAI runs each agent step in a copied context, so a
# ContextVar alone cannot reach a call's entry from the crew's end).
_pending: set[_Open] = set()
_pending_lock = threading.Lock()
# Serialises the LLM counters' updates with their snapshots (a few additions).
_usage_lock = threading.RLock()
_depth: ContextVar[int] = ContextVar("allowance_crewai_call_depth", default=0)
_refused: dict[_Key, _Refusal] = {}
_observer = _RefusalObserver()
_OBSERVER_NAME: Final = "allowance_crewai.refusals"
_wrapped: dict[tuple[type, str], wrapt.FunctionWrapper[..., Any]] = {}
"""Every LLM method wrapped, by (class, attribute); ``uninstall`` restores."""
_instrumented: set[type] = set()


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
    # A direct ``LLM.call`` on a native LLM runs the before hook inside the
    # call, and CrewAI skips the after hook when it raises or answers tool
    # calls: their ``call``/``acall`` end what the before hook opened in them.
    for cls in native_classes():
        _wrap_methods(cls, ("call", "acall"))


def uninstall() -> None:
    """Unregister the hooks; a no-op when not installed.

    Executors built while installed keep a copy of the hook list: the hooks
    they hold do nothing from now on. A call the before hook routed in this
    context and nothing has closed yet is closed: its routing does not outlive
    the adapter.
    """
    global _guard  # noqa: PLW0603
    _settle()
    with _lock:
        if _guard is None:
            return
        _guard = None
        unregister_before_llm_call_hook(_before_llm_call)
        unregister_after_llm_call_hook(_after_llm_call)
        unregister(InterceptionPoint.EXECUTION_END, _execution_end)
        _observe(register=False)
        _refused.clear()
        _unwrap_all()


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
    _settle()
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
        entry = _Open(seen, threading.get_ident(), key, crew=getattr(ctx, "crew", None))
        _remember(entry)
        _open.set(entry)
        return
    _admit(guard, ctx, llm, dims)


def _admit(
    guard: allowance.Guard,
    ctx: LLMCallHookContext,
    llm: Any,
    dims: Mapping[str, str | int],
) -> None:
    """Reserve a call no SDK layer sees; the framework's usage settles it."""
    _instrument(type(llm))
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
    with _usage_lock:
        before = _usage_of(llm)
    entry = _Open(
        seen,
        threading.get_ident(),
        None,
        ticket,
        llm,
        getattr(ctx, "crew", None),
        before,
        _counters_of(llm),
    )
    _remember(entry)
    _open.set(entry)


def _after_llm_call(ctx: LLMCallHookContext) -> None:
    _settle()
    key = _call_key(ctx)
    if key is not None:
        _refused.pop(key, None)


def _execution_end(ctx: Any) -> None:
    _settle()
    crew = getattr(ctx, "crew", None)
    failed = getattr(ctx, "status", "completed") == "failed"
    if crew is not None:
        with _pending_lock:
            left = [e for e in _pending if e.crew is crew]
        for entry in left:
            # Never seen to end (its LLM class could not be wrapped, or it is
            # still running): what it cost is unknown, so it keeps its worst case.
            _close(entry, outcome="error" if failed else "unmetered")
    crew_id = id(crew)
    for key in [k for k in _refused if k[0] == crew_id]:
        _refused.pop(key, None)


# -- settling ---------------------------------------------------------------------


def _remember(entry: _Open) -> None:
    """Register ``entry``; mark it and its peers overlapped if they share counters.

    A direct call routed to the SDK layer (no crew, nothing to settle) is left
    to its context alone.
    """
    if entry.crew is None and entry.ticket is None:
        return
    with _pending_lock:
        if entry.counters is not None:
            for peer in _pending:
                if peer.counters is entry.counters:
                    peer.overlapped = entry.overlapped = True
        _pending.add(entry)


def _claim(entry: _Open) -> bool:
    """Mark ``entry`` settled; True for the one caller that did."""
    with _pending_lock:
        if entry.settled:
            return False
        entry.settled = True
        _pending.discard(entry)
        return True


def _settle() -> None:
    """Settle and close the call the before hook opened in this context, if any."""
    entry = _open.get()
    if entry is None:
        return
    _open.set(None)
    _close(entry, outcome="unmetered")


def _close(entry: _Open, *, outcome: str, error: BaseException | None = None) -> None:
    """Settle ``entry`` (once) and leave its scope when in its own thread."""
    try:
        if _claim(entry) and entry.ticket is not None:
            _settle_ticket(entry, outcome=outcome, error=error)
    finally:
        if entry.thread == threading.get_ident() and not entry.exited:
            entry.exited = True
            try:
                entry.seen.__exit__(None, None, None)
            except (ValueError, RuntimeError):  # a copied context: the original resets
                logger.debug("allowance: crewai scope closed in another context")


def _settle_ticket(
    entry: _Open, *, outcome: str, error: BaseException | None = None
) -> None:
    """Charge the call's own usage; else release or keep its reservation.

    Its own usage: what the call reported in its context; else, for an LLM
    that reports elsewhere, the growth of its counters when no other call on
    them overlapped. A call that raised without usage is released only when
    the provider did no work; any other unknown usage keeps the worst case.
    """
    ticket = entry.ticket
    if ticket is None or ticket.settled:
        return
    usage, unreadable = entry.usage, entry.unreadable
    if usage is None and not unreadable and not entry.overlapped:
        with _usage_lock:
            after = _usage_of(entry.llm)
        if entry.before is not None and after is not None:
            usage = _delta(entry.before, after)
            unreadable = usage is None
    if usage is not None and (usage[0] > 0 or usage[1] > 0):
        prompt, completion, cached, reasoning, created = usage
        ticket.commit(
            allowance.Usage(
                input_tokens=prompt,
                output_tokens=completion,
                cache_read_tokens=cached,
                cache_write_tokens=created,
                reasoning_tokens=reasoning,
            )
        )
    elif error is not None and not unreadable and provider_did_no_work(error):
        ticket.release()
    elif error is not None:
        ticket.keep(outcome="error")
    else:
        ticket.keep(outcome="error" if outcome == "error" else "unmetered")


def _delta(before: _Counts, after: _Counts) -> _Counts | None:
    """``after - before``, or None when a counter went down (not a usage)."""
    grown = tuple(a - b for a, b in zip(after, before, strict=True))
    if min(grown) < 0:
        return None
    prompt, completion, cached, reasoning, created = grown
    return (prompt, completion, cached, reasoning, created)


# -- an LLM class's own methods, wrapped the first time a call on it is admitted ---


def _instrument(cls: type) -> None:
    """Wrap ``cls``'s call methods and usage tracker (once; ``uninstall`` undoes)."""
    if cls in _instrumented:
        return
    _wrap_methods(cls, ("call", "acall", "_track_token_usage_internal"))
    _instrumented.add(cls)


def _wrap_methods(cls: type, names: tuple[str, ...]) -> None:
    """Wrap ``cls``'s methods ``names`` where defined, unless wrapped already."""
    for name in names:
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or owner is object:
            continue
        found = vars(owner)[name]
        if found is _wrapped.get((owner, name)) or not inspect.isfunction(found):
            continue  # wrapped already, or not a plain function
        wrapper = _acall if inspect.iscoroutinefunction(found) else _call
        if name == "_track_token_usage_internal":
            wrapper = _track
        wrapped = wrapt.FunctionWrapper(found, wrapper)
        with _lock:
            if _guard is None or vars(owner).get(name) is not found:
                continue  # uninstalled meanwhile, or wrapped by another thread
            try:
                setattr(owner, name, wrapped)
            except (AttributeError, TypeError):  # a class that refuses: fallback
                logger.debug("allowance: cannot wrap %s.%s", owner.__name__, name)
                continue
            _wrapped[owner, name] = wrapped


def _unwrap_all() -> None:
    """Put every wrapped LLM method back (called under ``_lock``)."""
    _instrumented.clear()
    while _wrapped:
        (owner, name), wrapped = _wrapped.popitem()
        if vars(owner).get(name) is wrapped:  # else replaced since: left alone
            setattr(owner, name, wrapped.__wrapped__)


def _ended(outer: _Open | None, error: BaseException | None) -> None:
    """The outermost model call of this context returned (or raised ``error``).

    ``outer`` is what was open when the call began: a call routed to the SDK
    layer by a before hook run inside the call (a direct ``LLM.call`` on a
    native LLM) is closed here, not left to an after hook CrewAI may skip; one
    an agent's executor opened before the call is left to its after hook.
    """
    entry = _open.get()
    if entry is None or entry.settled:
        return
    if entry.ticket is not None:
        _close(entry, outcome="error" if error else "unmetered", error=error)
    elif entry is not outer:
        _open.set(None)
        _close(entry, outcome="unmetered")


def _call(
    wrapped: Callable[..., Any],
    instance: Any,  # noqa: ARG001 - wrapt's signature
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``call`` that settles its call when the outermost one ends."""
    outer = _open.get()
    token = _depth.set(_depth.get() + 1)
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as err:
        _left(token, outer, err)
        raise
    _left(token, outer, None)
    return result


async def _acall(
    wrapped: Callable[..., Any],
    instance: Any,  # noqa: ARG001 - wrapt's signature
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``acall`` (or an async ``call``) that settles like ``_call``."""
    outer = _open.get()
    token = _depth.set(_depth.get() + 1)
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as err:
        _left(token, outer, err)
        raise
    _left(token, outer, None)
    return result


def _left(token: Token[int], outer: _Open | None, error: BaseException | None) -> None:
    """A model call returned (or raised ``error``): settle it if outermost."""
    _depth.reset(token)
    if _depth.get() == 0:
        _ended(outer, error)


def _track(
    wrapped: Callable[..., Any],
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``_track_token_usage_internal`` that adds its growth to this call's usage."""
    entry = _open.get()
    with _usage_lock:
        if (
            entry is None
            or entry.ticket is None
            or entry.settled
            or _counters_of(instance) is not entry.counters
        ):  # not this call's LLM (an LLM the custom one calls reports its own)
            return wrapped(*args, **kwargs)
        before = _usage_of(instance)
        try:
            return wrapped(*args, **kwargs)
        finally:
            after = _usage_of(instance)
            grown = None if before is None or after is None else _delta(before, after)
            if grown is None:
                entry.unreadable = True
            elif entry.usage is None:
                entry.usage = grown
            else:
                entry.usage = _sum(entry.usage, grown)


def _sum(a: _Counts, b: _Counts) -> _Counts:
    prompt, completion, cached, reasoning, created = (
        x + y for x, y in zip(a, b, strict=True)
    )
    return (prompt, completion, cached, reasoning, created)


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


def _counters_of(llm: Any) -> Any:
    """The object holding ``llm``'s lifetime counters (copies of an LLM share it)."""
    try:
        counters = getattr(llm, "_token_usage", None)
    except Exception:  # noqa: BLE001 - a custom LLM's own bug must not break the call
        counters = None
    return counters if counters is not None else llm


def _usage_of(llm: Any) -> _Counts | None:
    """Return the LLM object's lifetime usage counters, or None if unreadable."""
    summary = getattr(llm, "get_token_usage_summary", None)
    if summary is None:
        return None
    try:
        usage = summary()
    except Exception:  # noqa: BLE001 - a custom LLM's own bug must not break the call
        return None
    counts = [
        whole_count(getattr(usage, name, None))
        for name in (
            "prompt_tokens",
            "completion_tokens",
            "cached_prompt_tokens",
            "reasoning_tokens",
            "cache_creation_tokens",
        )
    ]
    prompt, completion, cached, reasoning, created = counts
    if (
        prompt is None
        or completion is None
        or cached is None
        or reasoning is None
        or created is None
    ):
        return None
    return (prompt, completion, cached, reasoning, created)
