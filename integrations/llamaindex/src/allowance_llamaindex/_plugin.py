"""The plugin ``allowance`` loads through the entry point ``allowance``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from allowance import hookimpl
from allowance_llamaindex._adapter import adapter

if TYPE_CHECKING:
    from collections.abc import Callable

    from allowance.typing import Adapter


@hookimpl
def allowance_adapters() -> list[Adapter]:
    """Return the LlamaIndex adapter (``available()`` says if LlamaIndex is there)."""
    return [adapter]


@hookimpl
def allowance_demo_scenes() -> list[Callable[..., None]]:
    """Return the LlamaIndex demo scene (it imports LlamaIndex when run)."""
    from allowance_llamaindex._demo import scene  # noqa: PLC0415

    return [scene]
