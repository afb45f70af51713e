# ruff: noqa: ARG002 - LangChain's callback signatures, used in part
"""``AllowanceCallbackHandler``: budgets for any LangChain chat model or LLM.

A LangChain callback handler sees every model call with its attribution (run
id, parent run, tags, metadata) before the call is sent, and its usage after.
Two paths, one charge per call:

- OpenAI, Azure OpenAI and Anthropic models (``ls_provider``): the SDK layer of
  ``allowance`` beneath LangChain estimates, reserves, blocks, degrades and
  commits the provider's exact usage; the handler only routes the call to its
  guard and attributes it (``allowance.seen_by``).
- Any other model: the handler estimates the call, reserves it when the model
  starts (``BudgetExceeded`` there stops it before the request) and commits the
  ``usage_metadata`` LangChain reports at the end.

The handler is synchronous with ``raise_error = True`` (so LangChain lets
``BudgetExceeded`` out of the start callback) and ``run_inline = True`` (so,
under ``ainvoke`` and ``astream`` too, it runs in the caller's context, where
the context variables it sets reach the HTTP request).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from langchain_core.callbacks import BaseCallbackHandler

import allowance
from allowance import integration
from allowance.integration import whole_count
from allowance_langchain import _compat
from allowance_langchain._compat import ADAPTER_NAME

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from uuid import UUID

    from langchain_core.messages import BaseMessage
    from langchain_core.outputs import ChatGenerationChunk, GenerationChunk, LLMResult

    from allowance.typing import Estimate, Ledger

__all__ = ["ADAPTER_NAME", "AllowanceCallbackHandler"]

Window = Literal["hour", "day", "week", "month"]
OnLimit = Literal["raise", "stop", "warn"]
Fail = Literal["closed", "open"]

_MAX_VALUE = 256
_MAX_LEAKED = 4096
_ROLES = {
    "human": "user",
    "ai": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "function",
    "developer": "developer",
    "chat": "user",
}
_OUTPUT_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


_claimed: set[UUID] = set()
"""Runs a handler from the run's config charges (the global handler steps aside)."""

_here: contextvars.ContextVar[object] = contextvars.ContextVar(
    "allowance_langchain_here", default=None
)
"""Set with each start: resetting its token tells whether we are in that context."""

_handlers: weakref.WeakSet[AllowanceCallbackHandler] = weakref.WeakSet()
"""Every handler built: a start one refuses gives back the runs of its batch in all."""
_handlers_lock = threading.Lock()

_refused_batch: object = object()
"""The ``metadata`` of the last batch of runs a start refused (see ``_abandon``)."""
_refused_error: allowance.BudgetExceeded | None = None


@dataclass(eq=False, slots=True)
class _Call:
    """One model run between its start and end callbacks."""

    run_id: UUID
    seen: allowance.seen_by
    key: tuple[int, int]
    here: contextvars.Token[object]
    context: contextvars.Context | None = None
    batch: object = None
    """The ``metadata`` object the start got: the same for every run of one
    LangChain model call (one per message list or prompt), another for any
    other call, as each call configures a callback manager of its own."""
    chat: bool = False
    """Started by ``on_chat_model_start`` (else ``on_llm_start``)."""
    ticket: allowance.Ticket | None = None
    closed: bool = False
    routed: bool = True
    """The route is live: no chunk of the answer has come back yet."""
    chunks: int = 0
    """Chunks of the answer seen (``on_llm_new_token``)."""
    produced: int = 0
    """UTF-8 bytes of the output seen, counted up to the output cap."""
    usages: list[Mapping[str, Any]] = field(default_factory=list)
    """The ``usage_metadata`` of the chunks seen (LangChain adds them up)."""
    model: str | None = None
    """The model the chunks named, if any."""
    task: asyncio.Task[Any] | None = None
    """The asyncio task the start ran in, watched while the handler holds the call."""
    watch: Callable[[asyncio.Task[Any]], None] | None = None
    """The done callback on ``task`` (see ``_task_done``)."""


