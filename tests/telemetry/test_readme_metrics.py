"""README, "OpenTelemetry metrics": each metric's kind, unit and attributes.

Real OpenAI SDK calls go over loopback HTTP to the fake provider; the metrics
are read back with the OpenTelemetry SDK's in-memory reader, configured
through the public ``allowance.telemetry.configure``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Sum,
)

import allowance
import allowance.telemetry
from allowance import Budget, Policy, Threshold
from allowance.testing import FakeProvider, FakeUsage

USER: Any = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    allowance.telemetry.configure(meter_provider=provider, scope_attributes=("tenant",))
    yield reader
    allowance.telemetry.configure()
    provider.shutdown()


def metrics(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Metric name -> the SDK's Metric (with .unit and .data)."""
    found: dict[str, Any] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found[metric.name] = metric
    return found


def client_on(fake: FakeProvider, **guard: Any) -> openai.OpenAI:
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="t", max_retries=0)
    return allowance.wrap(client, ledger="memory://", **guard)


def test_every_metric_has_the_documented_kind_and_unit(
    reader: InMemoryMetricReader, fake_provider: FakeProvider
) -> None:
    """The README's table: name -> (kind, unit), for all seven metrics."""
    policy = Policy(
        [Budget("$1", per="tenant", thresholds=[Threshold(0.000001, "warn")])]
    )
    client = client_on(fake_provider, policy=policy)
    fake_provider.usage = FakeUsage(input_tokens=20, output_tokens=500)
    with allowance.scope(tenant="acme"):
        # 500 output tokens against a worst case of 16: an estimate miss.
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=16)
        with pytest.warns(allowance.BudgetThresholdWarning):
            client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=16)
    tiny = client_on(fake_provider, budget=10)
    with pytest.raises(allowance.BudgetExceeded):
        tiny.chat.completions.create(model="gpt-4o", messages=USER)
    found = metrics(reader)

    def kind(metric: Any) -> str:
        data = metric.data
        if isinstance(data, Histogram):
            return "histogram"
        if isinstance(data, Gauge):
            return "gauge"
        assert isinstance(data, Sum)
        return "counter" if data.is_monotonic else "up-down counter"

    table = {
        "gen_ai.client.token.usage": ("histogram", "{token}"),
        "allowance.spend": ("counter", "USD"),
        "allowance.budget.used_ratio": ("gauge", "1"),
        "allowance.reservations.held": ("up-down counter", "{reservation}"),
        "allowance.threshold.actions": ("counter", "{action}"),
        "allowance.calls.blocked": ("counter", "{call}"),
        "allowance.estimate.misses": ("counter", "{call}"),
    }
    assert {name: (kind(found[name]), found[name].unit) for name in table} == table
    [miss] = found["allowance.estimate.misses"].data.data_points
    assert miss.attributes["gen_ai.request.model"] == "gpt-4o"
    spend = found["allowance.spend"].data.data_points
    assert spend
    for point in spend:  # as the token histogram, without the token type
        assert "gen_ai.token.type" not in point.attributes
        assert point.attributes["gen_ai.provider.name"] == "openai"
        assert point.attributes["gen_ai.request.model"] == "gpt-4o"
        assert point.attributes["gen_ai.response.model"] == "gpt-4o"
        assert point.attributes["gen_ai.operation.name"] == "chat"
        assert point.attributes["allowance.scope.tenant"] == "acme"


def test_embeddings_are_named_as_their_operation(
    reader: InMemoryMetricReader, fake_provider: FakeProvider
) -> None:
    """``gen_ai.operation.name`` is ``embeddings`` for an embeddings call."""
    client = client_on(fake_provider, budget="$1")
    client.embeddings.create(model="text-embedding-3-small", input="Say hello.")
    points = metrics(reader)["gen_ai.client.token.usage"].data.data_points
    assert points
    assert {p.attributes["gen_ai.operation.name"] for p in points} == {"embeddings"}


def test_a_stopped_call_is_counted_as_stopped_with_its_budget(
    reader: InMemoryMetricReader, fake_provider: FakeProvider
) -> None:
    """``allowance.calls.blocked``: ``allowance.outcome`` ``stopped`` under
    ``on_limit="stop"``, with the request model and the budget's name."""
    policy = Policy([Budget(10, per="tenant", name="tiny")], on_limit="stop")
    client = client_on(fake_provider, policy=policy)
    with allowance.scope(tenant="acme"):
        answer = client.chat.completions.create(model="gpt-4o", messages=USER)
    assert answer.id.startswith("allowance-stop")
    [point] = metrics(reader)["allowance.calls.blocked"].data.data_points
    assert point.value == 1
    assert point.attributes["allowance.outcome"] == "stopped"
    assert point.attributes["gen_ai.request.model"] == "gpt-4o"
    assert point.attributes["allowance.budget.name"] == "tiny"


def test_a_webhook_action_is_counted(
    reader: InMemoryMetricReader, fake_provider: FakeProvider
) -> None:
    """``allowance.threshold.actions`` names ``webhook`` among its actions."""
    hook = f"{fake_provider.openai_base_url}/hook"  # any loopback URL will do
    policy = Policy(
        [
            Budget(
                "$1",
                per="tenant",
                name="team",
                thresholds=[Threshold(0.000001, "webhook", to=hook)],
            )
        ]
    )
    client = client_on(fake_provider, policy=policy)
    with allowance.scope(tenant="acme"):
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=16)
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=16)
    allowance._events.webhooks.flush()
    points = metrics(reader)["allowance.threshold.actions"].data.data_points
    assert {
        (
            p.attributes["allowance.threshold.action"],
            p.attributes["allowance.budget.name"],
        )
        for p in points
    } == {("webhook", "team")}
