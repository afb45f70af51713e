"""Scopes (who is spending) and per-invocation budgets, kept in context variables.

A scope is a mapping of dimension -> identifier. ``scope(...)`` nests and merges
(inner values win), and, being a ``contextvars`` value, follows asyncio tasks
and threads started with a copied context (``asyncio.to_thread``,
``loop.run_in_executor`` via ``contextvars.copy_context().run``).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import os
import weakref
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from allowance._budget import NAME_RULE, Budget, Threshold, is_name
from allowance._errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping
    from types import TracebackType

    from allowance._guard import Guard

__all__ = [
    "MAX_SCOPE_VALUE_LENGTH",
    "budget",
    "check_name",
    "current_adapters",
    "current_budgets",
    "current_route",
    "current_scope",
    "new_id",
    "scope",
    "seen_by",
]

P = ParamSpec("P")
R = TypeVar("R")

MAX_SCOPE_VALUE_LENGTH = 256
"""Scope values longer than this are refused (they end up in every ledger key)."""

_EMPTY: Mapping[str, str] = MappingProxyType({})
_scope: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "allowance_scope", default=_EMPTY
)
_budgets: contextvars.ContextVar[tuple[Budget, ...]] = contextvars.ContextVar(
    "allowance_budgets", default=()
)
_adapters: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "allowance_adapters", default=()
)
# (guard, charged, live): ``live[0]`` turns False when the adapter ends the route
# from a context other than the one it was entered in (``seen_by.end``), or
# holds a stream the route is bound to, in force only while it runs
# (``seen_by.bind``).
_Route = tuple["Guard", bool, list[Any]]
_route: contextvars.ContextVar[_Route | None] = contextvars.ContextVar(
    "allowance_route", default=None
)
# Fixed width: 13 decimal digits for the first 9e12 ids of a process.
_counter = itertools.count(10**12)
_prefix = ""


def _new_prefix() -> None:
    global _prefix  # noqa: PLW0603 - renewed in a forked child, so ids stay distinct
    _prefix = f"{os.urandom(4).hex()}{os.getpid():x}-"


_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)


def new_id() -> str:
    """Return a process-unique, cross-process-distinct id (cheap; not a secret).

    Fixed width, so one process's ids sort in the order they were made: the
    SQLite ledger then appends them at the end of its index, never in between.
    """
    return _prefix + str(next(_counter))  # no format spec: cheap from cold caches


def current_scope() -> Mapping[str, str]:
    """Return the scope in force here (read-only)."""
    return _scope.get()


def current_adapters() -> tuple[str, ...]:
    """Return the names of the framework adapters the current call passed through."""
    return _adapters.get()


def current_route() -> tuple[Guard, bool] | None:
    """Return ``(guard, charged)`` set by ``seen_by(guard=...)`` here, or None."""
    route = _route.get()
    if route is None:
        return None
    live = route[2][0]
    if live is not True and (live is False or not _running(live)):
        return None
    return route[0], route[1]


def _running(ref: Any) -> bool:
    """True while the stream ``ref`` holds runs a step.

    A generator or an async generator, held weakly: its end must not wait
    for the route's.
    """
    stream = ref()
    return bool(getattr(stream, "gi_running", False)) or bool(
        getattr(stream, "ag_running", False)
    )


class seen_by:  # noqa: N801 - used like a function
    """Mark calls made inside as seen by a framework adapter.

    Framework adapters enter it around a model call, with the scope they know
    (agent role, run id, ...). The SDK layer beneath then charges the call once,
    attributed to that scope and tagged with every adapter that saw it.

    Args:
        name: The adapter's name, written to the call log: a letter or _, then
            up to 63 letters, digits, _ . -
        guard: Charge calls made inside to this guard, whatever guard the SDK
            layer was installed with (a framework handler built with its own
            budget routes its model's calls to it).
        charged: The adapter charges the call itself (a model whose SDK
            ``allowance`` does not patch): SDK layers beneath pass calls for
            ``guard`` through, so nothing is charged twice. Needs ``guard``.
        **dimensions: Scope dimensions to add (``agent="writer"``).

    Raises:
        ConfigurationError: ``name`` or a dimension is malformed, or
            ``charged`` without ``guard``.

    Example:
        >>> with allowance.seen_by("my-framework", guard=guard, agent="writer"):
        ...     client.chat.completions.create(...)
    """

    __module__ = "allowance"
    __slots__ = ("_live", "_name", "_route", "_scope", "_tokens")

    def __init__(
        self,
        name: str,
        *,
        guard: Guard | None = None,
        charged: bool = False,
        **dimensions: str | int,
    ) -> None:
        """Remember the adapter name, the guard and the dimensions to add."""
        if type(name) is not str or name not in _NAMES:
            check_name("seen_by name", name)
        if charged and guard is None:
            raise ConfigurationError(
                "charged", charged, "charged=True together with guard=<the Guard>"
            )
        self._name = name
        self._live: list[Any] = [True]
        self._route: _Route | None = (
            None if guard is None else (guard, charged, self._live)
        )
        self._scope = validate_scope(dimensions)
        self._tokens: list[tuple[contextvars.Token[tuple[str, ...]], Any, Any]] = []

    def __enter__(self) -> None:
        """Push the adapter name (and scope, and guard) for calls made inside."""
        if self._route is not None and not self._live[0]:  # entered again after end
            self._live = [True]
            self._route = (self._route[0], self._route[1], self._live)
        scope_token = (
            _scope.set(MappingProxyType({**_scope.get(), **self._scope}))
            if self._scope
            else None
        )
        route_token = None if self._route is None else _route.set(self._route)
        self._tokens.append(
            (_adapters.set((*_adapters.get(), self._name)), scope_token, route_token)
        )

    def end(self) -> None:
        """Stop routing calls to ``guard``, from any context.

        For framework callbacks that finish a call outside the context the
        route was entered in (where ``__exit__`` cannot reset it): calls made
        afterwards in that context go to the SDK layer's own guard again.
        """
        self._live[0] = False

    def bind(self, stream: Iterator[Any] | AsyncIterator[Any]) -> None:
        """Route calls to ``guard`` only while ``stream`` runs, from any context.

        For a framework call that returns a stream (a generator or an async
        generator) which sends its request when first iterated, after the
        adapter's code has returned: the route stays set in the caller's
        context, and is in force only inside a step of ``stream``. A client
        the caller uses before (or between) those steps is charged to its
        own guard. ``end()`` still ends the route. An object that is not a
        generator never runs: nothing is routed through it. The stream is
        held weakly: once it is gone, nothing is routed.
        """
        if self._live[0] is not False:
            try:
                self._live[0] = weakref.ref(stream)
            except TypeError:  # not a generator: it never runs
                self._live[0] = False

    def __exit__(self, *exc: object) -> None:
        """Pop what ``__enter__`` pushed."""
        token, scope_token, route_token = self._tokens.pop()
        if route_token is not None:
            _route.reset(route_token)
        _adapters.reset(token)
        if scope_token is not None:
            _scope.reset(scope_token)


def current_budgets() -> tuple[Budget, ...]:
    """Return the per-invocation budgets (``@allowance.budget``) in force here."""
    return _budgets.get()


# Names that passed ``is_name`` (dimensions, adapters): few, and met again on
# every call a framework adapter scopes (``seen_by``), where the regex would
# run each time.
_NAMES: set[str] = set()
_MAX_NAMES = 1024


def check_name(what: str, name: object) -> None:
    """Raise unless ``name`` is a name (``is_name``); remember it if it is."""
    if not is_name(name):
        raise ConfigurationError(what, name, NAME_RULE)
    if type(name) is str and len(_NAMES) < _MAX_NAMES:
        _NAMES.add(name)


def _check_value(dimension: str, value: object) -> str:
    if dimension not in _NAMES:
        check_name("scope dimension", dimension)
    if (
        type(value) is str
        and 0 < len(value) <= MAX_SCOPE_VALUE_LENGTH
        and value.isascii()  # O(1) in CPython: a flag of the string
    ):
        return value  # the commonest value: what the checks below return for it
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigurationError(f"scope {dimension}", value, "a str or int identifier")
    text = str(value)
    if not text:
        raise ConfigurationError(f"scope {dimension}", value, "a non-empty identifier")
    if len(text) > MAX_SCOPE_VALUE_LENGTH:
        raise ConfigurationError(
            f"scope {dimension}",
            value,
            f"at most {MAX_SCOPE_VALUE_LENGTH} characters (got {len(text)}); "
            "pass an id, not a document",
        )
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: no ledger can store it as a key
        raise ConfigurationError(
            f"scope {dimension}",
            value,
            "text that encodes as UTF-8 (no lone surrogate)",
        ) from None
    return text


def validate_scope(values: Mapping[str, object]) -> dict[str, str]:
    """Check and normalise scope values (ints become strings).

    Raises:
        ConfigurationError: ``values`` is not a mapping, a dimension name is not
            an identifier, or a value is not a non-empty str/int of at most 256
            characters.
    """
    try:
        items = values.items()
    except AttributeError:
        raise ConfigurationError(
            "scope", values, "a mapping of dimension -> identifier"
        ) from None
    return {dim: _check_value(dim, val) for dim, val in items}


class scope:  # noqa: N801 - used like a function, as contextlib's helpers are
    """Attribute calls to a scope; a context manager and a decorator.

    Args:
        **dimensions: Dimension -> identifier (str or int), e.g.
            ``tenant="acme", run="r-17"``. Merged into the enclosing scope;
            inner values win.

    Raises:
        ConfigurationError: A dimension or value is malformed.

    Example:
        >>> with scope(tenant="acme"):
        ...     with scope(run="r-17"):
        ...         dict(current_scope())
        {'tenant': 'acme', 'run': 'r-17'}
    """

    __module__ = "allowance"
    __slots__ = ("_tokens", "_values")

    def __init__(self, **dimensions: str | int) -> None:
        """Validate the dimensions; nothing is entered until ``with`` or a call."""
        self._values = validate_scope(dimensions)
        self._tokens: list[contextvars.Token[Mapping[str, str]]] = []

    def __enter__(self) -> Mapping[str, str]:
        """Merge the dimensions into the current scope and return the result."""
        merged = MappingProxyType({**_scope.get(), **self._values})
        self._tokens.append(_scope.set(merged))
        return merged

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Restore the enclosing scope."""
        _scope.reset(self._tokens.pop())

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``func`` (sync or async) so each call runs in this scope."""
        values = self._values
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with scope(**values):
                    return await func(*args, **kwargs)

            return cast("Callable[P, R]", run_async)

        @functools.wraps(func)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with scope(**values):
                return func(*args, **kwargs)

        return run


class _InvocationBudget:
    """Enter a fresh budget (and its own dimension value) for one invocation."""

    __slots__ = ("_budget", "_dimension", "_scope_token", "_token")

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._dimension = budget.per

    def __enter__(self) -> Mapping[str, str]:
        merged = MappingProxyType({**_scope.get(), self._dimension: new_id()})
        self._scope_token = _scope.set(merged)
        self._token = _budgets.set((*_budgets.get(), self._budget))
        return merged

    def __exit__(self, *exc: object) -> None:
        _budgets.reset(self._token)
        _scope.reset(self._scope_token)


def budget(
    limit: int | str,
    *,
    thresholds: tuple[Threshold, ...] | list[Threshold] = (),
    name: str | None = None,
) -> _BudgetDecorator:
    """Give every invocation of the decorated function its own fresh budget.

    Every guarded LLM call made during the invocation (any client, wrapped or
    patched, and any adapter) is charged to it, on top of the guard's own
    budgets. The per-request pattern: no client built per request. Also a
    context manager: ``with allowance.budget("$0.10"): ...``.

    Args:
        limit: ``"$0.10"``, an int of tokens, or ``"50k tokens"``.
        thresholds: ``Threshold`` actions for this budget.
        name: Shown in reports and errors; default ``"invocation"``.

    Raises:
        ConfigurationError: The limit or a threshold is malformed.

    Example:
        >>> @budget("$0.10")
        ... def handle(question: str) -> str: ...
    """
    return _BudgetDecorator(
        Budget(
            limit, per="invocation", thresholds=thresholds, name=name or "invocation"
        )
    )


class _BudgetDecorator:
    """What ``allowance.budget(...)`` returns: a decorator and a context manager."""

    __slots__ = ("_active", "budget")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._active: list[_InvocationBudget] = []

    def __enter__(self) -> Mapping[str, str]:
        entered = _InvocationBudget(self.budget)
        self._active.append(entered)
        return entered.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._active.pop().__exit__()

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        the_budget = self.budget
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with _InvocationBudget(the_budget):
                    return await func(*args, **kwargs)

            return cast("Callable[P, R]", run_async)

        @functools.wraps(func)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with _InvocationBudget(the_budget):
                return func(*args, **kwargs)

        return run
