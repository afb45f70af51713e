"""allowance-crewai through real crews against the fake provider, offline."""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import runpy
import sys
import threading
import warnings
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
import wrapt
from crewai.hooks.dispatch import HookAborted
from crewai.hooks.llm_hooks import (
    get_after_llm_call_hooks,
    get_before_llm_call_hooks,
    register_before_llm_call_hook,
    unregister_before_llm_call_hook,
)
from crewai.llms.base_llm import BaseLLM
from crewai.tools import tool
from rich.console import Console

import allowance
import allowance_crewai
import crewai
from allowance import plugins
from allowance.integration import current_adapters, current_route
from allowance.testing import FakeReply, FakeUsage
from allowance_crewai._plugin import allowance_demo_scenes

if TYPE_CHECKING:
    from collections.abc import Iterator

    from allowance.testing import FakeProvider

MakeCrew = "Callable[..., crewai.Crew]"


def openai_llm(fake: FakeProvider, model: str = "gpt-4o-mini", **options: Any) -> Any:
    """CrewAI's native OpenAI LLM on the fake provider."""
    options.setdefault("max_tokens", 64)
    return crewai.LLM(
        model=model, base_url=fake.openai_base_url, api_key="test", **options
    )


def anthropic_llm(fake: FakeProvider, **options: Any) -> Any:
    """CrewAI's native Anthropic LLM on the fake provider."""
    options.setdefault("max_tokens", 64)
    return crewai.LLM(
        model="anthropic/claude-3-5-haiku-latest",
        base_url=fake.anthropic_base_url,
        api_key="test",
        **options,
    )


