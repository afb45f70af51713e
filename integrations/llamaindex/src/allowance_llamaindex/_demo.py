"""The ``allowance demo`` scene: a LlamaIndex query engine under a per-query budget."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

import allowance

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["scene"]

DOCS = (
    "The quarterly report shows revenue up eleven percent on subscriptions.",
    "Costs held flat, so margins widened for the third quarter running.",
    "The board expects the same pace next quarter if churn stays low.",
    "The new region opens in spring; hiring there starts next month.",
)
BUDGET = "$0.003"


def _usd(micros: int) -> str:
    return f"${Decimal(micros) / 1_000_000:.6f}"


def scene(console: Console, fake: Any, ledger: str, number: int) -> None:
    """Index four documents, then query them under a per-query budget."""
    from llama_index.core import Document, VectorStoreIndex  # noqa: PLC0415
    from llama_index.embeddings.openai import (  # noqa: PLC0415
        OpenAIEmbedding,
    )
    from llama_index.llms.openai import OpenAI  # noqa: PLC0415

    from allowance_llamaindex import instrument, uninstrument  # noqa: PLC0415

    console.print()
    console.rule(f"[bold]{number}. LlamaIndex: a budget per query")
    console.print(
        f"instrument(budget={BUDGET!r}, per='query'): each query over four documents "
        "may spend its own budget, whatever steps it takes; indexing is charged too.",
        style="dim",
    )
    llm = OpenAI(
        api_base=fake.openai_base_url, api_key="demo", model="gpt-4o", max_tokens=64
    )
    embed = OpenAIEmbedding(api_base=fake.openai_base_url, api_key="demo")
    guard = instrument(budget=BUDGET, per="query", ledger=ledger)
    try:
        with allowance.scope(session="llamaindex-demo"):
            earlier = {r.call_id for r in guard.ledger.calls()}
            index = VectorStoreIndex.from_documents(
                [Document(text=t) for t in DOCS],
                embed_model=embed,
            )
            built = [r for r in guard.ledger.calls() if r.call_id not in earlier]
            tokens = sum(r.usage.input_tokens for r in built)
            cost = sum(r.cost_micros or 0 for r in built)
            console.print(
                f"  index built: {len(built)} embedding call(s), {tokens} tokens, "
                f"{_usd(cost)}"
            )
            for mode, question in (
                ("compact", "How did revenue do?"),
                ("refine", "Summarise everything the documents say."),
                ("compact", "When does the new region open?"),
            ):
                engine = index.as_query_engine(
                    llm=llm, response_mode=mode, similarity_top_k=4
                )
                sent = fake.generation_count
                before = {r.call_id for r in guard.ledger.calls()}
                try:
                    engine.query(question)
                    outcome = "[green]answered[/]"
                except allowance.BudgetExceeded:
                    outcome = "[red]BudgetExceeded[/]: its next step never sent"
                calls = [
                    r
                    for r in guard.ledger.calls()
                    if r.call_id not in before and r.usage.output_tokens
                ]
                spent = sum(r.cost_micros or 0 for r in calls)
                console.print(
                    f"  {mode:>7} query {question!r}: "
                    f"{fake.generation_count - sent} model call(s), {_usd(spent)} "
                    f"of its {BUDGET}: {outcome}"
                )
    finally:
        uninstrument()
        guard.close()
