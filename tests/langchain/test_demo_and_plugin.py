"""The plugin's hooks: the adapter ``allowance.patch()`` finds, and the demo scene."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from langchain_core.tracers import context as tracer_context
from rich.console import Console

import allowance
from allowance import plugins
from allowance_langchain import _plugin

if TYPE_CHECKING:
    from allowance.testing import FakeProvider


def _our_hooks() -> int:
    return sum(
        1
        for var, *_ in tracer_context._configure_hooks
        if var.name == "allowance_langchain_handler"
    )


def test_install_registers_one_hook_and_uninstall_removes_it() -> None:
    """Two installs leave one configure hook; unpatch leaves none."""
    adapter = plugins.adapters()["langchain"]
    allowance.patch(budget=10, ledger="memory://", adapters=["langchain"])
    allowance.patch(budget=10, ledger="memory://", adapters=["langchain"])
    try:
        assert _our_hooks() == 1
        assert repr(adapter) == "<LangChainAdapter installed>"
    finally:
        allowance.unpatch()
    assert _our_hooks() == 0
    assert repr(adapter) == "<LangChainAdapter not installed>"


def test_the_demo_scene_runs_a_loop_until_blocked(fake_provider: FakeProvider) -> None:
    """The scene degrades, then stops the loop with BudgetExceeded, in a few calls."""
    (scene,) = _plugin.allowance_demo_scenes()
    out = io.StringIO()
    scene(Console(file=out, width=120), fake_provider, "memory://", 7)
    text = out.getvalue()
    assert "7. A LangChain agent loop" in text
    assert "gpt-4o-mini" in text
    assert "BudgetExceeded" in text
    assert 0 < fake_provider.generation_count < 60