class CountingLLM(BaseLLM):
    """A custom LLM no SDK layer sees: answers text and reports usage to CrewAI."""

    calls: int = 0

    def call(  # noqa: PLR0917 - CrewAI's signature
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str:
        """Answer at once, reporting 30 prompt and 5 completion tokens."""
        self.calls += 1
        self._track_token_usage_internal(
            {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
        )
        return "Final Answer: done."

    def supports_function_calling(self) -> bool:
        """Text only."""
        return False


@pytest.fixture
def hook_calls() -> Iterator[list[str]]:
    """Count CrewAI before-LLM-call hook invocations (registered before ours)."""
    seen: list[str] = []

    def count(ctx: Any) -> None:
        seen.append(getattr(ctx.agent, "role", "?"))

    register_before_llm_call_hook(count)
    try:
        yield seen
    finally:
        unregister_before_llm_call_hook(count)


def kickoff(crew: crewai.Crew, how: str) -> Any:
    """Run ``crew`` the way named: ``kickoff``, ``kickoff_async`` or ``akickoff``."""
    if how == "kickoff":
        return crew.kickoff()
    if how == "kickoff_async":
        return asyncio.run(crew.kickoff_async())
    return asyncio.run(crew.akickoff())


def no_leak() -> bool:
    """Nothing this adapter entered is left in the caller's context."""
    return current_route() is None and current_adapters() == ()


# -- attribution and exact usage -------------------------------------------------


@pytest.mark.parametrize("how", ["kickoff", "kickoff_async", "akickoff"])
def test_calls_are_attributed_to_crew_agent_task_and_iteration(
    fake_provider: FakeProvider, make_crew: Any, how: str
) -> None:
    fake_provider.usage = FakeUsage(input_tokens=40, output_tokens=2)
    guard = allowance.patch(budget=100_000, ledger="memory://")
    crew = make_crew(openai_llm(fake_provider), ("researcher", "writer"), name="desk")
    kickoff(crew, how)
    records = guard.ledger.calls()
    assert [(r.scope["agent"], r.scope["task"]) for r in records] == [
        ("researcher", "researcher-task"),
        ("writer", "writer-task"),
    ]
    assert {r.scope["crew"] for r in records} == {"desk"}
    assert {r.scope["iteration"] for r in records} == {"0"}
    assert all(r.adapters == ("crewai", "openai") for r in records)
    assert [(r.usage.input_tokens, r.usage.output_tokens) for r in records] == [
        (40, 2),
        (40, 2),
    ]
    assert fake_provider.generation_count == 2
    assert no_leak()


def test_an_agents_openai_call_keeps_the_sdk_layers_express_lane(
    fake_provider: FakeProvider, make_crew: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter observes refusals only (``allowance_event_kinds``): the
    calls it routes to the SDK layer and the SDK layer admits keep its
    express lane, as without the adapter."""
    from allowance._sdk import _common, _express

    admitted: list[bool] = []

    def counting(*args: Any) -> Any:
        lane = _express.admit(*args)
        admitted.append(lane is not None)
        return lane

    monkeypatch.setattr(_common, "admit", counting)
    guard = allowance.patch(budget=100_000, ledger="memory://")
    roles = ("researcher", "writer", "editor")
    make_crew(openai_llm(fake_provider), roles).kickoff()
    # The first call opens the ledger (the SDK layer's general path, before
    # the lane is asked): the next two take the lane.
    assert admitted == [True, True]
    records = guard.ledger.calls()
    assert [r.scope["agent"] for r in records] == list(roles)
    assert all(r.adapters == ("crewai", "openai") for r in records)
    assert no_leak()


def test_an_unnamed_crew_is_attributed_by_its_id(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    guard = allowance.patch(budget=100_000, ledger="memory://")
    crew = make_crew(openai_llm(fake_provider))
    crew.kickoff()
    (record,) = guard.ledger.calls()
    assert record.scope["crew"] == str(crew.id)


def test_anthropic_token_counts_are_not_charged(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    fake_provider.usage = FakeUsage(input_tokens=20, output_tokens=3)
    guard = allowance.patch(budget=100_000, ledger="memory://")
    make_crew(anthropic_llm(fake_provider), ("researcher", "writer")).kickoff()
    assert fake_provider.count("/v1/messages/count_tokens") >= 2
    records = guard.ledger.calls()
    assert len(records) == fake_provider.generation_count == 2
    assert all(r.adapters == ("crewai", "anthropic") for r in records)
    (status,) = guard.status()
    assert status.spent == 2 * 23


def test_two_agents_sharing_one_llm_are_charged_separately(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    fake_provider.usage = FakeUsage(input_tokens=42, output_tokens=7)
    guard = allowance.Guard(
        budget=[allowance.Budget(100_000, per="agent")], ledger="memory://"
    )
    allowance_crewai.install(guard)
    shared = openai_llm(fake_provider)
    crew = make_crew(shared, ("researcher", "writer"))
    crew.kickoff()
    records = guard.ledger.calls()
    assert sorted(r.scope["agent"] for r in records) == ["researcher", "writer"]
    assert sum(r.usage.total_tokens for r in records) == 2 * 49
    for role in ("researcher", "writer"):
        (status,) = guard.status({"agent": role})
        assert status.spent == 49


def test_a_direct_llm_call_is_charged_once_without_agent(
    fake_provider: FakeProvider,
) -> None:
    guard = allowance.patch(budget=100_000, ledger="memory://")
    openai_llm(fake_provider).call("Say hello.")
    (record,) = guard.ledger.calls()
    assert "crewai" in record.adapters
    assert "agent" not in record.scope
    assert no_leak()


# -- blocking ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["kickoff", "kickoff_async", "akickoff"])
def test_a_refused_call_stops_the_crew_at_once(
    fake_provider: FakeProvider, make_crew: Any, hook_calls: list[str], how: str
) -> None:
    guard = allowance.patch(budget=1, ledger="memory://")
    crew = make_crew(openai_llm(fake_provider), ("researcher", "writer"))
    with pytest.raises(allowance.BudgetExceeded, match="blocked"):
        kickoff(crew, how)
    assert fake_provider.count() == 0
    # The SDK layer refuses inside the call; CrewAI's agent retries it once as a
    # transient error, and our before hook aborts the retry: no storm.
    assert hook_calls == ["researcher", "researcher"]
    (record,) = guard.ledger.calls()
    assert record.outcome == "blocked"
    assert no_leak()


def test_a_refused_anthropic_call_sends_no_generation(
    fake_provider: FakeProvider, make_crew: Any, hook_calls: list[str]
) -> None:
    guard = allowance.patch(budget=1, ledger="memory://")
    with pytest.raises(allowance.BudgetExceeded):
        make_crew(anthropic_llm(fake_provider)).kickoff()
    assert fake_provider.generation_count == 0
    # CrewAI's free token-count pre-flight runs after the hooks, before the
    # SDK layer refuses: at most one, never charged.
    assert fake_provider.count() == fake_provider.count("/v1/messages/count_tokens")
    assert fake_provider.count() <= 1
    assert hook_calls == ["researcher", "researcher"]
    assert [r.outcome for r in guard.ledger.calls()] == ["blocked"]


def test_the_error_is_also_crewai_hook_aborted(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    allowance.patch(budget=1, ledger="memory://")
    with pytest.raises(HookAborted) as caught:
        make_crew(openai_llm(fake_provider)).kickoff()
    assert isinstance(caught.value, allowance.BudgetExceeded)
    assert isinstance(caught.value, allowance_crewai.CrewBudgetExceeded)
    assert "1 tokens per session" in str(caught.value)


def test_a_refusal_does_not_outlive_its_crew(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    guard = allowance.patch(budget=1, ledger="memory://")
    crew = make_crew(openai_llm(fake_provider))
    crew.agents[0].max_retry_limit = 0
    with pytest.raises(allowance.BudgetExceeded):
        crew.kickoff()
    allowance_crewai.install(allowance.Guard(budget=100_000, ledger="memory://"))
    make_crew(openai_llm(fake_provider)).kickoff()  # same dimensions: admitted
    assert fake_provider.generation_count == 1
    assert len(guard.ledger.calls()) == 1


def test_on_limit_stop_stops_the_crew_without_a_request(
    fake_provider: FakeProvider, make_crew: Any, hook_calls: list[str]
) -> None:
    guard = allowance.patch(budget=1, on_limit="stop", ledger="memory://")
    with pytest.raises(HookAborted, match="allowance stopped the crew") as caught:
        make_crew(openai_llm(fake_provider), ("researcher", "writer")).kickoff()
    assert not isinstance(caught.value, allowance.BudgetExceeded)
    assert fake_provider.generation_count == 0
    assert hook_calls == ["researcher", "researcher"]
    assert [r.outcome for r in guard.ledger.calls()] == ["stopped"]
    assert no_leak()


def test_on_limit_stop_stops_a_crew_on_a_custom_llm(
    make_crew: Any, hook_calls: list[str]
) -> None:
    guard = allowance.patch(budget=1, on_limit="stop", ledger="memory://")
    llm = CountingLLM(model="house-model")
    with pytest.raises(HookAborted, match="allowance stopped the crew"):
        make_crew(llm).kickoff()
    assert (llm.calls, hook_calls) == (0, ["researcher"])
    assert [r.outcome for r in guard.ledger.calls()] == ["stopped"]


# -- degrade ---------------------------------------------------------------------


def test_degrade_swaps_the_model_for_that_call_only(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    guard = allowance.patch(budget="$0.005", fallback="gpt-4o-mini", ledger="memory://")
    llm = openai_llm(fake_provider, model="gpt-4o", max_tokens=1000)
    make_crew(llm).kickoff()
    last = fake_provider.last_request
    assert last is not None
    assert last.json["model"] == "gpt-4o-mini"
    (record,) = guard.ledger.calls()
    assert (record.requested_model, record.model) == ("gpt-4o", "gpt-4o-mini")
    assert record.outcome == "degraded"
    assert llm.model == "gpt-4o"


# -- per-agent, per-task and crew-wide budgets -----------------------------------


PLAN = (("scan", "researcher"), ("draft", "writer"), ("recheck", "researcher"))


@pytest.fixture
def heavy(fake_provider: FakeProvider) -> FakeProvider:
    """Every answer reports more tokens than the budgets below: one call each."""
    fake_provider.usage = FakeUsage(input_tokens=60_000, output_tokens=1)
    return fake_provider


def test_per_agent_budgets_charge_each_role_separately(
    heavy: FakeProvider, make_crew: Any
) -> None:
    guard = allowance.Guard(
        budget=[allowance.Budget(50_000, per="agent")], ledger="memory://"
    )
    allowance_crewai.install(guard)
    crew = make_crew(openai_llm(heavy), ("researcher", "writer"), PLAN)
    crew.agents[0].max_retry_limit = 0
    with pytest.raises(allowance.BudgetExceeded) as caught:
        crew.kickoff()
    assert heavy.generation_count == 2  # scan and draft; recheck is refused
    assert "researcher" in str(caught.value)
    blocked = [r for r in guard.ledger.calls() if r.outcome == "blocked"]
    assert [(r.scope["agent"], r.scope["task"]) for r in blocked] == [
        ("researcher", "recheck")
    ]


def test_per_task_budgets_charge_each_task_separately(
    heavy: FakeProvider, make_crew: Any
) -> None:
    guard = allowance.Guard(
        budget=[allowance.Budget(50_000, per="task")], ledger="memory://"
    )
    allowance_crewai.install(guard)
    make_crew(openai_llm(heavy), ("researcher", "writer"), PLAN).kickoff()
    assert heavy.generation_count == 3
    for task in ("scan", "draft", "recheck"):
        (status,) = guard.status({"task": task})
        assert status.spent == 60_001


def test_a_crew_wide_budget_alongside_per_agent_budgets(
    heavy: FakeProvider, make_crew: Any
) -> None:
    guard = allowance.Guard(
        budget=[
            allowance.Budget(50_000, per="agent"),
            allowance.Budget(100_000, per="crew"),
        ],
        ledger="memory://",
    )
    allowance_crewai.install(guard)
    plan = (("scan", "researcher"), ("draft", "writer"), ("edit", "editor"))
    crew = make_crew(openai_llm(heavy), ("researcher", "writer", "editor"), plan)
    crew.agents[2].max_retry_limit = 0
    with pytest.raises(allowance.BudgetExceeded) as caught:
        crew.kickoff()
    assert heavy.generation_count == 2
    assert "per crew" in str(caught.value)


# -- thresholds -----------------------------------------------------------------


def test_a_threshold_fires_once_per_crossing_with_agent_and_task(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    fake_provider.usage = FakeUsage(input_tokens=2_499, output_tokens=1)
    events: list[allowance.Event] = []
    guard = allowance.Guard(
        budget=[
            allowance.Budget(
                10_000,
                per="crew",
                thresholds=[allowance.Threshold(0.5, callback=events.append)],
            )
        ],
        ledger="memory://",
    )
    allowance_crewai.install(guard)
    plan = (("a", "researcher"), ("b", "writer"), ("c", "researcher"), ("d", "writer"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_crew(openai_llm(fake_provider), ("researcher", "writer"), plan).kickoff()
    (warned,) = [
        w for w in caught if issubclass(w.category, allowance.BudgetThresholdWarning)
    ]
    assert "50%" in str(warned.message)
    assert fake_provider.generation_count == 4
    (event,) = events
    assert event.kind == "threshold"
    assert (event.scope["agent"], event.scope["task"]) == ("researcher", "c")


# -- tool calls, errors, leaks -------------------------------------------------


@tool("lookup")
def lookup(query: str) -> str:
    """Look a fact up."""
    return f"The answer to {query} is 42."


def test_a_tool_call_answer_is_charged_and_nothing_leaks(
    fake_provider: FakeProvider,
) -> None:
    fake_provider.usage = FakeUsage(input_tokens=10, output_tokens=1)
    fake_provider.enqueue(
        FakeReply(tool_calls=[("lookup", '{"query": "life"}')]),
        FakeReply(text="Final Answer: 42."),
    )
    guard = allowance.patch(budget=100_000, ledger="memory://")
    agent = crewai.Agent(
        role="researcher",
        goal="Find facts.",
        backstory="Terse.",
        llm=openai_llm(fake_provider),
        tools=[lookup],
        max_iter=3,
        verbose=False,
    )
    task = crewai.Task(
        name="find",
        description="Find the answer.",
        expected_output="A number.",
        agent=agent,
    )
    out = crewai.Crew(agents=[agent], tasks=[task], verbose=False).kickoff()
    assert "42" in out.raw
    records = guard.ledger.calls()
    assert len(records) == fake_provider.generation_count == 2
    assert [r.scope["iteration"] for r in records] == ["0", "1"]
    assert all(r.scope["agent"] == "researcher" for r in records)
    assert no_leak()


def test_a_provider_error_releases_and_leaks_nothing(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    fake_provider.enqueue(*[FakeReply(status=500)] * 3)
    guard = allowance.patch(budget=100_000, ledger="memory://")
    crew = make_crew(openai_llm(fake_provider, max_retries=0))
    with pytest.raises(Exception):  # noqa: B017, PT011 - CrewAI's own error type
        crew.kickoff()
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (0, 0)
    assert no_leak()


def _charged_to_its_own_guard(fake: FakeProvider, crew_guard: allowance.Guard) -> None:
    """Nothing is routed here any more: an unrelated client under a guard of its
    own is charged to that guard, not to the crew's."""
    assert no_leak()
    own = allowance.Guard(
        allowance.Policy([allowance.Budget(100_000)]), ledger="memory://"
    )
    already = len(crew_guard.ledger.calls())
    with openai.OpenAI(
        base_url=fake.openai_base_url, api_key="test", max_retries=0
    ) as client:
        allowance.wrap(client, guard=own).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "unrelated"}],
            max_tokens=8,
        )
    assert len(crew_guard.ledger.calls()) == already
    (record,) = own.ledger.calls()
    assert "crewai" not in record.adapters


