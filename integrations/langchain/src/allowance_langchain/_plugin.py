"""The plugin ``allowance`` loads through the entry point ``langchain``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from allowance import hookimpl

if TYPE_CHECKING:
    from collections.abc import Callable

    from allowance.typing import Adapter


@hookimpl
def allowance_adapters() -> list[Adapter]:
    """Return the LangChain adapter (``allowance.patch()`` installs it)."""
    from allowance_langchain._adapter import LangChainAdapter  # noqa: PLC0415

    return [LangChainAdapter()]


@hookimpl
def allowance_demo_scenes() -> list[Callable[..., None]]:
    """Return the LangChain scene of ``allowance demo``."""
    from allowance_langchain._demo import scene  # noqa: PLC0415

    return [scene]
