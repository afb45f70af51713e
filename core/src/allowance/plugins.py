"""The plugin manager: default plugins, entry points and lookups by name.

Loading is lazy and happens once: the default plugins (the OpenAI and Anthropic
SDK adapters, registered exactly as third-party ones are), then the entry-point
group ``allowance`` (unless ``ALLOWANCE_DISABLE_PLUGIN_AUTOLOAD=1``), then
``check_pending()``. ``ALLOWANCE_DISABLED_ADAPTERS=a,b`` blocks plugins by name.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, TypeVar, cast

import pluggy

from allowance import hookspecs
from allowance._errors import PluginError

if TYPE_CHECKING:
    from allowance.typing import Adapter, Event, ProviderCodec

_Observers = tuple[tuple[tuple[pluggy.HookImpl, "frozenset[str] | None"], ...], bool]

__all__ = [
    "CALL_EVENTS",
    "DEFAULT_PLUGINS",
    "EVENT_KINDS",
    "adapters",
    "emit",
    "get_plugin_manager",
    "has_observers",
    "hookimpl",
    "load_plugins",
    "observes_calls",
    "providers",
    "register",
    "reset_plugins",
    "unregister",
]

F = TypeVar("F", bound=Callable[..., object])
hookimpl: Callable[[F], F] = pluggy.HookimplMarker("allowance")
"""Mark a function as an implementation of an allowance hook."""

DEFAULT_PLUGINS: tuple[str, ...] = ("allowance._sdk.openai", "allowance._sdk.anthropic")
"""Modules registered before entry points, as plugins like any other."""

logger = logging.getLogger("allowance")

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_loaded = False
_adapters: dict[str, Adapter] | None = None
_providers: dict[str, ProviderCodec] | None = None
# The observers, each with the kinds it wants (None: all); whether any may
# want a plainly admitted call's events. Read once per set of plugins.
_observers: _Observers | None = None

EVENT_KINDS: frozenset[str] = frozenset(
    {
        "admitted",
        "threshold",
        "blocked",
        "over_limit",
        "degraded",
        "committed",
        "released",
        "estimate_missed",
        "ledger_failure",
    }
)
"""Every ``Event.kind``: what ``allowance_event_kinds`` may name."""
CALL_EVENTS: frozenset[str] = frozenset({"admitted", "committed", "degraded"})
"""The events of a call admitted as usual: an observer that wants none of them
(``allowance_event_kinds``) leaves such calls on the SDK layer's express lane."""


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading plugins on first use."""
    global _pm  # noqa: PLW0603 - one manager per process, made lazily
    with _lock:
        if _pm is None:
            _pm = pluggy.PluginManager("allowance")
            _pm.add_hookspecs(hookspecs)
        if not _loaded:
            load_plugins(_pm)
        return _pm


def load_plugins(pm: pluggy.PluginManager) -> None:
    """Register the default plugins and the entry points into ``pm`` (once)."""
    global _loaded  # noqa: PLW0603
    disabled = {
        name.strip()
        for name in os.environ.get("ALLOWANCE_DISABLED_ADAPTERS", "").split(",")
        if name.strip()
    }
    for name in disabled:
        pm.set_blocked(name)
    for module_name in DEFAULT_PLUGINS:
        short = module_name.rsplit(".", 1)[-1]
        if pm.has_plugin(short) or pm.is_blocked(short):
            continue
        pm.register(importlib.import_module(module_name), name=short)
    if os.environ.get("ALLOWANCE_DISABLE_PLUGIN_AUTOLOAD", "") not in {
        "1",
        "true",
        "yes",
    }:
        _load_entry_points(pm)
    pm.check_pending()
    for plugin in pm.get_plugins():
        _kinds(plugin)  # a bad ``allowance_event_kinds`` fails here, not in a call
    if pm is _pm:
        _loaded = True


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register each ``allowance`` entry point not registered or blocked yet.

    As pluggy's ``load_setuptools_entrypoints``, with one difference: a plugin
    that fails to load raises ``PluginError`` naming it (and how to run without
    it), and the ones loaded before it stay registered, so the next lookup
    raises the same error, not a clash with what this one registered.
    """
    import importlib.metadata  # noqa: PLC0415 - keep `import allowance` light

    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != "allowance" or pm.has_plugin(ep.name):
                continue
            if pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as err:
                project = dist.metadata["Name"] or "an unnamed distribution"
                msg = (
                    f"plugin {ep.name!r} ({ep.value}, from {project}) failed to"
                    f" load: {type(err).__name__}: {err}; set"
                    f" ALLOWANCE_DISABLED_ADAPTERS={ep.name} to run without it"
                )
                raise PluginError(msg) from err
            pm.register(plugin, name=ep.name)


