"""The plugin ``allowance`` loads through the entry point ``allowance: crewai``.

Cheap to import: CrewAI is imported by ``install`` (and the demo scene), never
here.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import allowance
from allowance import hookimpl
from allowance_crewai._compat import REQUIRES, crewai_supported

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ADAPTER", "CrewAIAdapter"]


class CrewAIAdapter:
    """Routes CrewAI's model calls through a guard with CrewAI's own LLM call hooks.

    Attributes:
        name: ``"crewai"``.
        requires: The CrewAI versions supported.
    """

    name = "crewai"
    requires = REQUIRES
    module = "crewai"  # patch() installs it once the program imports CrewAI

    def available(self) -> bool:
        """Return True when CrewAI is installed in a supported version."""
        return crewai_supported()

    def install(self, guard: allowance.Guard) -> None:
        """Register the hooks for ``guard``; again: swap the guard.

        Raises:
            AdapterUnavailableError: CrewAI is missing or unsupported.
            ConfigurationError: ``guard`` is not an ``allowance.Guard``.
        """
        if not self.available():
            raise allowance.AdapterUnavailableError(
                self.name,
                "CrewAI is not installed in a supported version "
                f"({', '.join(REQUIRES)})",
            )
        with warnings.catch_warnings():
            # Importing CrewAI raises ImportWarnings (fatal under -W error); they
            # are CrewAI's, and allowance.patch() imports it on the user's behalf.
            warnings.simplefilter("ignore", ImportWarning)
            from allowance_crewai import _hooks  # noqa: PLC0415 - imports CrewAI

        _hooks.install(guard)

    def uninstall(self) -> None:
        """Unregister the hooks; a no-op when not installed."""
        import sys  # noqa: PLC0415

        hooks = sys.modules.get("allowance_crewai._hooks")
        if hooks is not None:
            hooks.uninstall()

    def installed(self) -> bool:
        """Return True between ``install`` and ``uninstall``."""
        import sys  # noqa: PLC0415

        hooks = sys.modules.get("allowance_crewai._hooks")
        return hooks is not None and hooks.current_guard() is not None


ADAPTER = CrewAIAdapter()
"""The one adapter instance (``allowance.patch`` and ``install`` share it)."""


@hookimpl
def allowance_adapters() -> list[CrewAIAdapter]:
    """Return the CrewAI adapter."""
    return [ADAPTER]


@hookimpl
def allowance_demo_scenes() -> list[Callable[..., Any]]:
    """Return the demo scene: a two-agent crew sharing the demo's ledger."""
    from allowance_crewai._demo import crew_scene  # noqa: PLC0415

    return [crew_scene]
