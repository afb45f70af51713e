"""allowance for CrewAI: one line puts a crew under budget.

``allowance.patch(budget="$5.00")`` installs this adapter with every other
available one. Or explicitly::

    guard = allowance.Guard(budget=[allowance.Budget("$5", per="crew"),
                                    allowance.Budget("$1", per="agent")])
    allowance_crewai.install(guard)
    crew.kickoff()
    allowance_crewai.uninstall()

Calls are attributed to ``crew`` (the crew's name, else its id), ``agent`` (the
agent's role), ``task`` (the task's name, else its id) and ``iteration``.
Importing this package does not import CrewAI; ``install`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from allowance_crewai._plugin import ADAPTER, CrewAIAdapter

if TYPE_CHECKING:
    import allowance
    from allowance_crewai._hooks import CrewBudgetExceeded

__all__ = ["ADAPTER", "CrewAIAdapter", "CrewBudgetExceeded", "install", "uninstall"]


def __getattr__(name: str) -> Any:
    """``CrewBudgetExceeded`` subclasses a CrewAI class: import CrewAI on first use."""
    if name == "CrewBudgetExceeded":
        from allowance_crewai._hooks import CrewBudgetExceeded  # noqa: PLC0415

        return CrewBudgetExceeded
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def install(guard: allowance.Guard) -> None:
    """Charge every CrewAI model call to ``guard``; installing again swaps the guard.

    Install before ``kickoff``: CrewAI's executors copy the hook list when built.

    Raises:
        ConfigurationError: ``guard`` is not an ``allowance.Guard``.
        AdapterUnavailableError: CrewAI is not installed in a supported version.
    """
    ADAPTER.install(guard)


def uninstall() -> None:
    """Remove every hook ``install`` registered; a no-op when not installed."""
    ADAPTER.uninstall()
