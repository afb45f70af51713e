"""Put LlamaIndex under budget: offline, against allowance's fake provider.

Run from the repository root::

    python examples/llamaindex_budget.py

A small vector index over four documents (its embeddings are charged too),
then queries under ``instrument(budget=..., per="query")``: each query has a
budget of its own covering every model call it makes. A ``refine`` query that
would need more is stopped with ``allowance.BudgetExceeded`` before the
request that would overspend is sent. Then the other way in: ``allowance.patch``
with a per-tenant budget and ``allowance.scope(tenant=...)``, and a streamed
query charged its exact usage.
"""

from __future__ import annotations

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

import allowance
from allowance.testing import FakeProvider
from allowance_llamaindex import instrument, uninstrument

DOCS = [
    "The quarterly report shows revenue up eleven percent on subscriptions.",
    "Costs held flat, so margins widened for the third quarter running.",
    "The board expects the same pace next quarter if churn stays low.",
    "The new region opens in spring; hiring there starts next month.",
]


def main() -> None:
    """Run the two ways of putting LlamaIndex under budget."""
    with FakeProvider() as fake:
        # Point LlamaIndex at the fake provider: nothing leaves 127.0.0.1.
        Settings.llm = OpenAI(
            api_base=fake.openai_base_url, api_key="fake", model="gpt-4o", max_tokens=64
        )
        Settings.embed_model = OpenAIEmbedding(
            api_base=fake.openai_base_url, api_key="fake"
        )

        # 1. One budget per query.
        guard = instrument(budget="$0.003", per="query", ledger="memory://")
        index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS])
        (embedding,) = guard.ledger.calls()
        print(f"indexing: {embedding.usage.input_tokens} embedding tokens charged")
        for mode in ("compact", "refine"):
            engine = index.as_query_engine(response_mode=mode, similarity_top_k=4)
            sent = fake.generation_count
            try:
                answer = engine.query("Summarise what the documents say.")
                print(f"{mode}: answered with {fake.generation_count - sent} call(s)")
                print(f"  {str(answer).strip()}")
            except allowance.BudgetExceeded as blocked:
                print(
                    f"{mode}: {fake.generation_count - sent} call(s), then blocked "
                    f"before the next was sent:\n  {blocked}"
                )
        uninstrument()

        # 2. allowance.patch installs this adapter with every other one.
        guard = allowance.patch(budget="$0.05", per="tenant", ledger="memory://")
        with allowance.scope(tenant="acme"):
            streaming = index.as_query_engine(streaming=True)
            response = streaming.query("When does the new region open?")
            text = "".join(response.response_gen)
            (status,) = guard.status()
        last = guard.ledger.calls()[-1]
        print(
            f"streamed {len(text)} characters; charged exactly "
            f"{last.usage.input_tokens}+{last.usage.output_tokens} tokens; "
            f"\n  {status.describe()}"
        )
        allowance.unpatch()


if __name__ == "__main__":
    main()
