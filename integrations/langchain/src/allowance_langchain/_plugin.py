"""The plugin ``allowance`` loads through the entry point (work in progress)."""

from __future__ import annotations

from allowance import hookimpl


@hookimpl
def allowance_adapters() -> list[object]:
    """Return the LangChain adapter."""
    return []
