"""The guard's call lifecycle on the memory ledger, without any SDK."""

from __future__ import annotations

import asyncio
import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

import allowance
from allowance import (
    Budget,
    BudgetExceeded,
    Estimate,
    Guard,
    LedgerError,
    LedgerUnavailableError,
    Policy,
    PricingError,
    Threshold,
    Usage,
)
from allowance._ledger import MemoryLedger


def est(model: str = "gpt-4o", inp: int = 100, out: int = 50) -> Estimate:
    return Estimate("openai", model, inp, out)


def reest(model: str) -> Estimate:
    return est(model)


def test_admit_commit_and_release_keep_the_books_straight() -> None:
    guard = Guard(budget=1000, ledger="memory://")
    ticket = guard.begin(est())
    assert guard.status()[0].reserved == 150
    ticket.commit(Usage(input_tokens=80, output_tokens=20))
    ticket.commit(Usage(input_tokens=999))  # settling twice does nothing
    status = guard.status()[0]
    assert (status.spent, status.reserved, status.remaining) == (100, 0, 900)
    other = guard.begin(est())
    other.release()
    assert guard.status()[0].reserved == 0
    assert guard.spent() == 100
    outcomes = [r.outcome for r in guard.ledger.calls()]
    assert outcomes == ["ok", "error"]


def test_usd_budgets_are_charged_priced_usage() -> None:
    guard = Guard(budget="$1", ledger="memory://")
    ticket = guard.begin(est("gpt-4o", 1000, 500))
    assert ticket.estimate_micros == 7_500
    ticket.commit(Usage(input_tokens=1000, output_tokens=500))
    assert guard.spent() == Decimal("0.0075")
    assert str(guard.remaining()) == "0.9925"


def test_every_applicable_budget_is_reserved_all_or_nothing() -> None:
    policy = Policy([Budget(1000, per="run"), Budget(200, per="tenant", window="day")])
    guard = Guard(policy, ledger="memory://")
    with allowance.scope(run="r1", tenant="acme"):
        guard.begin(est(inp=100, out=50)).commit(Usage(100, 50))
        with pytest.raises(BudgetExceeded) as info:
            guard.begin(est(inp=100, out=50))
    (violation,) = info.value.violations
    assert violation.dimension == "tenant"
    assert (violation.used, violation.requested, violation.limit) == (150, 150, 200)
    assert violation.unit == "tokens"
    run_status = guard.status({"run": "r1", "tenant": "acme"})
    assert [s.reserved for s in run_status] == [0, 0]  # nothing held on the run budget
    assert [s.spent for s in run_status] == [150, 150]


def test_a_budget_applies_only_when_the_scope_names_its_dimension() -> None:
    guard = Guard(Policy([Budget(10, per="tenant")]), ledger="memory://")
    ticket = guard.begin(est())  # no tenant in scope: tracked, not limited
    ticket.commit(Usage(100, 50))
    assert guard.ledger.calls()[0].usage.total_tokens == 150


def test_degrade_swaps_the_model_past_the_threshold() -> None:
    guard = Guard(
        budget=1000, fallback="gpt-4o-mini", threshold=0.5, ledger="memory://"
    )
    first = guard.begin(est(), reestimate=reest)
    assert first.model == "gpt-4o"
    first.commit(Usage(400, 100))  # 50% used
    second = guard.begin(est(), reestimate=reest)
    assert second.model == "gpt-4o-mini"
    assert second.degraded
    second.commit(Usage(10, 10), response_model="gpt-4o-mini")
    record = guard.ledger.calls()[-1]
    assert (record.requested_model, record.model, record.outcome) == (
        "gpt-4o",
        "gpt-4o-mini",
        "degraded",
    )


def test_the_fallback_is_tried_before_blocking() -> None:
    guard = Guard(budget=400, fallback="gpt-4o-mini", ledger="memory://")
    guard.begin(est(inp=100, out=100)).commit(Usage(100, 100))

    def small(model: str) -> Estimate:
        return est(model, 100, 50)

    ticket = guard.begin(est(inp=100, out=200), reestimate=small)
    assert ticket.model == "gpt-4o-mini"
    assert ticket.reserved == {guard.status()[0].key: 150}


def test_a_fallback_of_another_provider_is_not_used() -> None:
    guard = Guard(
        budget=1000, fallback="gpt-4o-mini", threshold=0.1, ledger="memory://"
    )
    guard.begin(est()).commit(Usage(500, 0))
    claude = Estimate("anthropic", "claude-sonnet-4-5", 100, 50)
    assert guard.begin(claude, reestimate=reest).model == "claude-sonnet-4-5"


def test_a_block_threshold_lowers_the_limit() -> None:
    guard = Guard(
        Policy([Budget(1000, thresholds=[Threshold(0.5, "block")])]),
        ledger="memory://",
        scope={"session": "s"},
    )
    guard.begin(est(inp=300, out=100)).commit(Usage(300, 100))
    with pytest.raises(BudgetExceeded) as info:
        guard.begin(est(inp=100, out=50))
    assert info.value.violations[0].limit == 500


