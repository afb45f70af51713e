"""The ``allowance demo`` scene: a two-agent crew on the demo's ledger.

CrewAI is imported inside the scene (it takes seconds), with its telemetry
and tracing turned off first, so the demo stays offline.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import allowance

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.console import Console

    from allowance.testing import FakeProvider

__all__ = ["crew_scene"]

_OFFLINE = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
}
_PLAN = (
    ("research", "reporter"),
    ("draft", "editor"),
    ("fact-check", "reporter"),
    ("polish", "editor"),
    ("sources", "reporter"),
    ("headline", "editor"),
)
_ANSWER = (
    "Final Answer: Revenue grew eleven percent while costs held flat, so margins "
    "widened and the board expects the same pace next quarter."
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide CrewAI's own console output and logs while the crew runs."""
    logging.disable(logging.CRITICAL)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            yield
    finally:
        logging.disable(logging.NOTSET)


def crew_scene(console: Console, fake: FakeProvider, ledger: str, number: int) -> None:
    """A reporter and an editor share one LLM object; each has its own budget."""
    console.print()
    console.rule(f"[bold]{number}. A CrewAI crew: a budget per agent and per crew")
    console.print(
        "reporter and editor share one gpt-4o LLM object through six tasks; each "
        "agent may spend $0.0041, the crew $0.01. One line installs the hooks; "
        "calls are charged per agent, exactly, and refused before sending.",
        style="dim",
    )
    for name, value in _OFFLINE.items():
        os.environ.setdefault(name, value)
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)
        import crewai  # noqa: PLC0415 - slow; only when the scene runs

    from allowance_crewai import install, uninstall  # noqa: PLC0415

    guard = allowance.Guard(
        allowance.Policy(
            [
                allowance.Budget("$0.0041", per="agent", name="agent"),
                allowance.Budget("$0.01", per="crew", name="crew"),
            ]
        ),
        ledger=ledger,
    )
    crew_name = f"newsroom-{int(time.time())}"
    llm = crewai.LLM(
        model="gpt-4o", base_url=fake.openai_base_url, api_key="demo", max_tokens=60
    )
    crew = _crew(crewai, llm, crew_name)
    fake.text = _ANSWER
    install(guard)
    sent = fake.generation_count
    outcome = "the crew finished"
    try:
        with _quiet():
            crew.kickoff()
    except allowance.BudgetExceeded as err:
        outcome = (
            f"[bold]BudgetExceeded[/] from kickoff() after "
            f"{fake.generation_count - sent} requests: {err}"
        )
    finally:
        uninstall()
    _report(console, guard, crew_name)
    console.print(f"  {outcome}", highlight=False)
    console.print(f"  the shared LLM object still says model={llm.model!r}")
    guard.close()


def _crew(crewai: Any, llm: Any, name: str) -> Any:
    agents = {
        role: crewai.Agent(
            role=role,
            goal=f"Be a good {role}.",
            backstory="Terse.",
            llm=llm,
            max_iter=1,
            verbose=False,
        )
        for role in ("reporter", "editor")
    }
    tasks = [
        crewai.Task(
            name=task,
            description=f"Do the {task} for the quarterly report in one line.",
            expected_output="One line.",
            agent=agents[role],
        )
        for task, role in _PLAN
    ]
    return crewai.Crew(
        name=name, agents=list(agents.values()), tasks=tasks, verbose=False
    )


def _report(console: Console, guard: allowance.Guard, crew_name: str) -> None:
    for record in guard.ledger.calls():
        if record.scope.get("crew") != crew_name:
            continue
        agent, task = record.scope.get("agent", "?"), record.scope.get("task", "?")
        if record.outcome == "blocked":
            console.print(f"  {agent:<10} {task:<11} [red]blocked, nothing sent[/]")
            continue
        cost = (record.cost_micros or 0) / 1_000_000
        console.print(f"  {agent:<10} {task:<11} {record.model:<8} ${cost:.5f}")
    spent = {
        role: guard.spent({"crew": crew_name, "agent": role})
        for role in ("reporter", "editor")
    }
    crew_spent = guard.spent({"crew": crew_name})
    console.print(
        f"  spent: reporter ${spent['reporter']:.5f}, editor "
        f"${spent['editor']:.5f}, crew ${crew_spent:.5f}"
    )