def reset_plugins() -> None:
    """Forget the loaded plugins (tests); the next lookup loads them again."""
    global _pm, _loaded, _adapters, _providers, _observers
    with _lock:
        _pm, _loaded, _adapters, _providers, _observers = None, False, None, None, None


def _collect(results: list[list[object]], kind: str) -> dict[str, object]:
    found: dict[str, object] = {}
    for group in results:
        for item in group:
            name = getattr(item, "name", None)
            if not isinstance(name, str):
                msg = f"{kind} {item!r} has no str .name"
                raise PluginError(msg)
            if name in found:
                msg = (
                    f"two plugins provide the {kind} {name!r}: "
                    f"{found[name]!r} and {item!r}"
                )
                raise PluginError(msg)
            found[name] = item
    return found


def adapters() -> dict[str, Adapter]:
    """Return every registered adapter by name."""
    global _adapters  # noqa: PLW0603
    found = _adapters
    if found is None:
        pm = get_plugin_manager()
        found = _adapters = cast(
            "dict[str, Adapter]", _collect(pm.hook.allowance_adapters(), "adapter")
        )
    return found


def providers() -> dict[str, ProviderCodec]:
    """Return every registered provider codec by name."""
    global _providers  # noqa: PLW0603
    found = _providers
    if found is None:
        pm = get_plugin_manager()
        found = _providers = cast(
            "dict[str, ProviderCodec]",
            _collect(pm.hook.allowance_providers(), "provider"),
        )
    return found


def register(plugin: object, name: str | None = None) -> None:
    """Register a plugin object at run time (not through an entry point).

    Example:
        >>> class Printer:
        ...     @hookimpl
        ...     def allowance_event(self, event): print(event.kind)
        >>> register(Printer())

    Raises:
        PluginError: The plugin's ``allowance_event_kinds`` is not a
            collection of ``Event.kind`` values (``EVENT_KINDS``).
    """
    global _adapters, _providers, _observers  # noqa: PLW0603
    _kinds(plugin)
    with _lock:
        get_plugin_manager().register(plugin, name=name)
        _adapters = _providers = _observers = None


def unregister(plugin: object) -> None:
    """Unregister a plugin registered with ``register``."""
    global _adapters, _providers, _observers  # noqa: PLW0603
    with _lock:
        get_plugin_manager().unregister(plugin)
        _adapters = _providers = _observers = None


def has_observers() -> bool:
    """Return True when some plugin implements ``allowance_event``."""
    found = _observers
    if found is None:
        found = _read_observers()
    return bool(found[0])


def observes_calls() -> bool:
    """Return True when an observer may want the events of a call admitted as usual.

    True when some plugin implements ``allowance_event`` without declaring
    ``allowance_event_kinds``, or declares one of ``CALL_EVENTS``.
    """
    found = _observers
    if found is None:
        found = _read_observers()
    return found[1]


def _read_observers() -> _Observers:
    """Read and keep the observers and the kinds each wants."""
    global _observers  # noqa: PLW0603
    impls = tuple(
        (impl, _kinds(impl.plugin))
        for impl in get_plugin_manager().hook.allowance_event.get_hookimpls()
    )
    _observers = found = (
        impls,
        any(kinds is None or not CALL_EVENTS.isdisjoint(kinds) for _, kinds in impls),
    )
    return found


def _kinds(plugin: object) -> frozenset[str] | None:
    """The event kinds ``plugin`` declares it wants (``allowance_event_kinds``).

    Raises:
        PluginError: They are not a collection of ``EVENT_KINDS``.
    """
    kinds = getattr(plugin, "allowance_event_kinds", None)
    if kinds is None:
        return None
    if isinstance(kinds, str | bytes) or not isinstance(kinds, Collection):
        msg = (
            f"plugin {plugin!r}: allowance_event_kinds must be a collection of"
            f" event kinds such as {{'blocked'}}, got {kinds!r}"
        )
        raise PluginError(msg)
    unknown = sorted(str(kind) for kind in kinds if kind not in EVENT_KINDS)
    if unknown:
        msg = (
            f"plugin {plugin!r}: allowance_event_kinds names unknown event kinds"
            f" {unknown}; expected some of {sorted(EVENT_KINDS)}"
        )
        raise PluginError(msg)
    return frozenset(kinds)


def emit(event: Event) -> None:
    """Broadcast ``event`` to every observer; their errors are logged and dropped.

    An observer whose plugin declares ``allowance_event_kinds`` gets only
    events of those kinds.
    """
    found = _observers
    if found is None:
        found = _read_observers()
    for impl, kinds in found[0]:
        if kinds is not None and event.kind not in kinds:
            continue
        try:
            impl.function(event=event)
        except Exception:
            logger.exception(
                "allowance: observer %s failed on event %r; ignored",
                impl.plugin_name,
                event.kind,
            )