def test_warn_fires_once_per_crossing_even_across_guards() -> None:
    fired: list[allowance.Event] = []
    budget = Budget(
        1000, per="tenant", thresholds=[Threshold(0.5, callback=fired.append)]
    )
    ledger = MemoryLedger()
    one, two = (
        Guard(Policy([budget]), ledger=ledger),
        Guard(Policy([budget]), ledger=ledger),
    )
    with allowance.scope(tenant="acme"):
        one.begin(est(inp=500, out=0)).commit(Usage(500, 0))
        with pytest.warns(allowance.BudgetThresholdWarning, match="crossed 50%"):
            one.begin(est(inp=10, out=0)).commit(Usage(10, 0))
        for guard in (two, one, two):  # no second warning: filterwarnings=error
            guard.begin(est(inp=10, out=0)).commit(Usage(10, 0))
    assert len(fired) == 1
    event = fired[0]
    assert event.kind == "threshold"
    assert event.data["used"] == 500
    assert event.scope["tenant"] == "acme"


def test_a_failing_threshold_callback_never_breaks_the_call() -> None:
    def explode(_: allowance.Event) -> None:
        raise RuntimeError("observer bug")

    guard = Guard(
        Policy([Budget(100, thresholds=[Threshold(0.1, callback=explode)])]),
        ledger="memory://",
        scope={"session": "s"},
    )
    guard.begin(est(inp=20, out=0)).commit(Usage(20, 0))
    with pytest.warns(allowance.BudgetThresholdWarning):
        guard.begin(est(inp=20, out=0)).commit(Usage(20, 0))  # the callback raises
    assert guard.spent() == 40


def test_a_warnings_filter_set_to_error_leaks_no_reservation() -> None:
    guard = Guard(
        Policy([Budget(100, thresholds=[Threshold(0.1)])]),
        ledger="memory://",
        scope={"session": "s"},
    )
    guard.begin(est(inp=20, out=0)).commit(Usage(20, 0))
    with pytest.raises(allowance.BudgetThresholdWarning):  # filterwarnings = error
        guard.begin(est(inp=20, out=0))
    assert guard.status()[0].reserved == 0


