"""``wrap()`` one client, ``patch()`` every client and framework, ``unpatch()``."""

from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import TYPE_CHECKING, Literal, TypeVar, final

from allowance import plugins
from allowance._errors import AdapterUnavailableError, ConfigurationError, UsageError
from allowance._guard import Guard
from allowance._scope import new_id

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from decimal import Decimal

    from allowance._budget import Budget, BudgetStatus
    from allowance._policy import Fail, OnLimit, Policy
    from allowance._sdk._adapter import SdkAdapter
    from allowance.typing import Adapter, Ledger

__all__ = [
    "ClientAllowance",
    "active_guard",
    "make_guard",
    "patch",
    "unpatch",
    "unwrap",
    "wrap",
]

logger = logging.getLogger("allowance")

C = TypeVar("C")
Window = Literal["hour", "day", "week", "month"]

_lock = threading.RLock()
_active: Guard | None = None
_installed: dict[str, Adapter] = {}
# Adapters whose framework is not imported yet: installed when it is.
_waiting: dict[str, tuple[Adapter, Guard]] = {}
_import_hooks: set[str] = set()


@final
class ClientAllowance:
    """What ``client.allowance`` shows on a wrapped client.

    Amounts: USD budgets as ``Decimal`` dollars, token budgets as ``int``.
    """

    __module__ = "allowance"
    __slots__ = ("guard",)

    def __init__(self, guard: Guard) -> None:
        """Show ``guard``'s budgets for the client's scope."""
        self.guard = guard

    def __repr__(self) -> str:
        """Summarise each budget."""
        try:
            lines = "; ".join(s.describe() for s in self.status())
        except Exception as err:  # noqa: BLE001 - a repr must not raise
            lines = f"<unavailable: {err}>"
        return f"<allowance {lines}>"

    @property
    def spent(self) -> Decimal | int:
        """Committed spend of the client's first budget."""
        return self.guard.spent()

    @property
    def remaining(self) -> Decimal | int:
        """What the first budget has left, counting calls in flight."""
        return self.guard.remaining()

    def status(self) -> list[BudgetStatus]:
        """Every budget that applies to the client's calls here, with its counters."""
        return self.guard.status()


def _sdk_adapter_for(client: object) -> SdkAdapter:
    from allowance._sdk._adapter import SdkAdapter  # noqa: PLC0415

    for adapter in plugins.adapters().values():
        if isinstance(adapter, SdkAdapter) and adapter.owns(client):
            return adapter
    module = type(client).__module__.partition(".")[0]  # the adapter's name
    if plugins.get_plugin_manager().is_blocked(module):
        raise UsageError(
            f"wrap() cannot guard this {type(client).__qualname__}: the {module!r}"
            " adapter is disabled (ALLOWANCE_DISABLED_ADAPTERS)",
            value=client,
            expected=f"ALLOWANCE_DISABLED_ADAPTERS without {module!r}",
        )
    raise UsageError(
        "wrap() takes an OpenAI or Anthropic SDK client, "
        f"not {type(client).__qualname__}",
        value=client,
        expected="openai.OpenAI, AsyncOpenAI, AzureOpenAI, anthropic.Anthropic "
        "or AsyncAnthropic",
    )


def make_guard(
    *,
    guard: Guard | None = None,
    policy: Policy | None = None,
    budget: int | str | Budget | Iterable[Budget] | None = None,
    per: str = "session",
    window: Window | None = None,
    fallback: str | Mapping[str, str] | None = None,
    threshold: float | None = None,
    on_limit: OnLimit = "raise",
    fail: Fail = "closed",
    ledger: str | Ledger | None = None,
    session: str | None = None,
    scope: Mapping[str, str | int] | None = None,
    defaults: Mapping[str, str | int] | None = None,
) -> Guard:
    """Return ``guard``, or a new Guard from ``wrap``-style budget arguments.

    What ``wrap``, ``patch`` and framework handlers (``AllowanceCallbackHandler``)
    do with their keyword arguments, in one place. ``session`` is only checked
    here (the caller binds it, to ``scope`` or ``defaults``).

    Raises:
        ConfigurationError: ``guard`` is given together with any budget
            argument, or is not a ``Guard``; or a budget argument is malformed.
    """
    if guard is not None:
        others = (policy, budget, window, fallback, threshold, ledger, session)
        if (
            any(x is not None for x in others)
            or per != "session"
            or on_limit != "raise"
            or fail != "closed"
        ):
            raise ConfigurationError(
                "guard",
                guard,
                "either guard=Guard(...) or the budget arguments, not both",
            )
        if not isinstance(guard, Guard):
            raise ConfigurationError("guard", guard, "an allowance.Guard")
        return guard
    if policy is not None:
        return Guard(policy, ledger=ledger, scope=scope, defaults=defaults)
    return Guard(
        ledger=ledger,
        budget=budget,
        per=per,
        window=window,
        fallback=fallback,
        threshold=threshold,
        on_limit=on_limit,
        fail=fail,
        scope=scope,
        defaults=defaults,
    )