@pytest.mark.parametrize(
    ("provider", "how"),
    [("openai", "call"), ("openai", "acall"), ("anthropic", "call")],
)
def test_a_direct_call_that_raises_leaves_no_routing_behind(
    fake_provider: FakeProvider, provider: str, how: str
) -> None:
    """CrewAI skips the after hook of a direct ``LLM.call`` that raises: the
    call's own end closes what the before hook opened in it."""
    guard = allowance.Guard(
        allowance.Policy([allowance.Budget(100_000)]), ledger="memory://"
    )
    allowance_crewai.install(guard)
    make = openai_llm if provider == "openai" else anthropic_llm
    llm = make(fake_provider, max_retries=0)
    fake_provider.enqueue(FakeReply(status=500))
    messages = [{"role": "user", "content": "hi"}]

    async def in_one_task() -> None:  # the caller's context is the task's
        with pytest.raises(Exception):  # noqa: B017, PT011 - CrewAI's own error
            await llm.acall(messages)
        _charged_to_its_own_guard(fake_provider, guard)

    if how == "acall":
        asyncio.run(in_one_task())
    else:
        with pytest.raises(Exception):  # noqa: B017, PT011 - CrewAI's own error
            llm.call(messages)
        _charged_to_its_own_guard(fake_provider, guard)
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (0, 0)  # the failed call: released