@dataclass(slots=True)
class _Runs:
    """What the handler knows about runs in flight (shared by all threads)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: dict[UUID, _Call] = field(default_factory=dict)
    roots: dict[UUID, UUID] = field(default_factory=dict)


@dataclass(slots=True)
class _Contexts:
    """The context variables calls set, per context, for every handler.

    One stack per (thread, task) across handlers: two handlers on one run set
    the same context variables (``seen_by``'s), which must be reset in the
    reverse order they were set, whichever handler's callback comes first.
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    stacks: dict[tuple[int, int], list[_Call]] = field(default_factory=dict)
    leaked: OrderedDict[str, _Call] = field(default_factory=OrderedDict)


_contexts = _Contexts()


def _context_key() -> tuple[int, int]:
    """Identify where a callback runs: the thread, and the asyncio task if any."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return threading.get_ident(), id(task) if task is not None else 0


def _new_session() -> str:
    import uuid  # noqa: PLC0415 - only when a handler is built

    return f"lc-{uuid.uuid4().hex[:16]}"


def _check_dimensions(
    metadata_dimensions: Mapping[str, str] | None, run_dimension: str | None
) -> dict[str, str]:
    given = cast("dict[object, object]", dict(metadata_dimensions or {}))
    mapping = {
        k: v for k, v in given.items() if isinstance(k, str) and isinstance(v, str)
    }
    for key, dim in given.items():
        if not isinstance(key, str) or mapping.get(key) != dim or not dim:
            raise allowance.ConfigurationError(
                "metadata_dimensions",
                metadata_dimensions,
                "a mapping of LangChain metadata key -> scope dimension name "
                '(e.g. {"user_id": "user"})',
            )
    # Validates every dimension name now, where it was written.
    allowance.scope(**dict.fromkeys(mapping.values(), "x"))
    if run_dimension is not None:
        name: object = run_dimension
        if not isinstance(name, str) or not name:
            raise allowance.ConfigurationError(
                "run_dimension", run_dimension, "a scope dimension name, or None"
            )
        allowance.scope(**{run_dimension: "x"})
    return mapping


class AllowanceCallbackHandler(BaseCallbackHandler):
    """Enforce an ``allowance`` budget on the LangChain runs it is attached to.

    Pass it in a run's ``config={"callbacks": [handler]}`` (or bind it with
    ``with_config``); ``allowance.patch()`` attaches one to every run in the
    process instead. The budget arguments are those of ``allowance.wrap``.

    Args:
        budget: ``"$1.00"``, an int of tokens, ``"50k tokens"``, or ``Budget``s.
        per: Dimension of ``budget``: ``"session"`` (default; every call through
            this handler, see ``session``), ``"run"`` (each chain invocation:
            the root LangChain run), or any scope dimension (``"user"``...).
        window: ``"hour"``, ``"day"``, ``"week"`` or ``"month"``.
        fallback: Cheaper model to degrade to (OpenAI and Anthropic models: the
            SDK layer really calls it).
        threshold: Ratio at which to degrade (or warn, without ``fallback``).
        on_limit: ``"raise"`` (default), ``"stop"`` or ``"warn"``.
        fail: ``"closed"`` (default) or ``"open"`` on ledger failure.
        ledger: Ledger URL or object; default ``sqlite:///allowance.db``.
        session: Session id of this handler's calls; default a new id per
            handler. Pass a fixed id to share a budget across handlers.
        policy: A full ``Policy`` instead of the shorthand arguments.
        guard: An existing ``Guard`` to share (then no other budget argument).
        metadata_dimensions: LangChain metadata keys -> scope dimensions, e.g.
            ``{"user_id": "user", "tenant_id": "tenant"}``: a run invoked with
            ``config={"metadata": {"user_id": "u-7"}}`` is charged to
            ``user="u-7"``.
        run_dimension: Scope dimension that gets the root run id of each chain
            invocation (default ``"run"``); None for none.

    Raises:
        ConfigurationError: An argument is malformed.

    Example:
        >>> handler = AllowanceCallbackHandler(budget="$1.00", fallback="gpt-4o-mini",
        ...                                    threshold=0.8)
        >>> chain.invoke(inputs, config={"callbacks": [handler]})
    """

    __module__ = "allowance_langchain"

    raise_error: bool = True
    """Let ``BudgetExceeded`` out of the start callback: the call is not sent."""
    run_inline: bool = True
    """Run in the caller's context under ``ainvoke``/``astream`` too."""

    guard: allowance.Guard | None
    """The guard calls are charged to; None makes the handler do nothing."""

    def __init__(
        self,
        budget: int | str | allowance.Budget | Iterable[allowance.Budget] | None = None,
        *,
        per: str = "session",
        window: Window | None = None,
        fallback: str | Mapping[str, str] | None = None,
        threshold: float | None = None,
        on_limit: OnLimit = "raise",
        fail: Fail = "closed",
        ledger: str | Ledger | None = None,
        session: str | None = None,
        policy: allowance.Policy | None = None,
        guard: allowance.Guard | None = None,
        metadata_dimensions: Mapping[str, str] | None = None,
        run_dimension: str | None = "run",
    ) -> None:
        """Build the guard (or take ``guard``); see the class docstring."""
        super().__init__()
        self.metadata_dimensions = _check_dimensions(metadata_dimensions, run_dimension)
        self.run_dimension = run_dimension
        # Like allowance.wrap: the handler's calls form one session of their own,
        # unless a session id is given (to share a budget across handlers).
        self.guard = integration.make_guard(
            guard=guard,
            policy=policy,
            budget=budget,
            per=per,
            window=window,
            fallback=fallback,
            threshold=threshold,
            on_limit=on_limit,
            fail=fail,
            ledger=ledger,
            session=session,
            scope=None
            if guard is not None
            else {"session": session if session is not None else _new_session()},
        )
        self._runs = _Runs()
        self._global = False
        with _handlers_lock:
            _handlers.add(self)

    @classmethod
    def _unbound(cls) -> AllowanceCallbackHandler:
        """A handler with no guard yet (the adapter binds one on install)."""
        handler = cls.__new__(cls)
        BaseCallbackHandler.__init__(handler)
        handler.metadata_dimensions = {}
        handler.run_dimension = "run"
        handler.guard = None
        handler._runs = _Runs()  # noqa: SLF001 - our own class
        handler._global = True  # noqa: SLF001
        with _handlers_lock:
            _handlers.add(handler)
        return handler

    def __repr__(self) -> str:
        """Show the guard."""
        return f"<AllowanceCallbackHandler guard={self.guard!r}>"

    # -- runs that are not model calls: remember the root of each tree ---------------

    def _enter_run(self, run_id: UUID, parent_run_id: UUID | None) -> None:
        if self.guard is None:
            return
        runs = self._runs
        runs.roots[run_id] = (
            run_id
            if parent_run_id is None
            else runs.roots.get(parent_run_id, parent_run_id)
        )

    def _exit_run(self, run_id: UUID) -> None:
        self._runs.roots.pop(run_id, None)

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember the chain's root run."""
        self._enter_run(run_id, parent_run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the chain."""
        self._exit_run(run_id)

    def on_chain_error(
        self, error: BaseException, *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Forget the chain."""
        self._exit_run(run_id)

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Remember the tool's root run (models called inside a tool share it)."""
        self._enter_run(run_id, parent_run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the tool run."""
        self._exit_run(run_id)

    def on_tool_error(
        self, error: BaseException, *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Forget the tool run."""
        self._exit_run(run_id)

    # -- model calls ------------------------------------------------------------------

    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Admit the chat call (or raise ``BudgetExceeded``) and route it."""
        if self.guard is None:
            return

        def rows() -> list[dict[str, Any]]:
            return [_message_row(m) for batch in messages for m in batch]

        self._start(
            serialized, rows, run_id, parent_run_id, tags, metadata, kwargs, chat=True
        )

    def on_llm_start(
        self,
        serialized: dict[str, Any] | None,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Admit the completion call (or raise ``BudgetExceeded``) and route it."""
        if self.guard is None:
            return

        def rows() -> list[dict[str, Any]]:
            return [{"role": "user", "content": p} for p in prompts]

        self._start(serialized, rows, run_id, parent_run_id, tags, metadata, kwargs)

    def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: GenerationChunk | ChatGenerationChunk | None = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Count what a stream produced; stop routing at its first chunk.

        The model's request has been sent once a chunk comes back, and the
        consumer's code runs between chunks in this same context: a client it
        calls there is charged to its own guard, not to this handler's. On the
        last chunk the call is closed here, in the caller's context (the end
        callback of an async stream runs in a task of its own, where the
        context variables set at the start cannot be reset).
        """
        call = self._runs.calls.get(run_id)
        if call is None:
            return
        if call.routed:
            self._unroute(call)
        if call.ticket is not None:
            _count(call, token, chunk)
        message = getattr(chunk, "message", None)
        if getattr(message, "chunk_position", None) == "last":
            self._close(call)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Commit the usage LangChain reports (when this handler charges the call)."""
        call = self._pop(run_id)
        if call is None:
            return
        try:
            if call.ticket is not None:
                _settle(call.ticket, response)
        finally:
            self._close(call)

    def on_llm_error(
        self, error: BaseException, *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Settle a failed call: release it only if the provider did no work.

        The sync ``generate`` of a chat model sends its message lists one by
        one and, when one fails, errors its run alone and raises: the runs of
        that call started before it (answered) and after it (never sent) get
        no callback at all. They are settled here (``_take_siblings``).
        """
        found = self._runs.calls.get(run_id)
        before, after = (
            self._take_siblings(found)
            if found is not None and found.chat and found.batch is not None
            else ((), ())
        )
        call = self._pop(run_id)
        if call is None:
            return
        try:
            if call.ticket is not None:
                _settle_error(call, call.ticket, error)
        finally:
            self._close(call)
            if before or after:
                self._settle_siblings(before, after)

    # -- the mechanism ----------------------------------------------------------------

    def _start(  # noqa: PLR0917 - the callback's arguments, passed on
        self,
        serialized: Mapping[str, Any] | None,
        rows: Callable[[], list[dict[str, Any]]],
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: Sequence[str] | None,
        metadata: Mapping[str, Any] | None,
        extra: Mapping[str, Any],
        *,
        chat: bool = False,
    ) -> None:
        guard = self.guard
        if guard is None:
            return
        if self._global:
            if run_id in _claimed:
                return  # a handler passed in the run's config charges this call
        else:
            _claimed.add(run_id)
        self._drop_leaked()
        meta = metadata or {}
        params: Mapping[str, Any] = extra.get("invocation_params") or {}
        provider = _provider(serialized, meta, params)
        dims = self._dimensions(run_id, parent_run_id, tags, meta)
        through_sdk = integration.sdk_layer(provider)
        seen = allowance.seen_by(
            ADAPTER_NAME, guard=guard, charged=not through_sdk, **dims
        )
        seen.__enter__()
        call = _Call(
            run_id,
            seen,
            _context_key(),
            _here.set(object()),
            _compat.current_task_context(),
            metadata,
            chat,
        )
        try:
            if not through_sdk:
                if metadata is _refused_batch:
                    _refuse_again()
                # The rows only when this handler estimates the call: one
                # the SDK layer charges is estimated from its request body.
                call.ticket = self._admit(guard, provider, rows(), params, meta)
        except BaseException as error:
            _undo(call)
            _claimed.discard(run_id)
            _abandon(metadata, error, extra)
            raise
        runs = self._runs
        with runs.lock:
            runs.calls[run_id] = call
        with _contexts.lock:
            _contexts.stacks.setdefault(call.key, []).append(call)
        if call.ticket is not None and call.key[1]:
            # A cancelled agenerate gets no end nor error callback: settled
            # when its task is done (see _task_done).
            task = asyncio.current_task()
            if task is not None:
                call.task = task
                call.watch = functools.partial(self._task_done, run_id)
                task.add_done_callback(call.watch)

    def _admit(
        self,
        guard: allowance.Guard,
        provider: str,
        rows: list[dict[str, Any]],
        params: Mapping[str, Any],
        metadata: Mapping[str, Any],
    ) -> allowance.Ticket:
        model = str(
            params.get("model")
            or params.get("model_name")
            or metadata.get("ls_model_name")
            or provider
        )
        cap = next(
            (params[k] for k in _OUTPUT_CAPS if isinstance(params.get(k), int)),
            metadata.get("ls_max_tokens"),
        )
        tools = params.get("tools")
        estimate = integration.estimate_chat(
            provider,
            model,
            rows,
            max_output_tokens=cap if isinstance(cap, int) and cap >= 0 else None,
            tools=tools if isinstance(tools, list) else None,
        )
        ticket = guard.begin(estimate, adapters=integration.current_adapters())
        if ticket.stopped:
            # A callback cannot answer for the model: stopping means not sending.
            ticket.release(outcome="blocked")
            raise allowance.BudgetExceeded(ticket.violations, model=model)
        return ticket

    def _dimensions(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: Sequence[str] | None,
        metadata: Mapping[str, Any],
    ) -> dict[str, str | int]:
        dims: dict[str, str | int] = {}
        run = str(run_id)
        if (
            self.run_dimension is not None
            and self.run_dimension not in allowance.current_scope()
        ):
            dims[self.run_dimension] = (
                run
                if parent_run_id is None
                else str(self._runs.roots.get(parent_run_id, parent_run_id))
            )
        dims["langchain_run"] = run
        if parent_run_id is not None:
            dims["langchain_parent"] = str(parent_run_id)
        if tags:
            dims["langchain_tags"] = ",".join(tags)[:_MAX_VALUE]
        for key, dim in self.metadata_dimensions.items():
            value = metadata.get(key)
            if (
                isinstance(value, str | int)
                and not isinstance(value, bool)
                and value != ""
            ):
                dims[dim] = value
        return dims

    def _take_batch(self, batch: object) -> list[_Call]:
        """Take the runs of ``batch`` still waiting to be sent out of the table."""
        runs = self._runs
        with runs.lock:
            taken = [
                c
                for c in runs.calls.values()
                if c.batch is batch and c.routed and not c.closed
            ]
            for call in taken:
                del runs.calls[call.run_id]
                call.closed = True
        if not self._global:
            for call in taken:
                _claimed.discard(call.run_id)
        return taken

    def _take_siblings(self, failed: _Call) -> tuple[Sequence[_Call], Sequence[_Call]]:
        """Take the runs of ``failed``'s chat call a sync ``generate`` left open.

        Returns those started before ``failed`` and those started after it.
        Only under a sync ``generate``: this handler runs inline, so an async
        ``agenerate`` calls it in its event loop (and then ends or errors
        every run itself); a sync one called inside a running loop is left
        alone (its runs go to their lease, as they would without this).
        """
        if not self.run_inline or _loop_running():
            return (), ()
        thread = threading.get_ident()
        batch = failed.batch
        before: list[_Call] = []
        after: list[_Call] = []
        runs = self._runs
        with runs.lock:
            if runs.calls.get(failed.run_id) is not failed:
                return (), ()
            side = before
            for call in runs.calls.values():
                if call is failed:
                    side = after
                elif call.batch is batch and call.key[0] == thread:
                    side.append(call)
            for call in (*before, *after):
                del runs.calls[call.run_id]
        if not self._global:
            for call in (*before, *after):
                _claimed.discard(call.run_id)
        return before, after

    def _settle_siblings(self, before: Iterable[_Call], after: Iterable[_Call]) -> None:
        """Settle the runs ``_take_siblings`` took; undo their routes.

        A run started before the failed one was answered (its usage, lost
        with the call's result, is unknown): the worst case is kept. One
        started after it was never sent: released. The SDK layer charges a
        run the handler holds no ticket for.
        """
        for call in before:
            if call.ticket is not None:
                # Should the ledger fail, the reservation's lease ends it.
                with contextlib.suppress(Exception):
                    call.ticket.keep(outcome="error")
            self._close(call)
        for call in after:
            if call.ticket is not None:
                with contextlib.suppress(Exception):
                    call.ticket.release()
            self._close(call)

    def _pop(self, run_id: UUID) -> _Call | None:
        if not self._global:
            _claimed.discard(run_id)
        runs = self._runs
        with runs.lock:
            call = runs.calls.pop(run_id, None)
        if (
            call is not None
            and call.task is not None
            and call.watch is not None
            and call.key[0] == threading.get_ident()
        ):
            # Settled by its callback: the task no longer holds it (a task
            # that makes many calls would otherwise keep each one).
            call.task.remove_done_callback(call.watch)
        return call

    def _task_done(self, run_id: UUID, task: asyncio.Task[Any]) -> None:
        """Settle a call still held when the task it started in is done.

        ``agenerate`` runs its message lists in ``asyncio.gather``: when its
        task is cancelled (``task.cancel()``, a timeout, ``asyncio.run``
        cancelling what is left once a parallel branch raised), the gather
        raises at once and no run gets an end or error callback. Whether the
        request was sent, a callback cannot tell: the call is settled as one
        cancelled (``_settle_error``): charged what its chunks showed, else
        its worst case kept. Released, it could let the budget overspend on
        requests the provider answered; kept, it no longer holds the budget
        for the rest of its lease.
        """
        call = self._pop(run_id)
        if call is None:
            return
        try:
            if call.ticket is not None:
                error = (
                    asyncio.CancelledError()
                    if task.cancelled()
                    else RuntimeError("the task ended before the model's callbacks")
                )
                # Should the ledger fail here, the reservation's lease ends it.
                with contextlib.suppress(Exception):
                    _settle_error(call, call.ticket, error)
        finally:
            self._close(call)

    def _unroute(self, call: _Call) -> None:
        """End the route of a call whose answer has started to come back.

        Its context variables are reset here too, when this runs in the
        context the start ran in and nothing set since is still in force;
        else ``_close`` (or ``_drop_leaked``) resets them later.
        """
        call.routed = False
        call.seen.end()
        if call.key == _context_key():
            _unwind(call.key)

    def _close(self, call: _Call) -> None:
        """Undo what the start set, innermost first, where the start set it."""
        runs = self._runs
        with runs.lock:
            if call.closed:
                return
            call.closed = True
        # The route stops now, whatever context this end callback runs in; the
        # context variables themselves are reset below where possible.
        call.seen.end()
        _unwind(call.key)

    def _drop_leaked(self) -> None:
        """Undo routes a finished call left in this context (async end callbacks)."""
        leaked = _contexts.leaked
        if not leaked:
            return
        while True:
            run = allowance.current_scope().get("langchain_run")
            if run is None:
                return
            with _contexts.lock:
                entry = leaked.pop(run, None)
            if entry is None or not _undo(entry):
                return


def _abandon(batch: object, error: BaseException, extra: Mapping[str, Any]) -> None:
    """Give back the runs LangChain started with a run whose start raised.

    LangChain starts one run per message list (or prompt) of a model call,
    all with the same ``metadata`` object, and sends them only once all have
    started. When a start raises, it raises at once: the runs already started
    are never sent, ended nor errored. Each handler's runs of that call (and
    only of that call: another call has a ``metadata`` of its own) are
    released here, as if they had failed with nothing sent.

    ``agenerate`` of a completion model starts its prompts' runs in tasks of
    their own and lets them go on once one raised: a later run of a refused
    batch is refused too (``_refuse_again``).
    """
    global _refused_batch, _refused_error  # noqa: PLW0603 - one slot, set here
    if batch is None:
        return
    if isinstance(error, allowance.BudgetExceeded):
        size = extra.get("batch_size")
        if isinstance(size, int) and size > 1:
            _refused_error = error
            _refused_batch = batch
    with _handlers_lock:
        handlers = list(_handlers)
    taken = [call for h in handlers for call in h._take_batch(batch)]  # noqa: SLF001
    for call in taken:
        call.seen.end()
        if call.ticket is not None:
            # Should the ledger fail here, the reservation's lease gives it back.
            with contextlib.suppress(Exception):
                call.ticket.release(outcome="blocked")
    for key in dict.fromkeys(call.key for call in taken):
        _unwind(key)


def _loop_running() -> bool:
    """Tell whether an asyncio event loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _refuse_again() -> None:
    """Refuse a run of a batch refused already (see ``_abandon``)."""
    error = _refused_error
    if error is None:  # pragma: no cover - set before the batch
        return
    raise allowance.BudgetExceeded(error.violations, model=error.model)


def _unwind(key: tuple[int, int]) -> None:
    """Undo the calls on top of ``key``'s stack done routing, innermost first."""
    contexts = _contexts
    with contexts.lock:
        stack = contexts.stacks.get(key, [])
        done: list[_Call] = []
        while stack and (stack[-1].closed or not stack[-1].routed):
            done.append(stack.pop())
        if not stack:
            contexts.stacks.pop(key, None)
    for entry in done:
        if not _undo(entry):
            # The callback runs in another context than the start (an async
            # run's end is shielded in a task of its own): undone at the next
            # model start in the original context, see _drop_leaked.
            with contexts.lock:
                contexts.leaked[str(entry.run_id)] = entry
                while len(contexts.leaked) > _MAX_LEAKED:
                    contexts.leaked.popitem(last=False)


def _undo(call: _Call) -> bool:
    """Undo what the start set in its context; return False if that is not possible."""
    if _undo_here(call):
        return True
    if call.context is None:
        return False
    # An async end callback runs in a task of its own while the caller's task
    # waits for it: its context (Python 3.12+) can be entered from here.
    try:
        return call.context.run(_undo_here, call)
    except RuntimeError:  # that context is running right now
        return False


def _undo_here(call: _Call) -> bool:
    try:
        _here.reset(call.here)
    except ValueError:  # the token was created in a different Context
        return False
    except RuntimeError:  # undone already
        return True
    call.seen.__exit__()
    return True


def _message_row(message: BaseMessage) -> dict[str, Any]:
    role = _ROLES.get(message.type, "user")
    content: Any = message.content
    row: dict[str, Any] = {"role": role, "content": content}
    tool_calls = getattr(message, "tool_calls", None)
    if tool_calls:
        row["tool_calls"] = [
            {
                "type": "function",
                "function": {"name": c["name"], "arguments": str(c["args"])},
            }
            for c in tool_calls
        ]
    return row


def _provider(
    serialized: Mapping[str, Any] | None,
    metadata: Mapping[str, Any],
    params: Mapping[str, Any],
) -> str:
    provider = metadata.get("ls_provider")
    if isinstance(provider, str) and provider:
        return provider.lower()
    ident = (serialized or {}).get("id") or [params.get("_type") or ""]
    name = str(ident[-1] if isinstance(ident, list) and ident else ident).lower()
    if "azure" in name:
        return "azure"
    if "openai" in name:
        return "openai"
    if "anthropic" in name:
        return "anthropic"
    return name or "unknown"


def _settle(ticket: allowance.Ticket, response: LLMResult) -> None:
    """Commit the run's usage; release a cache hit; keep the worst case if unknown."""
    usages: list[Mapping[str, Any]] = []
    model: str | None = None
    cached = False
    for generations in response.generations:
        for generation in generations:
            message = getattr(generation, "message", None)
            usage = getattr(message, "usage_metadata", None)
            if isinstance(usage, dict):
                if usage.get("total_cost") == 0:
                    # langchain-core zeroes the cost of answers from its LLM cache.
                    cached = True
                    continue
                usages.append(usage)
            meta = getattr(message, "response_metadata", None) or {}
            model = model or meta.get("model_name") or meta.get("model")
    if not usages and isinstance(response.llm_output, dict):
        token_usage = response.llm_output.get("token_usage") or response.llm_output.get(
            "usage"
        )
        if isinstance(token_usage, dict):
            usages.append(
                {
                    "input_tokens": token_usage.get(
                        "prompt_tokens", token_usage.get("input_tokens")
                    ),
                    "output_tokens": token_usage.get(
                        "completion_tokens", token_usage.get("output_tokens")
                    ),
                }
            )
    usage = _usage(usages) if usages else None
    if usage is not None:
        ticket.commit(usage, response_model=model)
    elif cached and not usages:
        ticket.commit(allowance.Usage(), response_model=model)
    else:
        ticket.keep()  # no usage, or one that cannot be read: the worst case


def _count(
    call: _Call,
    token: str | list[str | dict[str, Any]],
    chunk: GenerationChunk | ChatGenerationChunk | None,
) -> None:
    """Add one chunk to what the stream produced (bytes, usage, model).

    Never raises (it runs in the stream, between the model and its caller):
    output it cannot measure counts as the whole output cap.
    """
    call.chunks += 1
    assert call.ticket is not None  # noqa: S101 - only counted when charged here
    cap = call.ticket.estimate.output_tokens
    try:
        message = getattr(chunk, "message", None)
        if message is not None:
            usage = getattr(message, "usage_metadata", None)
            if isinstance(usage, dict):
                call.usages.append(cast("Mapping[str, Any]", usage))
            meta = getattr(message, "response_metadata", None) or {}
            name = meta.get("model_name") or meta.get("model")
            call.model = call.model or (name if isinstance(name, str) else None)
        if call.produced >= cap:
            return  # charged at most the cap: more bytes change nothing
        if message is not None:
            parts: list[object] = [message.content]
            parts.extend(getattr(message, "tool_call_chunks", None) or ())
            extra = getattr(message, "additional_kwargs", None)
            if extra:
                parts.append(extra)
        else:
            parts = [getattr(chunk, "text", None) or token]
        call.produced = min(cap, call.produced + sum(_size(p) for p in parts))
    except Exception:  # noqa: BLE001 - output we cannot measure: the whole cap
        call.produced = cap


def _size(part: object) -> int:
    """UTF-8 bytes of a piece of output; JSON for anything but text (a bound)."""
    if isinstance(part, str):
        return len(part.encode("utf-8", "surrogatepass"))
    if isinstance(part, list):
        return sum(_size(p) for p in cast("list[object]", part))
    return len(json.dumps(part, default=str).encode("utf-8", "surrogatepass"))


_BROKEN_OFF = (GeneratorExit, asyncio.CancelledError)


def _settle_error(call: _Call, ticket: allowance.Ticket, error: BaseException) -> None:
    """Settle the ticket of a call that raised.

    Released only when the provider did no work (an HTTP error status, a
    connection never made) and nothing came back. A stream the caller broke
    off (closed, cancelled) is charged what it produced. Anything else (a
    timeout, a dropped connection, an unknown error) keeps the worst case:
    the provider may have billed.
    """
    if not call.chunks and integration.provider_did_no_work(error):
        ticket.release()
    elif call.chunks and isinstance(error, _BROKEN_OFF):
        usage = _partial(call, ticket.estimate)
        if usage is None:
            ticket.keep()  # what it produced cannot be read: the worst case
        else:
            ticket.commit_partial(usage, response_model=call.model)
    else:
        ticket.keep(outcome="error")


def _partial(call: _Call, estimate: Estimate) -> allowance.Usage | None:
    """What a stream cut short produced; None when its usage cannot be read.

    The usage its chunks reported, with at least the output seen; without a
    usage: the estimate's input and the bytes of output seen (a token covers
    at least one byte), at most the output cap.
    """
    if not call.usages:
        return allowance.Usage(estimate.input_tokens, call.produced)
    known = _usage(call.usages)
    if known is None:
        return None
    return allowance.Usage(
        known.input_tokens or estimate.input_tokens,
        max(known.output_tokens, call.produced),
        known.cache_read_tokens,
        known.cache_write_tokens,
        known.reasoning_tokens,
    )


def _usage(usages: Iterable[Mapping[str, Any]]) -> allowance.Usage | None:
    """Return the sum of ``usages``; None if one of them cannot be read.

    A missing input or output count is not zero (``whole_count``); the
    details' counts are optional.
    """
    total = [0, 0, 0, 0, 0]
    for u in usages:
        inputs = whole_count(u.get("input_tokens"))
        outputs = whole_count(u.get("output_tokens"))
        if inputs is None or outputs is None:
            return None
        total[0] += inputs
        total[1] += outputs
        details = cast("Mapping[str, Any]", u.get("input_token_details") or {})
        produced = cast("Mapping[str, Any]", u.get("output_token_details") or {})
        for i, value in enumerate(
            (
                details.get("cache_read"),
                details.get("cache_creation"),
                produced.get("reasoning"),
            ),
            start=2,
        ):
            total[i] += whole_count(value) or 0
    return allowance.Usage(*total)
