"""Plugins: default adapters register like third-party ones; observers never break calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pluggy
import pytest

import allowance
from allowance import Estimate, Guard, Usage, hookimpl, hookspecs, plugins


@pytest.fixture
def fresh_plugins() -> Iterator[None]:
    plugins.reset_plugins()
    yield
    plugins.reset_plugins()


def test_default_plugins_provide_the_sdk_adapters_and_codecs(
    fresh_plugins: None,
) -> None:
    assert {"openai", "anthropic"} <= set(plugins.adapters())
    assert {"openai", "anthropic"} <= set(plugins.providers())
    pm = plugins.get_plugin_manager()
    assert pm.get_plugin("openai") is not None


def test_adapters_can_be_blocked_by_environment(
    fresh_plugins: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLOWANCE_DISABLED_ADAPTERS", "anthropic")
    assert "anthropic" not in plugins.adapters()
    assert "openai" in plugins.adapters()
    import anthropic

    # wrap() says why (it said "takes an OpenAI or Anthropic SDK client").
    with pytest.raises(allowance.UsageError, match="'anthropic' adapter is disabled"):
        allowance.wrap(anthropic.Anthropic(api_key="x"), 100, ledger="memory://")


def test_duplicate_adapter_names_are_refused(fresh_plugins: None) -> None:
    class Other:
        name = "openai"

    class Dup:
        @hookimpl
        def allowance_adapters(self) -> list[Any]:
            return [Other()]

    plugins.get_plugin_manager().register(Dup())
    with pytest.raises(
        allowance.PluginError, match="two plugins provide the adapter 'openai'"
    ):
        plugins.adapters()


def test_a_failing_observer_never_breaks_a_call(
    fresh_plugins: None, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    class Observer:
        @hookimpl
        def allowance_event(self, event: allowance.Event) -> None:
            seen.append(event.kind)
            raise RuntimeError("observer bug")

    plugins.get_plugin_manager().register(Observer())
    guard = Guard(budget=100, ledger="memory://")
    guard.begin(Estimate("openai", "gpt-4o", 10, 10)).commit(Usage(10, 10))
    assert "committed" in seen
    assert "observer bug" in caplog.text
    assert guard.spent() == 20


def test_an_observer_gets_only_the_event_kinds_it_declares(
    fresh_plugins: None,
) -> None:
    seen: list[str] = []

    class Refusals:
        allowance_event_kinds = frozenset({"blocked"})

        @hookimpl
        def allowance_event(self, event: allowance.Event) -> None:
            seen.append(event.kind)

    plugins.register(Refusals())
    assert plugins.has_observers()
    assert not plugins.observes_calls()
    guard = Guard(budget=100, ledger="memory://")
    guard.begin(Estimate("openai", "gpt-4o", 10, 10)).commit(Usage(10, 10))
    with pytest.raises(allowance.BudgetExceeded):
        guard.begin(Estimate("openai", "gpt-4o", 50, 50))
    assert seen == ["blocked"]


def test_every_event_kind_the_guard_emits_may_be_declared() -> None:
    """``EVENT_KINDS`` (what ``allowance_event_kinds`` may name) lists every
    kind the guard and its tickets emit."""
    import inspect
    import re

    from allowance import _guard, _ticket

    emitted: set[str] = set()
    for module in (_guard, _ticket):
        source = inspect.getsource(module)
        emitted |= set(re.findall(r'_emit\(\s*"(\w+)"', source))
        emitted |= set(re.findall(r'kind="(\w+)"', source))
    assert emitted == plugins.EVENT_KINDS


@pytest.mark.parametrize(
    ("kinds", "message"),
    [
        ("blocked", "must be a collection of event kinds"),
        (42, "must be a collection of event kinds"),
        ({"blocked", "block"}, r"unknown event kinds \['block'\]"),
    ],
)
def test_bad_event_kinds_are_refused_when_registered(
    fresh_plugins: None, kinds: object, message: str
) -> None:
    class Observer:
        allowance_event_kinds = kinds

        @hookimpl
        def allowance_event(self, event: allowance.Event) -> None:
            del event

    with pytest.raises(allowance.PluginError, match=message):
        plugins.register(Observer())
    assert not plugins.has_observers()
    # An entry point's plugin: refused when the plugins load, not in a call.
    pm = pluggy.PluginManager("allowance")
    pm.add_hookspecs(hookspecs)
    pm.register(Observer())
    with pytest.raises(allowance.PluginError, match=message):
        plugins.load_plugins(pm)


def test_hookspecs_are_keyword_only_and_few() -> None:
    pm = pluggy.PluginManager("allowance")
    from allowance import hookspecs

    pm.add_hookspecs(hookspecs)
    names = sorted(n for n in dir(pm.hook) if n.startswith("allowance_"))
    assert names == [
        "allowance_adapters",
        "allowance_demo_scenes",
        "allowance_event",
        "allowance_providers",
    ]


def test_patch_and_unpatch_restore_the_originals(fresh_plugins: None) -> None:
    import anthropic._base_client as a_base
    import openai._base_client as o_base

    originals = [
        cls.__dict__["request"]
        for cls in (o_base.SyncAPIClient, o_base.AsyncAPIClient, a_base.SyncAPIClient)
    ]
    guard = allowance.patch(budget=100, ledger="memory://")
    try:
        assert allowance.active_guard() is guard
        assert o_base.SyncAPIClient.__dict__["request"] is not originals[0]
        again = allowance.patch(budget=200, ledger="memory://")
        assert allowance.active_guard() is again
    finally:
        allowance.unpatch()
        allowance.unpatch()  # idempotent
    assert allowance.active_guard() is None
    now = [
        cls.__dict__["request"]
        for cls in (o_base.SyncAPIClient, o_base.AsyncAPIClient, a_base.SyncAPIClient)
    ]
    assert all(a is b for a, b in zip(now, originals, strict=True))


def test_patch_of_a_named_adapter_only(fresh_plugins: None) -> None:
    import anthropic._base_client as a_base

    original = a_base.SyncAPIClient.__dict__["request"]
    allowance.patch(budget=100, ledger="memory://", adapters=["openai"])
    try:
        assert a_base.SyncAPIClient.__dict__["request"] is original
    finally:
        allowance.unpatch()


@pytest.fixture
def entry_point_plugin(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real distribution on sys.path declaring a plugin under group ``allowance``."""
    _distribution(
        tmp_path,
        "fakeplug",
        "from allowance import hookimpl\n"
        "class Adapter:\n"
        "    name = 'fakeplug'\n"
        "    requires = ()\n"
        "    def available(self): return True\n"
        "    def install(self, guard): pass\n"
        "    def uninstall(self): pass\n"
        "@hookimpl\n"
        "def allowance_adapters():\n"
        "    return [Adapter()]\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fakeplug"


def _distribution(path, name: str, source: str) -> None:
    """Write an installed distribution ``allowance-<name>`` whose ``allowance``
    entry point ``name`` is the module ``<name>_mod`` of ``source``."""
    dist = path / f"allowance_{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: allowance-{name}\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(f"[allowance]\n{name} = {name}_mod\n")
    (path / f"{name}_mod.py").write_text(source)


def test_entry_points_are_loaded(fresh_plugins: None, entry_point_plugin: str) -> None:
    assert entry_point_plugin in plugins.adapters()


def test_autoload_can_be_turned_off(
    fresh_plugins: None, entry_point_plugin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLOWANCE_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert entry_point_plugin not in plugins.adapters()
    assert "openai" in plugins.adapters()  # default plugins are not entry points


@pytest.fixture
def broken_entry_point(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real distribution whose ``allowance`` plugin raises on import."""
    _distribution(tmp_path, "broken", "raise RuntimeError('broken fails on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "broken"


def test_a_plugin_that_fails_to_load_is_named_every_time(
    fresh_plugins: None, broken_entry_point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same typed error on each lookup, naming the plugin and the way out.

    If this fails with "Plugin name already registered: openai": the first
    failure left the default plugins registered and the loader ran again.
    """
    import openai

    for attempt in (
        lambda: allowance.patch(budget=100, ledger="memory://"),
        lambda: allowance.patch(budget=100, ledger="memory://"),
        lambda: allowance.wrap(openai.OpenAI(api_key="x"), 100, ledger="memory://"),
    ):
        with pytest.raises(allowance.PluginError) as caught:
            attempt()
        message = str(caught.value)
        assert "'broken'" in message
        assert "allowance-broken" in message
        assert "broken fails on import" in message
        assert f"ALLOWANCE_DISABLED_ADAPTERS={broken_entry_point}" in message
        assert isinstance(caught.value.__cause__, RuntimeError)
    assert allowance.active_guard() is None
    monkeypatch.setenv("ALLOWANCE_DISABLED_ADAPTERS", broken_entry_point)
    plugins.reset_plugins()
    guard = allowance.patch(budget=100, ledger="memory://")
    try:
        assert allowance.active_guard() is guard
        assert "openai" in plugins.adapters()
    finally:
        allowance.unpatch()