_LOOKUP_SCHEMA = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a fact up.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    },
}


def test_a_direct_call_answering_tool_calls_leaves_no_routing_behind(
    fake_provider: FakeProvider,
) -> None:
    """A tool-call answer is not text: CrewAI skips the after hook; the call is
    charged once and its routing ends with it."""
    guard = allowance.Guard(
        allowance.Policy([allowance.Budget(100_000)]), ledger="memory://"
    )
    allowance_crewai.install(guard)
    fake_provider.enqueue(FakeReply(tool_calls=[("lookup", '{"query": "life"}')]))
    answer = openai_llm(fake_provider).call(
        [{"role": "user", "content": "Look it up."}], tools=[_LOOKUP_SCHEMA]
    )
    assert not isinstance(answer, str)
    (record,) = guard.ledger.calls()
    assert "crewai" in record.adapters
    _charged_to_its_own_guard(fake_provider, guard)


def test_uninstall_ends_the_routing_open_in_its_context(
    fake_provider: FakeProvider,
) -> None:
    """A before hook ran (CrewAI's own dispatch, as a native LLM runs it) and
    nothing closed what it opened: ``uninstall`` does."""
    guard = allowance.Guard(
        allowance.Policy([allowance.Budget(100_000)]), ledger="memory://"
    )
    allowance_crewai.install(guard)
    llm = openai_llm(fake_provider)
    llm._invoke_before_llm_call_hooks([{"role": "user", "content": "hi"}])
    assert current_route() is not None
    allowance_crewai.uninstall()
    _charged_to_its_own_guard(fake_provider, guard)


