"""Put a CrewAI crew under budget: offline, against allowance's fake provider.

Run from the repository root::

    python examples/crewai_budget.py

First the one line (``allowance.patch``) covers a two-agent crew; then an
explicit guard gives each agent its own budget next to a crew-wide one, and
the crew is stopped (``allowance.BudgetExceeded`` from ``kickoff``) before the
request that would overspend is sent.
"""

from __future__ import annotations

import logging
import os

# Keep CrewAI offline: no telemetry, no tracing (set before importing it).
for _name, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
}.items():
    os.environ.setdefault(_name, _value)
# CrewAI logs its token-count notes, and a refused call as an error on the root
# logger; this example prints what happened itself.
logging.getLogger().setLevel(logging.CRITICAL)
logging.getLogger("crewai").setLevel(logging.CRITICAL)

import allowance  # noqa: E402
import allowance_crewai  # noqa: E402
from allowance.testing import FakeProvider  # noqa: E402
from crewai import LLM, Agent, Crew, Task  # noqa: E402

ANSWER = "Final Answer: Revenue grew eleven percent while costs held flat."


def newsroom(llm: LLM, *tasks: str) -> Crew:
    """A researcher and a writer sharing one LLM object, taking turns on tasks."""
    researcher = Agent(
        role="researcher",
        goal="Find the facts.",
        backstory="Terse.",
        llm=llm,
        verbose=False,
    )
    writer = Agent(
        role="writer", goal="Write it up.", backstory="Terse.", llm=llm, verbose=False
    )
    return Crew(
        name="newsroom",
        agents=[researcher, writer],
        tasks=[
            Task(
                name=name,
                description=f"Do the {name} for the quarterly report in one line.",
                expected_output="One line.",
                agent=researcher if i % 2 == 0 else writer,
            )
            for i, name in enumerate(tasks)
        ],
        verbose=False,
    )


def show(guard: allowance.Guard) -> None:
    """Print the call log: who spent what, on which model."""
    for call in guard.ledger.calls():
        cost = (call.cost_micros or 0) / 1e6
        print(
            f"  {call.scope['agent']:<10} {call.scope['task']:<10} "
            f"{call.model:<12} {call.outcome:<8} ${cost:.5f}"
        )


def main() -> None:
    """Run both stories against a fake provider on 127.0.0.1."""
    with FakeProvider(text=ANSWER) as fake:
        llm = LLM(
            model="gpt-4o", base_url=fake.openai_base_url, api_key="fake", max_tokens=60
        )

        print("1. The one line: every crew in the process under $5.00")
        guard = allowance.patch(
            budget="$5.00", fallback="gpt-4o-mini", ledger="memory://"
        )
        newsroom(llm, "research", "draft").kickoff()
        show(guard)
        allowance.unpatch()

        print("2. A budget per agent ($0.003) and per crew ($1), explicitly")
        guard = allowance.Guard(
            budget=[
                allowance.Budget("$0.003", per="agent"),
                allowance.Budget("$1", per="crew"),
            ],
            ledger="memory://",
        )
        allowance_crewai.install(guard)
        sent = fake.generation_count
        try:
            newsroom(
                llm, "research", "draft", "check", "polish", "sources", "headline"
            ).kickoff()
        except allowance.BudgetExceeded as err:
            print(f"  kickoff() raised BudgetExceeded: {err}")
        finally:
            allowance_crewai.uninstall()
        show(guard)
        print(
            f"  {fake.generation_count - sent} requests sent; llm.model={llm.model!r}"
        )


if __name__ == "__main__":
    main()
