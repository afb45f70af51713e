"""Hook specifications: what an allowance plugin may implement.

A plugin is a module (or object) with functions marked ``@allowance.hookimpl``,
registered under the entry-point group ``allowance``. Hooks are called with
keyword arguments only, so specs can grow new arguments without breaking
existing plugins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from pluggy import HookspecMarker

if TYPE_CHECKING:
    from allowance.typing import Adapter, Event, ProviderCodec

__all__ = [
    "allowance_adapters",
    "allowance_demo_scenes",
    "allowance_event",
    "allowance_providers",
    "hookspec",
]

F = TypeVar("F", bound=Callable[..., object])
hookspec: Callable[[F], F] = HookspecMarker("allowance")


@hookspec
def allowance_adapters() -> Sequence[Adapter]:
    """Return adapters: objects that route a framework's or SDK's calls through a guard.

    Called once when plugins load. Adapter names must be unique across plugins;
    a duplicate raises ``PluginError``. Exceptions propagate.
    """
    raise NotImplementedError


@hookspec
def allowance_providers() -> Sequence[ProviderCodec]:
    """Return provider codecs: estimate a request, read its usage, swap its model.

    Called once when plugins load. Codec names must be unique across plugins.
    Exceptions propagate.
    """
    raise NotImplementedError


@hookspec
def allowance_event(event: Event) -> None:
    """Observe an event (threshold crossed, call blocked, degraded, committed...).

    Called synchronously on the thread that caused the event: return quickly and
    hand slow work to a thread. Exceptions are logged and dropped; an observer
    can never block or break a call (only the guard raises ``BudgetExceeded``).

    A plugin may declare the kinds it wants as ``allowance_event_kinds`` (a
    collection of ``Event.kind`` values, read when it is registered): it gets
    only those. One that wants none of ``"admitted"``, ``"committed"`` and
    ``"degraded"`` leaves the commonest SDK calls on their fast path, which
    emits none of them; any other observer sends every call the full way.
    """


@hookspec
def allowance_demo_scenes() -> Sequence[Callable[..., None]]:
    """Return scenes for ``allowance demo`` (an integration shows its framework).

    A scene is called as ``scene(console, fake, ledger, number)``: a
    ``rich.console.Console``, the running ``allowance.testing.FakeProvider``,
    the demo's ledger URL (every scene charges the same ledger) and the
    scene's number for its heading. It prints what happens as it goes.
    """
    raise NotImplementedError