# -- a model no SDK layer sees: charged by the adapter itself --------------------


def test_a_custom_llm_is_charged_from_crewai_usage(make_crew: Any) -> None:
    guard = allowance.patch(budget=100_000, ledger="memory://")
    llm = CountingLLM(model="house-model")
    make_crew(llm, ("researcher", "writer")).kickoff()
    records = guard.ledger.calls()
    assert llm.calls == len(records) == 2
    assert all(r.adapters == ("crewai",) for r in records)
    assert [(r.usage.input_tokens, r.usage.output_tokens) for r in records] == [
        (30, 5),
        (30, 5),
    ]
    assert [r.scope["agent"] for r in records] == ["researcher", "writer"]
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (70, 0)
    assert no_leak()


def test_a_custom_llm_is_blocked_in_the_hook_without_a_retry(
    make_crew: Any, hook_calls: list[str]
) -> None:
    guard = allowance.patch(budget=1, ledger="memory://")
    llm = CountingLLM(model="house-model")
    with pytest.raises(allowance.BudgetExceeded):
        make_crew(llm).kickoff()
    assert llm.calls == 0
    assert hook_calls == ["researcher"]
    assert [r.outcome for r in guard.ledger.calls()] == ["blocked"]


def test_a_custom_llm_without_a_price_fails_closed(make_crew: Any) -> None:
    allowance.patch(budget="$1", ledger="memory://")
    llm = CountingLLM(model="house-model-without-price")
    with pytest.raises(HookAborted) as caught:
        make_crew(llm).kickoff()
    assert isinstance(caught.value.__cause__, allowance.PricingError)
    assert llm.calls == 0


