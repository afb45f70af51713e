"""OpenTelemetry metrics, read back with the SDK's in-memory reader.

Real OpenAI SDK calls go over loopback HTTP to the fake provider; the meter
provider is passed explicitly (the global one can be set only once per process).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import allowance
from allowance import Budget, Estimate, Guard, Policy, Threshold, Usage, _telemetry

USER: Any = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    _telemetry.configure(meter_provider=provider)
    yield reader
    _telemetry.configure()
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Metric name -> its data points (with .attributes and .value/.sum/.count)."""
    found: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def test_token_usage_and_spend_follow_the_genai_conventions(
    reader: InMemoryMetricReader, openai_client: openai.OpenAI
) -> None:
    allowance.wrap(openai_client, budget="$1", ledger="memory://")
    with allowance.scope(tenant="acme", user="alice@example.com"):
        openai_client.chat.completions.create(
            model="gpt-4o", messages=USER, max_tokens=50
        )
    metrics = points(reader)
    tokens = metrics["gen_ai.client.token.usage"]
    by_type = {p.attributes["gen_ai.token.type"]: p for p in tokens}
    assert set(by_type) == {"input", "output"}
    for point in tokens:
        assert point.attributes["gen_ai.provider.name"] == "openai"
        assert point.attributes["gen_ai.request.model"] == "gpt-4o"
        assert point.attributes["gen_ai.response.model"] == "gpt-4o"
        assert point.attributes["gen_ai.operation.name"] == "chat"
        assert point.count == 1
    assert by_type["input"].sum > 0
    assert by_type["output"].sum > 0
    spend = metrics["allowance.spend"]
    assert sum(p.value for p in spend) > 0
    # Reservations: one taken, one given back.
    assert sum(p.value for p in metrics["allowance.reservations.held"]) == 0
    ratio = metrics["allowance.budget.used_ratio"]
    assert ratio[0].attributes["allowance.budget.name"] == "$1.00 per session"
    assert 0 < ratio[0].value < 1
    # No scope identifier anywhere unless opted in.
    for series in metrics.values():
        for point in series:
            text = repr(dict(point.attributes))
            assert "acme" not in text
            assert "alice" not in text
            assert not any(k.startswith("allowance.scope.") for k in point.attributes)


def test_blocked_calls_and_held_reservations(
    reader: InMemoryMetricReader, openai_client: openai.OpenAI
) -> None:
    allowance.wrap(openai_client, budget=10, ledger="memory://")
    with pytest.raises(allowance.BudgetExceeded):
        openai_client.chat.completions.create(model="gpt-4o", messages=USER)
    metrics = points(reader)
    blocked = metrics["allowance.calls.blocked"]
    assert [p.value for p in blocked] == [1]
    assert blocked[0].attributes["allowance.outcome"] == "blocked"
    assert blocked[0].attributes["gen_ai.request.model"] == "gpt-4o"
    assert "gen_ai.client.token.usage" not in metrics


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
def test_threshold_actions_are_counted_by_action(
    reader: InMemoryMetricReader,
    openai_client: openai.OpenAI,
    ledger: str,
    tmp_path: Path,
) -> None:
    """Warn once, then degrade each call after (the express lane on memory,
    the full plan on SQLite): each action named with its budget."""
    policy = Policy(
        [
            Budget(
                "$1",
                per="tenant",
                name="team",
                thresholds=[
                    Threshold(0.000001, "warn"),
                    Threshold(0.000002, "degrade", to="gpt-4o-mini"),
                ],
            )
        ]
    )
    url = "memory://" if ledger == "memory" else f"sqlite:///{tmp_path / 'm.db'}"
    allowance.wrap(openai_client, policy=policy, ledger=url)
    with allowance.scope(tenant="acme"):
        openai_client.chat.completions.create(model="gpt-4o", messages=USER)
        with pytest.warns(allowance.BudgetThresholdWarning):
            answer = openai_client.chat.completions.create(
                model="gpt-4o", messages=USER
            )
        again = openai_client.chat.completions.create(model="gpt-4o", messages=USER)
    assert answer.model == again.model == "gpt-4o-mini"
    found = points(reader)["allowance.threshold.actions"]
    actions = {p.attributes["allowance.threshold.action"]: p.value for p in found}
    assert actions == {"warn": 1, "degrade": 2}
    assert {p.attributes.get("allowance.budget.name") for p in found} == {"team"}
    tokens = points(reader)["gen_ai.client.token.usage"]
    degraded = [p for p in tokens if p.attributes["gen_ai.response.model"] != "gpt-4o"]
    assert degraded
    assert degraded[0].attributes["gen_ai.request.model"] == "gpt-4o"


def test_estimate_misses(reader: InMemoryMetricReader) -> None:
    guard = Guard(budget=10_000, ledger="memory://")
    guard.begin(Estimate("openai", "gpt-4o", 10, 10)).commit(Usage(100, 100))
    misses = points(reader)["allowance.estimate.misses"]
    assert [p.value for p in misses] == [1]
    assert guard.estimate_misses == 1


def test_scope_attributes_are_opt_in(reader: InMemoryMetricReader) -> None:
    provider = MeterProvider(metric_readers=[reader2 := InMemoryMetricReader()])
    _telemetry.configure(meter_provider=provider, scope_attributes=("tenant",))
    try:
        guard = Guard(budget="$1", per="tenant", ledger="memory://")
        with allowance.scope(tenant="acme", user="alice"):
            guard.begin(Estimate("openai", "gpt-4o", 10, 10)).commit(Usage(10, 10))
        spend = points(reader2)["allowance.spend"]
        assert spend[0].attributes["allowance.scope.tenant"] == "acme"
        assert "allowance.scope.user" not in spend[0].attributes
    finally:
        provider.shutdown()


