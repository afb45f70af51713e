"""The README's examples, type-checked with mypy --strict (never run)."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai

import allowance
from allowance import Budget, BudgetStatus, Guard, Policy, Threshold


def wrap_example() -> None:
    client = allowance.wrap(
        openai.OpenAI(), budget="$2.00", fallback="gpt-4o-mini", threshold=0.8
    )
    reply = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    text: str | None = reply.choices[0].message.content
    spent: Decimal | int = allowance.of(client).spent
    status: list[BudgetStatus] = allowance.of(client).status()
    del text, spent, status


def policy_example() -> None:
    guard = Guard(
        Policy(
            [
                Budget("$0.50", per="run"),
                Budget(
                    "$20",
                    per="tenant",
                    window="day",
                    tz="Europe/Paris",
                    thresholds=[
                        Threshold(0.8, "webhook", to="https://ops.example/hook")
                    ],
                ),
                Budget("200k tokens", per="user", window="month"),
            ],
            fallback={"gpt-4o": "gpt-4o-mini"},
            on_limit="raise",
            fail="closed",
        ),
        ledger="sqlite:///spend.db",
    )
    client = allowance.wrap(anthropic.Anthropic(), guard=guard)
    with allowance.scope(tenant="acme", user="u-42", run="r-17"):
        client.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=256,
            messages=[{"role": "user", "content": "hi"}],
        )
    statuses: list[BudgetStatus] = guard.status({"tenant": "acme"})
    del statuses


@allowance.budget("$0.10")
def handle(question: str) -> str:
    return question


@allowance.scope(tenant="acme")
async def handle_async(question: str) -> str:
    return question


def patch_example() -> None:
    guard: Guard = allowance.patch(budget=50_000)
    try:
        allowance.prices.set("my-model", input=0.5, output=1.5)
    finally:
        allowance.unpatch()
    del guard


def errors_example() -> None:
    try:
        handle("q")
    except allowance.BudgetExceeded as err:
        for violation in err.violations:
            print(violation.budget, violation.used, violation.limit, violation.unit)