def wrap(
    client: C,
    budget: int | str | Budget | Iterable[Budget] | None = None,
    *,
    per: str = "session",
    window: Window | None = None,
    fallback: str | Mapping[str, str] | None = None,
    threshold: float | None = None,
    on_limit: OnLimit = "raise",
    fail: Fail = "closed",
    ledger: str | Ledger | None = None,
    session: str | None = None,
    policy: Policy | None = None,
    guard: Guard | None = None,
) -> C:
    """Put one OpenAI or Anthropic client under a budget, in place, and return it.

    Every generation request of the client (chat completions, responses,
    messages, embeddings; plain, streamed, parsed, raw, ``with_options``
    copies) is estimated and reserved before it is sent, and charged with the
    provider's usage after. ``isinstance`` and identity are unchanged: it is
    the same client. ``client.allowance`` shows ``spent``, ``remaining`` and
    ``status()``. Wrapping a wrapped client again replaces its guard.

    Args:
        client: ``openai.OpenAI``, ``AsyncOpenAI``, ``AzureOpenAI``,
            ``anthropic.Anthropic`` or ``AsyncAnthropic``.
        budget: ``"$2.00"``, an int of tokens, ``"50k tokens"``, or ``Budget``s.
        per: Dimension of ``budget``; default ``"session"``: this client's
            session (see ``session``).
        window: ``"hour"``, ``"day"``, ``"week"`` or ``"month"``.
        fallback: Cheaper model to degrade to (with ``threshold``), and to try
            before blocking a call whose model does not fit.
        threshold: Ratio at which to degrade (or warn, without ``fallback``).
        on_limit: ``"raise"`` (default), ``"stop"`` or ``"warn"``.
        fail: ``"closed"`` (default) or ``"open"`` on ledger failure.
        ledger: Ledger URL or object; default ``sqlite:///allowance.db``.
        session: Session id this client's calls are charged to; default a new
            id per ``wrap`` (so the budget is this client's own). Pass a fixed id
            to share a session budget across clients or processes.
        policy: A full ``Policy`` instead of the shorthand arguments.
        guard: An existing ``Guard`` to share (then no other budget argument).

    Returns:
        The same client, now guarded.

    Raises:
        UsageError: ``client`` is not a supported SDK client.
        ConfigurationError: An argument is malformed.

    Example:
        >>> client = allowance.wrap(openai.OpenAI(), budget="$2.00",
        ...                         fallback="gpt-4o-mini", threshold=0.8)
    """
    adapter = _sdk_adapter_for(client)
    bound = {"session": session if session is not None else new_id()}
    the_guard = make_guard(
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
        scope=bound if guard is None else None,
    )
    adapter.wrap_client(client, the_guard)
    client.__dict__["allowance"] = ClientAllowance(the_guard)
    return client


def unwrap(client: C) -> C:
    """Undo ``wrap``: the client's requests are no longer guarded by its own guard."""
    _sdk_adapter_for(client).unwrap_client(client)
    return client


def of(client: object) -> ClientAllowance:
    """Return what ``client.allowance`` shows on a wrapped client, typed.

    ``wrap`` sets ``allowance`` on the client instance at run time, so a type
    checker does not know it on ``openai.OpenAI``: ``allowance.of(client)`` is
    the same object under a type that it knows. ``with_options`` and ``copy``
    copies of a wrapped client share it.

    Raises:
        UsageError: ``client`` is not wrapped (never, or ``unwrap`` since).

    Example:
        >>> allowance.of(client).remaining
        Decimal('1.99')
    """
    view = getattr(client, "__dict__", {}).get("allowance")
    if type(view) is ClientAllowance:
        return view
    raise UsageError(
        f"{type(client).__qualname__} is not wrapped: allowance.of() reads what "
        "wrap() set on a client (under patch(), read allowance.active_guard())",
        value=client,
        expected="a client returned by allowance.wrap()",
    )


def active_guard() -> Guard | None:
    """Return the guard ``patch()`` installed, or None."""
    return _active


