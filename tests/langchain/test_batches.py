"""One model call over several inputs, refused part-way through its starts.

``generate([...])`` / ``agenerate([...])`` start one LangChain run per message
list (per prompt, for a completion model). When the handler refuses one of
them, LangChain raises at once: it never ends (nor errors) the runs already
started, and sends none of them. The handler gives those runs back itself,
and only those: a run of any other call in flight is left alone.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.messages import HumanMessage
from tests.langchain.conftest import ACME, acme, acme_stream, guard_of, handler

import allowance
from allowance import integration

if TYPE_CHECKING:
    from allowance.testing import FakeProvider
    from allowance_langchain import AllowanceCallbackHandler

PROMPT = "Say hello."
TEXT = " ".join(f"w{i}" for i in range(40))  # one word per stream chunk
WORST = integration.estimate_chat(
    "acme", ACME, [{"role": "user", "content": PROMPT}], max_output_tokens=64
).total_tokens
"""What the handler reserves for one ``acme`` call of PROMPT."""


def spent_reserved(h: AllowanceCallbackHandler) -> tuple[int, int]:
    (status,) = guard_of(h).status()
    return status.spent, status.reserved


def in_flight(h: AllowanceCallbackHandler) -> int:
    return len(h._runs.calls)


def assert_nothing_held(h: AllowanceCallbackHandler) -> None:
    """Nothing reserved, nothing spent, no run in flight, no route left here."""
    assert spent_reserved(h) == (0, 0)
    assert in_flight(h) == 0
    assert integration.current_route() is None
    assert "langchain_run" not in allowance.current_scope()


async def generate(model: Any, inputs: list[Any], how: str, config: Any) -> Any:
    if how == "generate":
        return model.generate(inputs, **config)
    return await asyncio.wait_for(model.agenerate(inputs, **config), timeout=30)


@pytest.mark.parametrize("how", ["generate", "agenerate"])
async def test_a_refused_message_list_gives_back_the_ones_started_before_it(
    how: str, fake_provider: FakeProvider
) -> None:
    """Budget for one call, two message lists: the 2nd is refused, nothing is held.

    If this fails with one call's worth reserved and a run in flight: the
    first list's reservation was left to its lease (LangChain never ends a
    run it started when a later start raises).
    """
    h = handler(budget=2 * WORST - 1)
    model = acme(fake_provider)
    lists = [[HumanMessage(PROMPT)], [HumanMessage(PROMPT)]]
    with pytest.raises(allowance.BudgetExceeded):
        await generate(model, lists, how, {"callbacks": [h]})
    assert fake_provider.generation_count == 0
    assert_nothing_held(h)
    assert {r.outcome for r in guard_of(h).ledger.calls()} == {"blocked"}
    # The budget is whole again: one call that fits is admitted, and charged.
    model.invoke(PROMPT, config={"callbacks": [h]})
    assert fake_provider.generation_count == 1
    spent, reserved = spent_reserved(h)
    assert 0 < spent <= WORST
    assert reserved == 0


def _probe_llm_estimate() -> int:
    probe = handler(budget=1_000_000)
    FakeListLLM(responses=["hi"]).invoke(PROMPT, config={"callbacks": [probe]})
    (record,) = guard_of(probe).ledger.calls()
    return record.estimate_tokens


@pytest.mark.parametrize("prompts", [2, 3])
@pytest.mark.parametrize("how", ["generate", "agenerate"])
async def test_a_refused_prompt_gives_back_the_ones_started_before_it(
    how: str, prompts: int
) -> None:
    """The same for a completion model (``on_llm_start``, one run per prompt).

    ``agenerate`` starts the prompts' runs in tasks of their own and does not
    stop the others when one is refused: with 3 prompts, the 3rd would fit
    once the 1st is given back, and must be refused all the same.
    """
    one = _probe_llm_estimate()
    h = handler(budget=2 * one - 1)
    model = FakeListLLM(responses=["hi"] * 4)
    with pytest.raises(allowance.BudgetExceeded):
        await generate(model, [PROMPT] * prompts, how, {"callbacks": [h]})
    await asyncio.sleep(0)  # the runs agenerate left starting
    assert model.i == 0
    assert_nothing_held(h)
    model.invoke(PROMPT, config={"callbacks": [h]})
    assert model.i == 1
    assert spent_reserved(h) == (one, 0)  # no usage: the worst case, kept


def test_two_handlers_a_refusal_by_one_gives_back_the_other(
    fake_provider: FakeProvider,
) -> None:
    """Two handlers on one call: the second refuses, the first holds nothing.

    If this fails with the first handler's reservation held: LangChain never
    ended the run the first handler admitted.
    """
    first, second = handler(budget=1_000_000), handler(budget=WORST - 1)
    model = acme(fake_provider)
    with pytest.raises(allowance.BudgetExceeded):
        model.invoke(PROMPT, config={"callbacks": [first, second]})
    assert fake_provider.generation_count == 0
    assert_nothing_held(first)
    assert_nothing_held(second)


def test_a_refusal_leaves_a_stream_in_flight_alone(
    fake_provider: FakeProvider,
) -> None:
    """A batch refused in the loop of a stream: the stream is still charged.

    Room for three calls: the stream, the batch's first list; its second is
    refused. The stream, in flight with the same handler, must keep its
    reservation and be charged its usage at the end.

    If this fails with nothing spent: the refusal released the stream too.
    If it fails with a call's worth reserved: the batch's first list was kept.
    """
    fake_provider.text = TEXT
    h = handler(budget=3 * WORST - 1)
    stream = acme_stream(fake_provider)
    batch = acme(fake_provider)
    chunks = 0
    for _chunk in stream.stream(PROMPT, config={"callbacks": [h]}):
        chunks += 1
        if chunks == 2:
            with pytest.raises(allowance.BudgetExceeded):
                batch.generate(
                    [[HumanMessage(PROMPT)], [HumanMessage(PROMPT)]], callbacks=[h]
                )
            assert spent_reserved(h) == (0, WORST)
            assert in_flight(h) == 1
    assert chunks > 2
    assert fake_provider.generation_count == 1
    outcomes = sorted(r.outcome for r in guard_of(h).ledger.calls())
    assert outcomes == ["blocked", "blocked", "ok"]
    spent, reserved = spent_reserved(h)
    assert 0 < spent <= WORST
    assert reserved == 0
    assert in_flight(h) == 0


async def test_a_refusal_leaves_a_stream_of_another_task_alone(
    fake_provider: FakeProvider,
) -> None:
    """The same with ``astream`` in one task and ``agenerate`` refused in another."""
    fake_provider.text = TEXT
    h = handler(budget=3 * WORST - 1)
    stream = acme_stream(fake_provider)
    batch = acme(fake_provider)
    started, refused = asyncio.Event(), asyncio.Event()

    async def consume() -> int:
        chunks = 0
        async for _chunk in stream.astream(PROMPT, config={"callbacks": [h]}):
            chunks += 1
            if chunks == 2:
                started.set()
                await refused.wait()
        return chunks

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(started.wait(), timeout=30)
    with pytest.raises(allowance.BudgetExceeded):
        await batch.agenerate(
            [[HumanMessage(PROMPT)], [HumanMessage(PROMPT)]], callbacks=[h]
        )
    assert spent_reserved(h) == (0, WORST)
    assert in_flight(h) == 1
    refused.set()
    assert await asyncio.wait_for(task, timeout=30) > 2
    assert fake_provider.generation_count == 1
    spent, reserved = spent_reserved(h)
    assert 0 < spent <= WORST
    assert reserved == 0
    assert in_flight(h) == 0