def test_scope_attributes_from_the_environment(
    reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLOWANCE_OTEL_SCOPE_ATTRIBUTES", "user, tenant")
    guard = Guard(budget="$1", per="tenant", ledger="memory://")
    with allowance.scope(tenant="acme", user="u1", session="s"):
        guard.begin(Estimate("openai", "gpt-4o", 10, 10)).commit(Usage(10, 10))
    attrs = points(reader)["allowance.spend"][0].attributes
    assert attrs["allowance.scope.tenant"] == "acme"
    assert attrs["allowance.scope.user"] == "u1"
    assert "allowance.scope.session" not in attrs


def held(reader: InMemoryMetricReader) -> dict[str, int]:
    """``allowance.reservations.held`` now, by tenant ("" without the attribute)."""
    series = points(reader).get("allowance.reservations.held", [])
    return {p.attributes.get("allowance.scope.tenant", ""): p.value for p in series}


def test_reservations_held_are_counted_while_calls_are_in_flight(
    reader: InMemoryMetricReader,
) -> None:
    provider = MeterProvider(metric_readers=[reader2 := InMemoryMetricReader()])
    _telemetry.configure(meter_provider=provider, scope_attributes=("tenant",))
    try:
        guard = Guard(budget="$1", per="tenant", ledger="memory://")
        estimate = Estimate("openai", "gpt-4o", 10, 10)
        tickets = []
        for tenant, calls in (("acme", 3), ("globex", 1)):
            with allowance.scope(tenant=tenant):
                tickets += [guard.begin(estimate) for _ in range(calls)]
        assert held(reader2) == {"acme": 3, "globex": 1}
        tickets.pop().commit(Usage(10, 10))
        tickets.pop().release()
        assert held(reader2) == {"acme": 2, "globex": 0}  # a series stays at 0
        for ticket in tickets:
            ticket.commit(Usage(10, 10))
        assert held(reader2) == {"acme": 0, "globex": 0}
    finally:
        provider.shutdown()


def test_reservations_held_are_counted_afresh_for_a_new_provider(
    reader: InMemoryMetricReader,
) -> None:
    guard = Guard(budget="$1", ledger="memory://")
    ticket = guard.begin(Estimate("openai", "gpt-4o", 10, 10))
    assert held(reader) == {"": 1}
    reader2 = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader2])
    _telemetry.configure(meter_provider=provider)
    try:
        guard.begin(Estimate("openai", "gpt-4o", 10, 10)).commit(Usage(10, 10))
        assert held(reader2) == {"": 0}
        ticket.release()  # counted by the first provider: not by this one
        assert held(reader2) == {"": 0}
    finally:
        provider.shutdown()


@pytest.mark.parametrize("lane", ["ticket", "sdk"])
def test_a_call_in_flight_when_metrics_start_is_not_taken_off(
    lane: str, openai_client: openai.OpenAI
) -> None:
    """A call admitted with metrics off, settled with them on.

    ``sdk``: real calls; on the express lane's first, the SDK's httpx client's
    response hook (run before the call is settled) turns metrics on. If this
    fails with -1: the count was taken off for a call whose admission it never
    counted.
    """
    _telemetry.configure()
    assert not _telemetry.active()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def metrics_on(*_: object) -> None:
        if not _telemetry.active():
            _telemetry.configure(meter_provider=provider)

    try:
        if lane == "ticket":
            guard = Guard(budget="$1", ledger="memory://")
            ticket = guard.begin(Estimate("openai", "gpt-4o", 10, 10))
            metrics_on()
            ticket.commit(Usage(10, 10))
            guard.begin(Estimate("openai", "gpt-4o", 10, 10)).commit(Usage(10, 10))
        else:
            allowance.wrap(openai_client, budget="$1", ledger="memory://")
            for call in range(3):  # the first call is not on the express lane
                if call == 1:
                    openai_client._client.event_hooks["response"].append(metrics_on)
                openai_client.chat.completions.create(
                    model="gpt-4o", messages=USER, max_tokens=50
                )
        assert held(reader) == {"": 0}
        assert sum(p.count for p in points(reader)["gen_ai.client.token.usage"]) > 0
    finally:
        _telemetry.configure()
        provider.shutdown()


class BrokenProvider:
    """A meter provider whose meters fail: telemetry must swallow it."""

    def get_meter(self, *args: object, **kwargs: object) -> Any:
        raise RuntimeError("exporter on fire")


def test_telemetry_errors_never_reach_the_caller(
    openai_client: openai.OpenAI,
) -> None:
    _telemetry.configure(meter_provider=BrokenProvider())  # type: ignore[arg-type]
    try:
        allowance.wrap(openai_client, budget="$1", ledger="memory://")
        answer = openai_client.chat.completions.create(model="gpt-4o", messages=USER)
        assert answer.choices
        assert openai_client.allowance.spent > 0  # type: ignore[attr-defined]
    finally:
        _telemetry.configure()


def test_without_an_sdk_it_is_a_free_no_op() -> None:
    code = (
        "import sys, allowance\n"
        "from allowance import Guard, Estimate, Usage\n"
        "g = Guard(budget=1000, ledger='memory://')\n"
        "g.begin(Estimate('openai', 'gpt-4o', 10, 10)).commit(Usage(10, 10))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_active_only_once_a_real_meter_provider_is_set() -> None:
    # Importing the API (as CrewAI does) is not enough: its placeholder
    # provider records nothing, so building events for it would be waste.
    code = (
        "import sys, allowance\n"
        "from allowance import _telemetry\n"
        "print(_telemetry.active())\n"
        "from opentelemetry import metrics\n"
        "print(_telemetry.active())\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "metrics.set_meter_provider(MeterProvider())\n"
        "print(_telemetry.active())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False", "True"]
