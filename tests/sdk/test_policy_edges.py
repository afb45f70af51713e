"""Policies at their edges: the calls that do not fit any more.

- A warn or webhook threshold fires on the calls made past it, refused ones
  included: the call that finds a budget past 80% is often one that no longer
  fits, and under ``on_limit="warn"`` every later call is let through.
- ``on_limit="warn"`` past a degrade threshold lets the call through to the
  fallback, as a call that fits would go, not to the model asked for.
- A call refused past a degrade threshold, whose model would fit but whose
  fallback does not, names the fallback's amount: the violation's sum exceeds
  its limit.
- A threshold's point is exact for the ratio as written: 0.29 of 100 is 29.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from tests.sdk.conftest import GPT, MINI, USER, aw

import allowance
from allowance import Budget, Guard, Policy, Threshold
from allowance.testing import FakeUsage

LEDGERS = ["memory://", "sqlite"]


def ledger_url(name: str, tmp_path: Any) -> str:
    return name if name == "memory://" else f"sqlite:///{tmp_path / 'spend.db'}"


async def ask(client: Any, model: str = GPT, **body: Any) -> Any:
    return await aw(client.chat.completions.create(model=model, messages=USER, **body))


@pytest.mark.parametrize("ledger", LEDGERS)
@pytest.mark.parametrize("on_limit", ["raise", "stop", "warn"])
async def test_a_warn_threshold_fires_on_a_call_that_no_longer_fits(  # noqa: PLR0917
    on_limit, ledger, kind, fake_provider, clients, tmp_path
):
    """Two calls take the budget to 95%; the third does not fit.

    If this fails with no event: thresholds were evaluated only for calls
    that got a reservation, so a budget that went from under 80% to past its
    limit never warned, even as ``on_limit="warn"`` let calls through.
    """
    fake_provider.usage = FakeUsage(input_tokens=900, output_tokens=50)
    events: list[allowance.Event] = []
    budget = Budget(
        2000, per="session", thresholds=[Threshold(0.8, "warn", callback=events.append)]
    )
    guard = Guard(
        Policy([budget], on_limit=on_limit), ledger=ledger_url(ledger, tmp_path)
    )
    client = allowance.wrap(clients("openai", kind), guard=guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", allowance.BudgetThresholdWarning)
        await ask(client, max_tokens=1000)  # 950 of 2000
        await ask(client, max_tokens=1000)  # 1,900: past 80%, under the limit
        assert events == []  # fires on the calls made past it
        for _ in range(3):  # each asks ~1,015 more: none fits
            try:
                await ask(client, max_tokens=1000)
            except allowance.BudgetExceeded:
                assert on_limit == "raise"
    assert [e.data["action"] for e in events] == ["warn"]  # once per window
    assert events[0].data["used"] == 1900
    sent = 5 if on_limit == "warn" else 2
    assert len(fake_provider.requests) == sent
    guard.close()


async def test_the_warning_is_issued_before_the_refusal(kind, fake_provider, clients):
    fake_provider.usage = FakeUsage(input_tokens=900, output_tokens=50)
    budget = Budget(1000, per="session", thresholds=[Threshold(0.8, "warn")])
    client = allowance.wrap(
        clients("openai", kind), guard=Guard(Policy([budget]), ledger="memory://")
    )
    await ask(client, max_tokens=100)  # 950 of 1000
    with (
        pytest.warns(allowance.BudgetThresholdWarning, match="80%"),
        pytest.raises(allowance.BudgetExceeded),
    ):
        await ask(client, max_tokens=100)


@pytest.mark.parametrize("ledger", LEDGERS)
@pytest.mark.parametrize(
    ("sdk", "budget", "model", "fallback"),
    [
        ("openai", "$0.10", GPT, MINI),
        ("anthropic", "$0.12", "claude-sonnet-4-6", "claude-haiku-4-5"),
    ],
    ids=["openai", "anthropic"],
)
async def test_warn_past_the_degrade_threshold_lets_calls_through_to_the_fallback(  # noqa: PLR0917
    sdk, budget, model, fallback, ledger, kind, fake_provider, guarded, tmp_path
):
    """Heavy calls past 50%, and then past the limit: every one to the fallback.

    If this fails with the model asked for going out: a call no model fitted
    was let through as asked, the expensive model, once the fallback itself
    no longer fitted.
    """
    fake_provider.usage = FakeUsage(input_tokens=10_000, output_tokens=5_000)
    client, guard = guarded(
        sdk,
        kind,
        "wrap",
        budget,
        fallback=fallback,
        threshold=0.5,
        on_limit="warn",
        ledger=ledger_url(ledger, tmp_path),
    )
    sent = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", allowance.BudgetThresholdWarning)
        for _ in range(8):
            if sdk == "openai":
                await ask(client, model=model, max_tokens=5_000)
            else:
                await aw(
                    client.messages.create(model=model, messages=USER, max_tokens=5_000)
                )
            sent.append(fake_provider.requests[-1].json["model"])
    assert sent[0] == model
    assert set(sent[1:]) == {fallback}
    records = guard.ledger.calls()
    assert [r.model for r in records[1:]] == [fallback] * 7
    assert {r.requested_model for r in records} == {model}
    assert records[-1].outcome == "warned"
    assert guard.status()[0].reserved == 0
    guard.close()


@pytest.mark.parametrize("ledger", LEDGERS)
async def test_a_refusal_past_the_degrade_threshold_names_the_fallbacks_amount(
    ledger, kind, fake_provider, guarded, tmp_path
):
    """gpt-4o's worst case fits; gpt-4.1-mini's (32,768 output tokens) does not.

    Past 50%, the call may only go to the fallback, which does not fit: it is
    refused, and the violation says so (used + requested > limit). If this
    fails on the sum: the violation named gpt-4o's amount, which fits.
    """
    fake_provider.usage = FakeUsage(input_tokens=30_000, output_tokens=5_000)
    client, guard = guarded(
        "openai",
        kind,
        "wrap",
        60_000,
        fallback="gpt-4.1-mini",
        threshold=0.5,
        ledger=ledger_url(ledger, tmp_path),
    )
    await ask(client)  # 35,000 tokens: past 50%
    with pytest.raises(allowance.BudgetExceeded) as caught:
        await ask(client)
    (violation,) = caught.value.violations
    assert violation.used == 35_000
    assert violation.used + violation.requested > violation.limit == 60_000
    assert caught.value.model == GPT  # the model asked for
    assert len(fake_provider.requests) == 1
    guard.close()


@pytest.mark.parametrize(
    ("at", "limit", "point"), [(0.29, 100, 29), (0.57, 100, 57), (0.1, 30, 3)]
)
def test_a_block_threshold_is_exact_for_the_ratio_as_written(at, limit, point):
    """``0.29 * 100`` is 28.999999999999996 in floats: the limit was 28."""
    guard = Guard(
        Policy([Budget(limit, per="session", thresholds=[Threshold(at, "block")])]),
        ledger="memory://",
    )
    assert guard.status()[0].limit == point
    with allowance.scope(session="s"):
        ticket = guard.begin(allowance.Estimate("openai", GPT, point, 0))
        ticket.commit(allowance.Usage(point, 0))  # exactly the point fits
        with pytest.raises(allowance.BudgetExceeded):
            guard.begin(allowance.Estimate("openai", GPT, 1, 0))


class _Degrades:
    """An observer of ``degraded`` events: which budget each one names."""

    allowance_event_kinds = frozenset({"degraded"})

    def __init__(self) -> None:
        self.budgets: list[str | None] = []

    @allowance.hookimpl
    def allowance_event(self, event: allowance.Event) -> None:
        self.budgets.append(event.budget)


@pytest.mark.parametrize("ledger", LEDGERS)
async def test_the_degraded_event_names_the_budget_whose_gate_was_crossed(
    ledger, kind, fake_provider, clients, tmp_path
):
    """Two budgets degrade; only the second one's (the tenant's) is crossed.

    If this fails with the session budget: the event named the first budget
    with a degrade threshold, crossed or not.
    """
    fake_provider.usage = FakeUsage(input_tokens=10_000, output_tokens=5_000)
    policy = Policy(
        [
            Budget("$10", per="session", thresholds=[Threshold(0.5, "degrade")]),
            Budget("$0.10", per="tenant", thresholds=[Threshold(0.5, "degrade")]),
        ],
        fallback=MINI,
    )
    guard = Guard(policy, ledger=ledger_url(ledger, tmp_path))
    client = allowance.wrap(clients("openai", kind), guard=guard)
    observer = _Degrades()
    allowance.plugins.register(observer)
    try:
        with allowance.scope(tenant="acme"):
            await ask(client, max_tokens=100)  # $0.075 of $0.10: past 50%
            await ask(client, max_tokens=100)
    finally:
        allowance.plugins.unregister(observer)
    assert fake_provider.requests[-1].json["model"] == MINI
    assert observer.budgets == ["$0.10 per tenant"]
    guard.close()


async def test_budgets_degrading_to_different_models_go_to_the_first_ones(
    kind, fake_provider, clients
):
    """README: "When several budgets of a call degrade with different ``to=``
    models, calls past any of them go to the first one's" (a known limit: the
    fallback is chosen before the ledger says which gate is crossed)."""
    fake_provider.usage = FakeUsage(input_tokens=10_000, output_tokens=5_000)
    policy = Policy(
        [
            Budget("$10", per="session", thresholds=[Threshold(0.5, "degrade", to="gpt-4.1-nano")]),
            Budget("$0.10", per="tenant", thresholds=[Threshold(0.5, "degrade", to=MINI)]),
        ]
    )  # fmt: skip
    client = allowance.wrap(
        clients("openai", kind), guard=Guard(policy, ledger="memory://")
    )
    with allowance.scope(tenant="acme"):
        await ask(client, max_tokens=100)  # the tenant's gate: crossed
        await ask(client, max_tokens=100)
    assert fake_provider.requests[-1].json["model"] == "gpt-4.1-nano"
