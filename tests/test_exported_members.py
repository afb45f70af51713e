"""The public namespace: sorted, complete ``__all__``; exported classes say ``allowance``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import allowance

PUBLIC_MODULES = [
    "allowance",
    "allowance.typing",
    "allowance.testing",
    "allowance.hookspecs",
    "allowance.integration",
    "allowance.plugins",
    "allowance.telemetry",
    "allowance.webhooks",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported)
    for member in exported:
        assert hasattr(module, member), member


def test_every_public_name_is_exported() -> None:
    public = {n for n in dir(allowance) if not n.startswith("_")}
    modules = {
        "hookspecs",
        "integration",
        "plugins",
        "telemetry",
        "testing",
        "typing",
        "webhooks",
    }
    assert public - modules - {"annotations"} <= set(allowance.__all__)


def test_exported_classes_belong_to_allowance() -> None:
    for name in allowance.__all__:
        member = getattr(allowance, name)
        if isinstance(member, type):
            assert member.__module__ in {"allowance", "allowance.typing"}, name


def test_import_is_light_and_has_no_side_effects() -> None:
    code = (
        "import sys, allowance, openai;"
        "heavy = {'genai_prices', 'tiktoken', 'rich', 'langchain_core', 'crewai',"
        " 'llama_index'} & set(sys.modules);"
        "from openai._base_client import SyncAPIClient;"
        "assert not hasattr(SyncAPIClient.request, '__wrapped__');"
        "print(sorted(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