class HttpLLM(BaseLLM):
    """A custom LLM no SDK layer sees, over real HTTP (the fake's chat route).

    It reports the provider's usage to CrewAI as a custom LLM does. With a
    ``barrier``, every call waits there after reporting its usage, so that many
    calls on one LLM object are in flight at once.
    """

    base_url: str = ""
    barrier: Any = None
    report_off_context: bool = False

    def call(  # noqa: PLR0917 - CrewAI's signature
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str:
        """Ask the fake; raise its HTTP or connection error as it comes."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        reply = httpx.post(
            f"{self.base_url}/chat/completions",
            json={"model": self.model, "messages": messages, "max_tokens": 64},
            timeout=30,
        )
        reply.raise_for_status()
        body = reply.json()
        if self.report_off_context:  # from a thread of its own, no context copied
            worker = threading.Thread(
                target=self._track_token_usage_internal, args=(body["usage"],)
            )
            worker.start()
            worker.join(30)
        else:
            self._track_token_usage_internal(body["usage"])
        if self.barrier is not None:
            self.barrier.wait()
        return "Final Answer: " + body["choices"][0]["message"]["content"]

    def supports_function_calling(self) -> bool:
        """Text only."""
        return False


def http_llm(fake: FakeProvider, **options: Any) -> HttpLLM:
    """``HttpLLM`` on the fake provider."""
    return HttpLLM(model="house-model", base_url=fake.openai_base_url, **options)


@pytest.mark.parametrize("how", ["kickoff_for_each_async", "crews_gathered"])
def test_concurrent_calls_on_one_custom_llm_are_charged_their_own_usage(
    fake_provider: FakeProvider, make_crew: Any, how: str
) -> None:
    """Copies of a crew (or two crews) share one LLM object and its lifetime
    counters: each call is charged what it reported, not the others' usage."""
    fake_provider.usage = FakeUsage(input_tokens=30, output_tokens=5)
    guard = allowance.patch(budget=1_000_000, ledger="memory://")
    n = 3 if how == "kickoff_for_each_async" else 2
    llm = http_llm(fake_provider, barrier=threading.Barrier(n, timeout=30))

    async def run() -> None:
        if how == "kickoff_for_each_async":
            await make_crew(llm).kickoff_for_each_async([{}] * n)
        else:
            await asyncio.gather(
                make_crew(llm, ("researcher",)).kickoff_async(),
                make_crew(llm, ("writer",)).kickoff_async(),
            )

    asyncio.run(run())
    records = guard.ledger.calls()
    assert len(records) == fake_provider.generation_count == n
    assert [(r.usage.input_tokens, r.usage.output_tokens) for r in records] == [
        (30, 5)
    ] * n
    assert {r.outcome for r in records} == {"ok"}
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (35 * n, 0)
    assert no_leak()


def test_overlapping_calls_whose_usage_is_reported_elsewhere_keep_their_worst_case(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    """An LLM that reports usage outside the call's context leaves only its
    shared counters: when calls on them overlapped, no call can tell its own
    usage, and each keeps its reservation (never another call's usage)."""
    fake_provider.usage = FakeUsage(input_tokens=30, output_tokens=5)
    guard = allowance.patch(budget=1_000_000, ledger="memory://")
    llm = http_llm(
        fake_provider, barrier=threading.Barrier(2, timeout=30), report_off_context=True
    )

    async def run() -> None:
        await make_crew(llm).kickoff_for_each_async([{}, {}])

    asyncio.run(run())
    records = guard.ledger.calls()
    assert len(records) == fake_provider.generation_count == 2
    assert [r.outcome for r in records] == ["unmetered", "unmetered"]
    (status,) = guard.status()
    assert status.spent == sum(r.estimate_tokens for r in records)
    assert status.reserved == 0


@pytest.mark.parametrize(
    ("reply", "charged"),
    [
        pytest.param(FakeReply(status=500), False, id="http-500-released"),
        pytest.param(FakeReply(truncate_after=0), True, id="dropped-kept"),
    ],
)
def test_a_custom_llm_call_that_raises_is_settled_at_once(
    fake_provider: FakeProvider,
    make_crew: Any,
    reply: FakeReply,
    charged: bool,
) -> None:
    """Every attempt (CrewAI retries the call twice) is settled when it raises:
    an HTTP error status is released, a connection dropped mid-answer (the
    provider may have billed) keeps its worst case. Nothing stays reserved."""
    fake_provider.enqueue(reply, reply, reply)
    guard = allowance.patch(budget=1_000_000, ledger="memory://")
    with pytest.raises(httpx.HTTPError):
        make_crew(http_llm(fake_provider)).kickoff()
    assert fake_provider.generation_count == 3
    records = guard.ledger.calls()
    assert [r.outcome for r in records] == ["error"] * 3
    (status,) = guard.status()
    expected = sum(r.estimate_tokens for r in records) if charged else 0
    assert (status.spent, status.reserved) == (expected, 0)
    assert no_leak()


class UnreadableCountsLLM(HttpLLM):
    """Its own counters summary, with a prompt count that is not a whole number."""

    def get_token_usage_summary(self) -> Any:
        """CrewAI's summary, its prompt count off by half a token."""
        summary = super().get_token_usage_summary()
        counts = summary.model_dump()
        return SimpleNamespace(
            **{**counts, "prompt_tokens": counts["prompt_tokens"] + 0.5}
        )


def test_a_count_that_cannot_be_read_keeps_the_worst_case(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    """A missing count is unknown, not zero: the call keeps its reservation."""
    fake_provider.usage = FakeUsage(input_tokens=30, output_tokens=5)
    guard = allowance.patch(budget=1_000_000, ledger="memory://")
    llm = UnreadableCountsLLM(
        model="house-model", base_url=fake_provider.openai_base_url
    )
    make_crew(llm).kickoff()
    (record,) = guard.ledger.calls()
    assert record.outcome == "unmetered"
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (record.estimate_tokens, 0)


def _own(*attrs: tuple[type, str]) -> list[Any]:
    """The attributes as the classes hold them (a wrapt wrapper compares equal
    to what it wraps: identity, not ``==``, tells them apart)."""
    return [vars(cls).get(name) for cls, name in attrs]


def _same(xs: list[Any], ys: list[Any]) -> bool:
    return all(x is y for x, y in zip(xs, ys, strict=True))


_METHODS = (
    (CountingLLM, "call"),
    (BaseLLM, "acall"),
    (BaseLLM, "_track_token_usage_internal"),
)


def test_uninstall_restores_the_custom_llm_class(make_crew: Any) -> None:
    original = _own(*_METHODS)
    allowance.patch(budget=100_000, ledger="memory://")
    make_crew(CountingLLM(model="house-model")).kickoff()
    wrapped = _own(*_METHODS)
    assert not any(w is o for w, o in zip(wrapped, original, strict=True))
    allowance.unpatch()
    assert _same(_own(*_METHODS), original)


def test_custom_llm_methods_are_wrapt_wrappers_keeping_what_inspect_sees(
    make_crew: Any,
) -> None:
    """Installed on the class as ``wrapt.FunctionWrapper``: signatures,
    coroutine-ness, bound methods and ``__wrapped__`` stay the original's."""
    original = _own(*_METHODS)
    llm = CountingLLM(model="house-model")

    def signatures() -> list[inspect.Signature]:
        methods = (
            CountingLLM.call,
            llm.call,
            llm.acall,
            llm._track_token_usage_internal,
        )
        return [inspect.signature(f) for f in methods]

    before = signatures()
    allowance.patch(budget=100_000, ledger="memory://")
    make_crew(llm).kickoff()
    for attr, orig in zip(_own(*_METHODS), original, strict=True):
        assert isinstance(attr, wrapt.FunctionWrapper)
        assert attr.__wrapped__ is orig
    assert signatures() == before
    assert inspect.iscoroutinefunction(llm.acall)
    assert not inspect.iscoroutinefunction(llm.call)
    assert inspect.ismethod(llm.call)
    assert llm.call.__self__ is llm


class InheritingLLM(CountingLLM):
    """Every method inherited: ``call`` from ``CountingLLM``, the rest from CrewAI."""


@pytest.mark.parametrize("first", [CountingLLM, InheritingLLM])
def test_an_inherited_method_is_wrapped_once_where_defined_and_restored(
    make_crew: Any, first: type[CountingLLM]
) -> None:
    """A subclass's inherited method is wrapped on the class defining it, once,
    whichever class is used first; the subclass never gets an attribute of its
    own, before or after ``uninstall``, and each call is charged once."""
    original = _own(*_METHODS)
    guard = allowance.patch(budget=100_000, ledger="memory://")
    second = InheritingLLM if first is CountingLLM else CountingLLM
    make_crew(first(model="house-model")).kickoff()
    wrapped = _own(*_METHODS)
    make_crew(second(model="house-model")).kickoff()
    assert _same(_own(*_METHODS), wrapped)  # not wrapped again
    assert all(w.__wrapped__ is o for w, o in zip(wrapped, original, strict=True))
    assert not {"call", "acall", "_track_token_usage_internal"} & set(
        vars(InheritingLLM)
    )
    records = guard.ledger.calls()
    assert [(r.usage.input_tokens, r.usage.output_tokens) for r in records] == [
        (30, 5),
        (30, 5),
    ]
    allowance.unpatch()
    assert _same(_own(*_METHODS), original)
    assert not {"call", "acall", "_track_token_usage_internal"} & set(
        vars(InheritingLLM)
    )


# -- install / uninstall ---------------------------------------------------------


def _ours(hooks: list[Any]) -> list[Any]:
    return [
        h for h in hooks if getattr(h, "__module__", "") == "allowance_crewai._hooks"
    ]


def test_install_twice_swaps_the_guard_and_uninstall_removes_every_hook(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    first = allowance.Guard(budget=100_000, ledger="memory://")
    second = allowance.Guard(budget=100_000, ledger="memory://")
    allowance_crewai.install(first)
    allowance_crewai.install(second)
    assert len(_ours(get_before_llm_call_hooks())) == 1
    assert allowance_crewai.ADAPTER.installed()
    make_crew(openai_llm(fake_provider)).kickoff()
    assert (len(first.ledger.calls()), len(second.ledger.calls())) == (0, 1)
    allowance_crewai.uninstall()
    assert _ours(get_before_llm_call_hooks()) == []
    assert _ours(get_after_llm_call_hooks()) == []
    assert not allowance_crewai.ADAPTER.installed()
    allowance_crewai.uninstall()  # a no-op
    make_crew(openai_llm(fake_provider)).kickoff()
    assert len(second.ledger.calls()) == 1


def test_install_refuses_what_is_not_a_guard() -> None:
    with pytest.raises(allowance.ConfigurationError, match=r"allowance\.Guard"):
        allowance_crewai.install("$5")  # type: ignore[arg-type]


def test_the_adapter_is_found_through_the_entry_point() -> None:
    adapter = plugins.adapters()["crewai"]
    assert adapter is allowance_crewai.ADAPTER
    assert adapter.available()
    assert adapter.requires == ("crewai>=1.15,<2",)


def test_the_one_line_patch_covers_a_crew_built_before_it(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    crew = make_crew(openai_llm(fake_provider))
    guard = allowance.patch(budget="$5.00", fallback="gpt-4o-mini", ledger="memory://")
    crew.kickoff()
    (record,) = guard.ledger.calls()
    assert record.adapters == ("crewai", "openai")
    assert guard.spent() > Decimal(0)


# -- offline ------------------------------------------------------------------

_connects: list[tuple[str, Any]] = []
_recording = [False]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect" and _recording[0]:
        address = args[1]
        host = address[0] if isinstance(address, tuple) else str(address)
        _connects.append((host, address))


sys.addaudithook(_audit)


def test_a_kickoff_connects_to_loopback_only(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    allowance.patch(budget=100_000, ledger="memory://")
    crew = make_crew(openai_llm(fake_provider), ("researcher", "writer"))
    _connects.clear()
    _recording[0] = True
    try:
        crew.kickoff()
    finally:
        _recording[0] = False
    assert not (Path.cwd() / ".crewai").exists()
    assert _connects, "the audit hook saw no connection at all"
    assert {host for host, _ in _connects} <= {"127.0.0.1", "::1", "localhost"}, (
        _connects
    )


# -- the demo scene and the example ----------------------------------------------


def test_the_demo_scene_tells_its_story(
    fake_provider: FakeProvider, tmp_path: Path
) -> None:
    (scene,) = allowance_demo_scenes()
    out = io.StringIO()
    scene(Console(file=out, width=200), fake_provider, f"sqlite:///{tmp_path}/d.db", 7)
    text = out.getvalue()
    assert "7. A CrewAI crew" in text
    assert "BudgetExceeded from kickoff() after 5 requests" in text
    assert "blocked, nothing sent" in text
    assert fake_provider.generation_count == 5
    assert not allowance_crewai.ADAPTER.installed()
    assert no_leak()


def test_the_example_runs_offline(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).parents[2] / "examples" / "crewai_budget.py"
    root = logging.getLogger()
    crewai_logger = logging.getLogger("crewai")
    levels = (root.level, crewai_logger.level)
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        root.setLevel(levels[0])
        crewai_logger.setLevel(levels[1])
    printed = capsys.readouterr().out
    assert "kickoff() raised BudgetExceeded" in printed
    assert "llm.model='gpt-4o'" in printed
    assert no_leak()


def test_an_async_task_is_attributed_and_leaks_nothing(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    guard = allowance.patch(budget=100_000, ledger="memory://")
    crew = make_crew(openai_llm(fake_provider), ("researcher", "writer"))
    crew.tasks[0].async_execution = True
    crew.kickoff()
    records = guard.ledger.calls()
    assert sorted(r.scope["agent"] for r in records) == ["researcher", "writer"]
    assert all(r.adapters == ("crewai", "openai") for r in records)
    assert no_leak()


def test_kickoff_for_each_charges_every_copy(
    fake_provider: FakeProvider, make_crew: Any
) -> None:
    fake_provider.usage = FakeUsage(input_tokens=10, output_tokens=1)
    guard = allowance.patch(budget=100_000, ledger="memory://")
    crew = make_crew(openai_llm(fake_provider), name="desk")
    crew.kickoff_for_each([{}, {}, {}])
    records = guard.ledger.calls()
    assert len(records) == fake_provider.generation_count == 3
    assert {r.scope["crew"] for r in records} == {"desk"}
    (status,) = guard.status()
    assert status.spent == 33
