"""The public contract for framework adapters (``allowance.integration``).

A framework adapter routes a call to its own guard with ``seen_by(guard=...)``
(the SDK layer beneath charges it, exactly, once), or charges the call itself
with ``seen_by(guard=..., charged=True)`` (the SDK layer passes it through).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai
import pytest
from tests.sdk.conftest import GPT, USER

import allowance
from allowance import integration, plugins
from allowance.testing import FakeReply, FakeUsage

if TYPE_CHECKING:
    from collections.abc import Callable


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    allowance.unpatch()


def guard(limit: int = 100_000) -> allowance.Guard:
    return allowance.Guard(budget=limit, ledger="memory://")


def test_sdk_layer_hooks_the_sdk_without_a_guard(fake_provider, openai_client):
    assert integration.sdk_layer("openai")
    assert integration.sdk_layer("OpenAI")  # idempotent, case-insensitive
    adapter = plugins.adapters()["openai"]
    assert not adapter.installed  # hooked for routed calls only
    openai_client.chat.completions.create(model=GPT, messages=USER)
    assert fake_provider.generation_count == 1  # passed through, nothing to charge


def test_routed_calls_are_charged_to_the_adapters_guard(fake_provider, openai_client):
    fake_provider.usage = FakeUsage(input_tokens=30, output_tokens=5)
    mine = guard()
    integration.sdk_layer("openai")
    with allowance.seen_by("myframework", guard=mine, agent="writer"):
        openai_client.chat.completions.create(model=GPT, messages=USER)
    (record,) = mine.ledger.calls()
    assert record.adapters == ("myframework", "openai")
    assert record.scope["agent"] == "writer"
    assert record.usage.total_tokens == 35


def test_a_routed_call_over_budget_sends_nothing(fake_provider, openai_client):
    integration.sdk_layer("openai")
    with (
        allowance.seen_by("myframework", guard=guard(1)),
        pytest.raises(allowance.BudgetExceeded),
    ):
        openai_client.chat.completions.create(model=GPT, messages=USER)
    assert fake_provider.generation_count == 0


def test_routing_wins_over_the_patched_guard(fake_provider, openai_client):
    patched = allowance.patch(budget=100_000, ledger="memory://", adapters=["openai"])
    mine = guard()
    with allowance.seen_by("myframework", guard=mine):
        openai_client.chat.completions.create(model=GPT, messages=USER)
    assert len(mine.ledger.calls()) == 1
    assert patched.ledger.calls() == []


def test_a_call_the_adapter_charges_itself_is_not_charged_again(
    fake_provider, openai_client
):
    patched = allowance.patch(budget=100_000, ledger="memory://", adapters=["openai"])
    mine = guard()
    with allowance.seen_by("myframework", guard=mine, charged=True):
        openai_client.chat.completions.create(model=GPT, messages=USER)
    assert patched.ledger.calls() == []
    assert mine.ledger.calls() == []  # the adapter's own ticket would charge it


def test_the_route_ends_with_the_block(fake_provider, openai_client):
    patched = allowance.patch(budget=100_000, ledger="memory://", adapters=["openai"])
    with allowance.seen_by("myframework", guard=guard()):
        pass
    openai_client.chat.completions.create(model=GPT, messages=USER)
    assert len(patched.ledger.calls()) == 1
    assert integration.current_route() is None


def test_charged_needs_a_guard():
    with pytest.raises(allowance.ConfigurationError, match="charged"):
        allowance.seen_by("x", charged=True)


@pytest.mark.parametrize("provider", ["google", "ollama", "bedrock"])
def test_providers_without_an_sdk_layer(provider):
    assert not integration.sdk_layer(provider)


def test_estimate_chat_bounds_input_and_caps_output():
    est = integration.estimate_chat(
        "google",
        "gemini-2.0-flash",
        [{"role": "system", "content": "Be brief."}, "Hello there"],
        max_output_tokens=100,
    )
    assert (est.provider, est.model, est.output_tokens) == (
        "google",
        "gemini-2.0-flash",
        100,
    )
    assert est.input_tokens >= len("Be brief.") + len("Hello there")
    assert not est.exact_input


def test_estimate_chat_counts_tools_and_refuses_a_bad_cap():
    plain = integration.estimate_chat("google", "m", ["hi"], max_output_tokens=1)
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    with_tools = integration.estimate_chat(
        "google", "m", ["hi"], max_output_tokens=1, tools=tools
    )
    assert with_tools.input_tokens > plain.input_tokens
    with pytest.raises(allowance.ConfigurationError, match="max_tokens"):
        integration.estimate_chat("google", "m", ["hi"], max_output_tokens=-1)
    with pytest.raises(allowance.ConfigurationError, match="model"):
        integration.estimate_chat("google", "", ["hi"])


def test_a_route_ended_from_another_context_is_inert(fake_provider, openai_client):
    import contextvars

    patched = allowance.patch(budget=100_000, ledger="memory://", adapters=["openai"])
    mine = guard()
    seen = allowance.seen_by("myframework", guard=mine)
    seen.__enter__()
    contextvars.copy_context().run(seen.end)
    openai_client.chat.completions.create(model=GPT, messages=USER)
    assert mine.ledger.calls() == []
    assert len(patched.ledger.calls()) == 1
    seen.__exit__(None, None, None)
    with seen:  # entering again routes again
        openai_client.chat.completions.create(model=GPT, messages=USER)
    assert len(mine.ledger.calls()) == 1


@pytest.mark.parametrize(
    "option",
    [{"window": "day"}, {"per": "tenant"}, {"session": "s-1"}, {"budget": 5}],
)
def test_make_guard_refuses_a_guard_with_budget_arguments(option, openai_client):
    existing = guard()
    assert integration.make_guard(guard=existing) is existing
    with pytest.raises(allowance.ConfigurationError, match="guard"):
        integration.make_guard(guard=existing, **option)
    with pytest.raises(allowance.ConfigurationError, match="guard"):
        allowance.wrap(openai_client, guard=existing, **option)


def raised(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except Exception as err:  # the error is the result
        return err
    raise AssertionError("no error")


def test_provider_did_no_work_reads_real_sdk_errors(fake_provider):
    """Released: an error status, a connection never made. Kept: the rest."""
    client = openai.OpenAI(
        base_url=fake_provider.openai_base_url, api_key="x", max_retries=0
    )
    refused = openai.OpenAI(
        base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0
    )

    def create(on: openai.OpenAI = client, **options: Any) -> object:
        return on.with_options(**options).chat.completions.create(
            model=GPT, messages=USER
        )

    fake_provider.enqueue(FakeReply(status=500))
    assert integration.provider_did_no_work(raised(create))
    assert integration.provider_did_no_work(raised(lambda: create(refused)))
    fake_provider.enqueue(FakeReply(latency=0.5))
    assert not integration.provider_did_no_work(raised(lambda: create(timeout=0.05)))
    fake_provider.enqueue(FakeReply(truncate_after=0))
    assert not integration.provider_did_no_work(raised(create))  # dropped mid-answer
    fake_provider.enqueue(FakeReply(status=429))
    status = raised(create)

    def wrapped() -> None:
        raise RuntimeError("a framework's own error") from status

    assert integration.provider_did_no_work(raised(wrapped))  # through the cause
    assert not integration.provider_did_no_work(TimeoutError())
    assert not integration.provider_did_no_work(ValueError("unknown"))
    client.close()
    refused.close()


def test_a_route_bound_to_a_stream_is_in_force_only_while_it_runs(
    fake_provider, openai_client
):
    """A framework stream that sends its request at its first ``next()``.

    The adapter's code has returned by then: the route stays set in the
    caller's context, bound to the stream. The caller's own calls before
    and between its steps are charged to their own guard.
    """
    patched = allowance.patch(budget=100_000, ledger="memory://", adapters=["openai"])
    mine = guard()

    def stream() -> Any:
        openai_client.chat.completions.create(model=GPT, messages=USER)
        yield "chunk"
        yield "more"

    seen = allowance.seen_by("myframework", guard=mine)
    with seen:
        gen = stream()
        seen.bind(gen)
    with seen:  # as an adapter leaves it: set in the caller's context
        assert integration.current_route() is None
        openai_client.chat.completions.create(model=GPT, messages=USER)  # its own
        assert next(gen) == "chunk"  # the stream's request, routed
        openai_client.chat.completions.create(model=GPT, messages=USER)  # its own
        seen.end()
        assert list(gen) == ["more"]
    assert len(mine.ledger.calls()) == 1
    assert len(patched.ledger.calls()) == 2


async def test_a_route_bound_to_an_async_stream_is_in_force_only_while_it_runs(
    fake_provider,
):
    client = openai.AsyncOpenAI(base_url=fake_provider.openai_base_url, api_key="x")
    patched = allowance.patch(budget=100_000, ledger="memory://", adapters=["openai"])
    mine = guard()

    async def stream() -> Any:
        await client.chat.completions.create(model=GPT, messages=USER)
        yield "chunk"

    seen = allowance.seen_by("myframework", guard=mine)
    with seen:
        gen = stream()
        seen.bind(gen)
        assert integration.current_route() is None
        await client.chat.completions.create(model=GPT, messages=USER)  # its own
        assert [chunk async for chunk in gen] == ["chunk"]  # routed
    assert len(mine.ledger.calls()) == 1
    assert len(patched.ledger.calls()) == 1
    await client.close()


def test_a_route_bound_to_what_is_not_a_generator_routes_nothing(
    fake_provider, openai_client
):
    patched = allowance.patch(budget=100_000, ledger="memory://", adapters=["openai"])
    mine = guard()
    seen = allowance.seen_by("myframework", guard=mine)
    with seen:
        seen.bind(iter(["a list's iterator never runs code"]))
        openai_client.chat.completions.create(model=GPT, messages=USER)
    seen.end()
    seen.bind(x for x in ())  # an ended route stays ended
    with seen:  # entered again after end: routed again
        openai_client.chat.completions.create(model=GPT, messages=USER)
    assert len(mine.ledger.calls()) == 1
    assert len(patched.ledger.calls()) == 1
