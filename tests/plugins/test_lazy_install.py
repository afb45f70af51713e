"""``patch()`` imports nothing the program does not use: adapters wait for imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import allowance
from allowance import plugins


class WaitingAdapter:
    name = "waiting"
    requires = ()

    def __init__(self, module: str) -> None:
        self.module = module
        self.guards: list[allowance.Guard | None] = []

    def available(self) -> bool:
        return True

    def install(self, guard: allowance.Guard) -> None:
        self.guards.append(guard)

    def uninstall(self) -> None:
        self.guards.append(None)


@pytest.fixture
def framework(tmp_path, monkeypatch):
    """A module nobody has imported yet, and an adapter waiting for it."""
    name = f"fake_framework_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    adapter = WaitingAdapter(name)

    class Plugin:
        @allowance.hookimpl
        def allowance_adapters(self):
            return [adapter]

    plugin = Plugin()
    plugins.register(plugin)
    yield name, adapter
    allowance.unpatch()
    plugins.unregister(plugin)
    sys.modules.pop(name, None)


def test_an_adapter_is_installed_when_its_module_is_imported(framework):
    name, adapter = framework
    guard = allowance.patch(budget=10, ledger="memory://", adapters=["waiting"])
    assert adapter.guards == []
    assert name not in sys.modules
    __import__(name)
    assert adapter.guards == [guard]
    allowance.unpatch()
    assert adapter.guards == [guard, None]


def test_the_latest_guard_wins_and_unpatch_cancels_the_wait(framework):
    name, adapter = framework
    allowance.patch(budget=10, ledger="memory://", adapters=["waiting"])
    second = allowance.patch(budget=20, ledger="memory://", adapters=["waiting"])
    allowance.unpatch()
    __import__(name)
    assert adapter.guards == []  # unpatched before the import: nothing installed
    third = allowance.patch(budget=30, ledger="memory://", adapters=["waiting"])
    assert adapter.guards == [third]  # imported now: installed at once
    assert second is not third


def test_patch_imports_no_sdk_the_program_does_not_use():
    code = textwrap.dedent(
        """
        import sys, allowance
        allowance.patch(budget=1000, ledger="memory://")
        print(sorted({"openai", "anthropic"} & set(sys.modules)))
        import openai
        from openai._base_client import SyncAPIClient
        print(hasattr(SyncAPIClient.request, "__wrapped__"))
        print("anthropic" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["[]", "True", "False"]


def test_import_allowance_leaves_the_heavy_modules_for_first_use():
    """What ``import allowance`` costs (the README's import time) stays small.

    ``importlib.metadata`` (for ``__version__``), ``asyncio`` (the SQLite
    ledger's async twins), ``wrapt`` (``patch``'s import hooks, the SDK layer)
    and the SDKs come when first used, not with the package.
    """
    code = textwrap.dedent(
        """
        import sys
        before = set(sys.modules)
        import allowance
        heavy = {"importlib.metadata", "asyncio", "wrapt", "openai", "anthropic"}
        print(sorted(heavy & (set(sys.modules) - before)))
        print(allowance.__version__ == __import__("importlib.metadata").metadata.version("allowance"))
        import allowance.typing
        print(allowance.typing.Usage is allowance.Usage)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["[]", "True", "True"]


def test_patch_while_another_thread_imports_the_module_does_not_deadlock(tmp_path):
    """A second ``patch()`` lands while another thread is inside the import.

    The adapter waits for a module (an earlier ``patch()``); thread A imports
    it, and while its body runs, ``patch()`` is called again. Installing at
    once would import from the module under ``patch()``'s lock and wait for
    A's import, whose post-import hook waits for that lock: both hung. If this
    fails with a timeout, that is the deadlock.
    """
    (tmp_path / "slow_framework.py").write_text(
        "import slow_gate\nslow_gate.entered.set()\nslow_gate.release.wait(10)\n"
    )
    (tmp_path / "slow_gate.py").write_text(
        "import threading\nentered, release = threading.Event(), threading.Event()\n"
    )
    code = textwrap.dedent(
        """
        import importlib, sys, threading
        sys.path.insert(0, sys.argv[1])
        import allowance, slow_gate

        class Adapter:
            name, requires, module = "slow", (), "slow_framework"
            guards = []
            def available(self): return True
            def install(self, guard):
                importlib.import_module(self.module)  # as the SDK adapters do
                self.guards.append(guard)
            def uninstall(self): pass

        adapter = Adapter()
        class Plugin:
            @allowance.hookimpl
            def allowance_adapters(self): return [adapter]
        allowance.plugins.register(Plugin())
        allowance.patch(budget=10, ledger="memory://", adapters=["slow"])
        importer = threading.Thread(target=importlib.import_module,
                                    args=("slow_framework",))
        importer.start()
        slow_gate.entered.wait(10)  # A is inside the module's body
        threading.Timer(0.2, slow_gate.release.set).start()
        second = allowance.patch(budget=20, ledger="memory://", adapters=["slow"])
        importer.join(10)
        print(adapter.guards == [second], allowance.active_guard() is second)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_patching_again_with_fewer_adapters_uninstalls_the_others(framework):
    """``patch(adapters=[...])`` again: an adapter left out no longer charges
    the first guard (the SDKs left out were still on it)."""
    import openai._base_client as o_base

    name, adapter = framework
    __import__(name)
    original = o_base.SyncAPIClient.__dict__["request"]
    first = allowance.patch(
        budget=10, ledger="memory://", adapters=["waiting", "openai"]
    )
    assert o_base.SyncAPIClient.__dict__["request"] is not original
    second = allowance.patch(budget=20, ledger="memory://", adapters=["waiting"])
    assert o_base.SyncAPIClient.__dict__["request"] is original  # uninstalled
    assert adapter.guards == [first, second]
    assert allowance.active_guard() is second
