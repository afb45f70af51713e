"""A LangChain chain under an allowance budget, offline.

Starts allowance's fake OpenAI server on 127.0.0.1, then runs a prompt | ChatOpenAI
chain with an ``AllowanceCallbackHandler``: a budget per chain invocation, a
fallback model past 50%, and a call refused before it is sent. Then the same
with one line for every chain in the process: ``allowance.patch``.

Run: ``python examples/langchain_budget.py`` (needs allowance-langchain and
langchain-openai).
"""

from __future__ import annotations

from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

import allowance
from allowance.testing import FakeProvider, FakeUsage
from allowance_langchain import AllowanceCallbackHandler


def main() -> None:
    """Run the chain until the budget refuses a call."""
    with FakeProvider(usage=FakeUsage(input_tokens=400, output_tokens=120)) as fake:
        llm = ChatOpenAI(
            model="gpt-4o",
            base_url=fake.openai_base_url,  # the fake provider, not api.openai.com
            api_key="offline",  # type: ignore[arg-type]
            max_retries=0,
            max_completion_tokens=200,
        )
        chain = ChatPromptTemplate.from_messages([("human", "Summarise: {text}")]) | llm

        # 1. One handler: $0.005 for its calls, gpt-4o-mini once 50% is spent.
        handler = AllowanceCallbackHandler(
            budget="$0.005", fallback="gpt-4o-mini", threshold=0.5, ledger="memory://"
        )
        answered_by: list[str] = []
        for i in range(1, 100):
            try:
                reply = chain.invoke(
                    {"text": f"report {i}"}, config={"callbacks": [handler]}
                )
            except allowance.BudgetExceeded as err:
                print(f"call {i}: blocked before sending: {err}")
                break
            model = reply.response_metadata["model_name"]
            if model not in answered_by:
                print(f"call {i}: answered by {model}")
            answered_by.append(model)
        spent = handler.guard.spent() if handler.guard is not None else 0
        print(
            f"spent ${spent} in {len(answered_by)} calls; "
            f"requests the provider received: {fake.generation_count}"
        )

        # 2. Every chain in the process, one line; unpatch() detaches it.
        allowance.patch(budget=600, ledger="memory://")  # 600 tokens
        try:
            for i in (1, 2):
                chain.invoke({"text": "quarterly report"})
                print(f"patched: call {i} admitted")
        except allowance.BudgetExceeded as err:
            print(f"patched: call {i} blocked before sending: {err}")
        finally:
            allowance.unpatch()


if __name__ == "__main__":
    main()
