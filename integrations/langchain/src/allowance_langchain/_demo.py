"""The LangChain scene of ``allowance demo``."""

from __future__ import annotations

from itertools import groupby
from typing import TYPE_CHECKING, Any

import allowance

if TYPE_CHECKING:
    from rich.console import Console

    from allowance.testing import FakeProvider

__all__ = ["scene"]

_MAX_STEPS = 60


def scene(console: Console, fake: FakeProvider, ledger: str, number: int) -> None:
    """A LangChain agent loop under a per-run budget: degraded, then stopped."""
    from langchain_core.messages import AIMessage, HumanMessage  # noqa: PLC0415
    from langchain_core.runnables import RunnableConfig, RunnableLambda  # noqa: PLC0415
    from langchain_openai import ChatOpenAI  # noqa: PLC0415

    from allowance_langchain import AllowanceCallbackHandler  # noqa: PLC0415

    console.print()
    console.rule(f"[bold]{number}. A LangChain agent loop with a budget per run")
    console.print(
        "A RunnableLambda agent calls ChatOpenAI (gpt-4o) in a loop. The handler "
        "gives each run $0.0015, degrades to gpt-4o-mini at 50% and stops the "
        "loop before the call that would cross the limit.",
        style="dim",
    )
    handler = AllowanceCallbackHandler(
        budget="$0.0015",
        per="run",
        fallback="gpt-4o-mini",
        threshold=0.5,
        ledger=ledger,
    )
    llm = ChatOpenAI(
        model="gpt-4o",
        base_url=fake.openai_base_url,
        api_key="demo",  # type: ignore[arg-type]
        max_retries=0,
        max_completion_tokens=64,
    )
    models: list[str] = []

    def agent(task: str, config: RunnableConfig) -> str:
        messages: list[Any] = [HumanMessage(task)]
        while len(models) < _MAX_STEPS:
            reply = llm.invoke(messages, config=config)
            models.append(str(reply.response_metadata.get("model_name", "?")))
            messages += [AIMessage(reply.text), HumanMessage("Go on.")]
        return "done"

    try:
        RunnableLambda(agent).invoke(
            "Find every number in the quarterly report.",
            config={"callbacks": [handler], "run_name": "agent"},
        )
    except allowance.BudgetExceeded as err:
        first = 1
        for model, steps in groupby(models):
            last = first + len(list(steps)) - 1
            console.print(f"  steps {first}-{last}: [green]admitted[/] on {model}")
            first = last + 1
        console.print(f"  step {first}: [red]BudgetExceeded[/], not sent: {err}")
    guard = handler.guard
    if guard is None:  # pragma: no cover - a handler built with a budget has one
        return
    run = guard.ledger.calls()[-1].scope["run"]
    console.print(
        f"  run {run[:13]}… spent ${guard.spent({'run': run})} of its $0.0015 "
        f"in {len(models)} calls; the next run starts afresh"
    )