def test_webhook_thresholds_post_off_the_call_path() -> None:
    received: list[dict[str, Any]] = []
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["content-length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()
            done.set()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        guard = Guard(
            Policy(
                [
                    Budget(
                        100,
                        per="tenant",
                        thresholds=[Threshold(0.5, "webhook", to=url)],
                    )
                ]
            ),
            ledger="memory://",
        )
        with allowance.scope(tenant="acme"):
            guard.begin(est(inp=60, out=0)).commit(Usage(60, 0))
            guard.begin(est(inp=1, out=0)).commit(Usage(1, 0))
        assert done.wait(5)
    finally:
        server.shutdown()
        server.server_close()
    assert received[0]["kind"] == "threshold"
    assert received[0]["scope"]["tenant"] == "acme"
    assert received[0]["data"]["action"] == "webhook"


def test_on_limit_stop_and_warn() -> None:
    stop = Guard(budget=10, on_limit="stop", ledger="memory://")
    ticket = stop.begin(est())
    assert ticket.stopped
    assert ticket.violations
    assert stop.ledger.calls()[0].outcome == "stopped"

    warn = Guard(budget=10, on_limit="warn", ledger="memory://")
    with pytest.warns(allowance.BudgetThresholdWarning, match="blocked"):
        ticket = warn.begin(est())
    assert not ticket.stopped
    ticket.commit(Usage(100, 50))
    assert warn.spent() == 150  # let through and charged
    assert warn.ledger.calls()[-1].outcome == "warned"


def test_unknown_models_are_never_priced_at_zero() -> None:
    guard = Guard(budget="$1", ledger="memory://")
    with pytest.raises(PricingError, match="my-finetune"):
        guard.begin(est("my-finetune"))
    assert guard.status()[0].reserved == 0
    tokens = Guard(budget=1000, ledger="memory://")
    tokens.begin(est("my-finetune")).commit(Usage(10, 10))
    assert tokens.ledger.calls()[0].cost_micros is None
    allowance.prices.set("my-finetune", input=1, output=2)
    try:
        ticket = guard.begin(est("my-finetune", 1000, 1000))
        assert ticket.estimate_micros == 3000
    finally:
        allowance.prices.remove("my-finetune")


def test_usage_beyond_the_estimate_is_charged_and_counted() -> None:
    guard = Guard(budget=10_000, ledger="memory://")
    guard.begin(est(inp=100, out=50)).commit(Usage(2000, 50))
    assert guard.spent() == 2050
    assert guard.estimate_misses == 1
    assert guard.ledger.calls()[0].missed_estimate


def test_per_invocation_budgets_apply_through_any_guard() -> None:
    guard = Guard(ledger="memory://")  # no budget of its own

    @allowance.budget(300)
    def handle() -> int:
        calls = 0
        for _ in range(10):
            try:
                guard.begin(est(inp=100, out=0)).commit(Usage(100, 0))
            except BudgetExceeded:
                break
            calls += 1
        return calls

    assert [handle(), handle()] == [3, 3]


class FlakyLedger(MemoryLedger):
    """A memory ledger that fails while ``down`` is set."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise LedgerError("disk on fire")

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().reserve(*args, **kwargs)

    def commit(self, *args: Any, **kwargs: Any) -> None:
        self._check()
        super().commit(*args, **kwargs)


def test_fail_closed_raises_and_sends_nothing() -> None:
    ledger = FlakyLedger()
    ledger.down = True
    guard = Guard(budget=1000, ledger=ledger)
    with pytest.raises(LedgerUnavailableError, match="disk on fire"):
        guard.begin(est())


def test_fail_open_lets_calls_through_and_loses_no_charge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = FlakyLedger()
    guard = Guard(budget=1000, fail="open", ledger=ledger, scope={"session": "s"})
    ledger.down = True
    ticket = guard.begin(est())  # let through
    ticket.commit(Usage(40, 10))  # held in memory
    assert "failed on reserve" in caplog.text
    ledger.down = False
    assert guard.status()[0].spent == 0
    guard.begin(est()).commit(Usage(1, 1))  # the next call writes the held charge
    assert guard.status()[0].spent == 52
    assert guard.ledger_failures == 2


def test_commit_failures_are_retried_even_when_failing_closed() -> None:
    ledger = FlakyLedger()
    guard = Guard(budget=1000, ledger=ledger, scope={"session": "s"})
    ticket = guard.begin(est())
    ledger.down = True
    ticket.commit(Usage(40, 10))  # the provider answered; the charge must not be lost
    ledger.down = False
    guard.close()
    assert ledger.state([guard.status()[0].key])[guard.status()[0].key].spent == 50


async def test_async_twins_share_the_logic() -> None:
    guard = Guard(budget=300, ledger="memory://")

    async def one() -> bool:
        try:
            ticket = await guard.abegin(est(inp=100, out=0))
        except BudgetExceeded:
            return False
        await asyncio.sleep(0.001)
        await ticket.acommit(Usage(100, 0))
        return True

    results = await asyncio.gather(*(one() for _ in range(20)))
    assert sum(results) == 3
    assert guard.status()[0].reserved == 0


def test_keep_charges_the_whole_reservation() -> None:
    guard = Guard(budget="$1", ledger="memory://")
    ticket = guard.begin(est("gpt-4o", 1000, 500))
    ticket.keep()
    assert guard.status()[0].spent == 7_500
    assert guard.ledger.calls()[0].outcome == "unmetered"


def test_charges_held_in_memory_are_written_once_by_concurrent_calls() -> None:
    from concurrent.futures import ThreadPoolExecutor

    ledger = FlakyLedger()
    guard = Guard(budget=100_000, fail="open", ledger=ledger, scope={"session": "s"})
    ledger.down = True
    for _ in range(50):
        guard.begin(est(inp=10, out=0)).commit(Usage(10, 0))  # 50 charges held
    ledger.down = False

    def one(_: int) -> None:
        guard.begin(est(inp=1, out=0)).commit(Usage(1, 0))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(40)))
    assert guard.status()[0].spent == 50 * 10 + 40
    assert not guard._pending


def test_the_guard_never_shows_a_ledger_password():
    guard = allowance.Guard(
        budget=1, ledger="REDIS://user:s3cret@localhost:1/0?sentinel_password=x2"
    )
    text = repr(guard)
    assert "s3cret" not in text
    assert "x2" not in text
    assert "user:***@" in text


def test_budgets_sharing_a_counter_report_and_refuse_by_the_least_limit() -> None:
    """Two unnamed budgets on one dimension share a counter: the lesser limit
    binds. ``status``/``remaining`` say so, and a refusal names that budget.

    If this fails with ``remaining() == 800``: status showed the first
    budget's own limit, though only 300 more could be admitted.
    """
    guard = allowance.Guard(
        allowance.Policy(
            [allowance.Budget(1000, per="tenant"), allowance.Budget(500, per="tenant")]
        ),
        ledger="memory://",
    )
    with allowance.scope(tenant="acme"):
        guard.begin(allowance.Estimate("openai", "gpt-4o-mini", 100, 100)).commit(
            allowance.Usage(100, 100)
        )
        assert guard.remaining() == 300
        assert {s.limit for s in guard.status()} == {500}
        with pytest.raises(allowance.BudgetExceeded) as caught:
            guard.begin(allowance.Estimate("openai", "gpt-4o-mini", 200, 200))
    assert caught.value.violations[0].budget == "500 tokens per tenant"