def patch(
    budget: int | str | Budget | Iterable[Budget] | None = None,
    *,
    per: str = "session",
    window: Window | None = None,
    fallback: str | Mapping[str, str] | None = None,
    threshold: float | None = None,
    on_limit: OnLimit = "raise",
    fail: Fail = "closed",
    ledger: str | Ledger | None = None,
    session: str | None = None,
    policy: Policy | None = None,
    guard: Guard | None = None,
    adapters: Iterable[str] | None = None,
) -> Guard:
    """Guard every SDK client and every installed framework in this process.

    Installs every available adapter (the OpenAI and Anthropic SDKs, and the
    LangChain, CrewAI and LlamaIndex integrations when installed), or only the
    ones named in ``adapters``. Clients built before the call are covered too.
    An adapter whose SDK or framework is not imported yet is installed when
    the program imports it: ``patch()`` imports nothing the program does not
    use. Calling it again replaces the guard and the set of adapters: one
    left out of ``adapters`` is uninstalled.

    Args:
        budget: ``"$5.00"``, an int of tokens, ``"50k tokens"``, or ``Budget``s.
        per: Dimension of ``budget``; default ``"session"``: the process's
            session unless ``allowance.scope(session=...)`` says otherwise.
        window: ``"hour"``, ``"day"``, ``"week"`` or ``"month"``.
        fallback: Cheaper model to degrade to.
        threshold: Ratio at which to degrade (or warn, without ``fallback``).
        on_limit: ``"raise"`` (default), ``"stop"`` or ``"warn"``.
        fail: ``"closed"`` (default) or ``"open"`` on ledger failure.
        ledger: Ledger URL or object; default ``sqlite:///allowance.db``.
        session: The process's default session id (default: a new id).
        policy: A full ``Policy`` instead of the shorthand arguments.
        guard: An existing ``Guard`` (then no other budget argument).
        adapters: Names of the adapters to install; default every available one.

    Returns:
        The guard now in force.

    Raises:
        AdapterUnavailableError: An adapter named in ``adapters`` is not installed.
        ConfigurationError: An argument is malformed.

    Example:
        >>> allowance.patch(budget="$5.00", fallback="gpt-4o-mini", threshold=0.8)
    """
    global _active  # noqa: PLW0603 - one active guard per process, by design
    the_guard = make_guard(
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
        defaults={"session": session}
        if guard is None and session is not None
        else None,
    )
    registry = plugins.adapters()
    if adapters is None:
        chosen = [a for a in registry.values() if a.available()]
        skipped = sorted(set(registry) - {a.name for a in chosen})
        if skipped:
            logger.debug(
                "allowance: adapters not available, skipped: %s", ", ".join(skipped)
            )
    else:
        names = [adapters] if isinstance(adapters, str) else list(adapters)
        chosen = []
        for name in names:
            adapter = registry.get(name)
            if adapter is None:
                raise AdapterUnavailableError(
                    name,
                    f"no such adapter; known: {', '.join(sorted(registry)) or 'none'}",
                )
            if not adapter.available():
                raise AdapterUnavailableError(
                    name,
                    "its framework is not installed in a supported version "
                    f"({adapter.requires})",
                )
            chosen.append(adapter)
    with _lock:
        # Again: the new set replaces the old one (an adapter left out would
        # still charge the guard it was installed with).
        keep = {adapter.name for adapter in chosen}
        for name in [name for name in _installed if name not in keep]:
            _installed.pop(name).uninstall()
        for name in [name for name in _waiting if name not in keep]:
            del _waiting[name]
        for adapter in chosen:
            _install_when_imported(adapter, the_guard)
        _active = the_guard
    return the_guard


def _install_when_imported(adapter: Adapter, guard: Guard) -> None:
    """Install ``adapter`` now if its module is imported, else when it is.

    ``patch()`` must not import frameworks (or SDKs) the program does not use:
    an adapter that names its top-level ``module`` waits for its import.
    """
    module = getattr(adapter, "module", None)
    if not isinstance(module, str) or (
        module in sys.modules and not _hook_pending(module)
    ):
        adapter.install(guard)
        _installed[adapter.name] = adapter
        return
    _waiting[adapter.name] = (adapter, guard)
    if module not in _import_hooks:
        import wrapt  # noqa: PLC0415 - not imported with allowance (import time)

        _import_hooks.add(module)
        wrapt.register_post_import_hook(functools.partial(_on_import, module), module)


def _hook_pending(module: str) -> bool:
    """True while another thread imports ``module`` and our hook is yet to run.

    Installing then would import from ``module`` under ``_lock`` and wait for
    that import, whose post-import hook (``_on_import``) waits for ``_lock``:
    the hook installs the adapter instead.
    """
    spec = getattr(sys.modules[module], "__spec__", None)
    return module in _import_hooks and getattr(spec, "_initializing", False) is True


def _on_import(module: str, _imported: object) -> None:
    """Install the adapters waiting for ``module`` (runs right after its import)."""
    with _lock:
        _import_hooks.discard(module)
        for name, (adapter, guard) in list(_waiting.items()):
            if getattr(adapter, "module", None) != module:
                continue
            del _waiting[name]
            try:
                adapter.install(guard)
            except Exception:
                # Raising here would fail the user's import statement instead.
                logger.exception(
                    "allowance: installing the %r adapter after %s was imported "
                    "failed; its calls are NOT guarded",
                    name,
                    module,
                )
                continue
            _installed[name] = adapter


def unpatch() -> None:
    """Uninstall every adapter ``patch()`` installed; restore the originals exactly."""
    global _active  # noqa: PLW0603
    with _lock:
        for adapter in list(_installed.values()):
            adapter.uninstall()
        _installed.clear()
        _waiting.clear()
        _active = None
