"""One model call over several message lists, one of which fails at the provider.

The sync ``generate([...])`` of a chat model starts one LangChain run per
message list, then sends the lists one by one. When one fails it errors that
run alone and raises: the lists sent before it (answered: the provider did the
work) are never ended, the lists after it (never sent) get no callback at all.
The handler settles them itself: the former keep their worst case, the latter
are released. ``agenerate`` sends every list and ends or errors every run: each
is settled by its own callback, as before.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from langchain_core.language_models import BaseLLM
from langchain_core.messages import HumanMessage
from langchain_core.outputs import LLMResult
from tests.langchain.conftest import (
    ACME,
    acme,
    chat_openai,
    guard_of,
    handler,
)

import allowance
from allowance import integration
from allowance.testing import FakeReply

if TYPE_CHECKING:
    from langchain_core.callbacks import CallbackManagerForLLMRun

    from allowance.testing import FakeProvider
    from allowance_langchain import AllowanceCallbackHandler

PROMPT = "Say hello."
WORST = integration.estimate_chat(
    "acme", ACME, [{"role": "user", "content": PROMPT}], max_output_tokens=64
).total_tokens
"""What the handler reserves for one ``acme`` call of PROMPT."""
LISTS = [[HumanMessage(PROMPT)], [HumanMessage(PROMPT)], [HumanMessage(PROMPT)]]


def spent_reserved(h: AllowanceCallbackHandler) -> tuple[int, int]:
    (status,) = guard_of(h).status()
    return status.spent, status.reserved


def assert_no_run_left(h: AllowanceCallbackHandler) -> None:
    assert len(h._runs.calls) == 0
    assert integration.current_route() is None
    assert "langchain_run" not in allowance.current_scope()


def outcomes(h: AllowanceCallbackHandler) -> list[str]:
    return sorted(r.outcome for r in guard_of(h).ledger.calls())


@pytest.mark.parametrize(
    ("failure", "failed_kept"),
    [(FakeReply(status=500), False), (FakeReply(truncate_after=0), True)],
    ids=["http-500", "dropped"],
)
def test_sync_generate_settles_the_lists_around_the_failed_one(
    fake_provider: FakeProvider, failure: FakeReply, *, failed_kept: bool
) -> None:
    """Three lists, the 2nd fails: the 1st keeps its worst case, the 3rd is free.

    If this fails with reservations held and runs in flight: the lists LangChain
    never ended (the 1st) or never sent (the 3rd) were left to their lease.
    """
    fake_provider.enqueue(FakeReply(), failure, FakeReply())
    h = handler(budget=1_000_000)
    with pytest.raises(Exception):  # noqa: B017, PT011 - httpx's own error
        acme(fake_provider).generate(LISTS, callbacks=[h])
    assert fake_provider.generation_count == 2  # the 3rd list was never sent
    assert_no_run_left(h)
    failed = WORST if failed_kept else 0
    assert spent_reserved(h) == (WORST + failed, 0)
    assert outcomes(h) == ["error", "error", "error"]


def test_sync_generate_a_failed_first_list_frees_the_others(
    fake_provider: FakeProvider,
) -> None:
    """The 1st list fails (nothing done): none of the three is charged."""
    fake_provider.enqueue(FakeReply(status=500))
    h = handler(budget=3 * WORST)
    model = acme(fake_provider)
    with pytest.raises(httpx.HTTPStatusError):
        model.generate(LISTS, callbacks=[h])
    assert fake_provider.generation_count == 1
    assert_no_run_left(h)
    assert spent_reserved(h) == (0, 0)
    # The budget is whole again: the same call, which needs all of it, is sent.
    model.generate(LISTS, callbacks=[h])
    assert fake_provider.generation_count == 4
    spent, reserved = spent_reserved(h)
    assert 0 < spent < 3 * WORST
    assert reserved == 0


def test_sync_generate_two_handlers_each_settle_their_own(
    fake_provider: FakeProvider,
) -> None:
    """Two handlers on the call: each settles the lists around the failed one."""
    fake_provider.enqueue(FakeReply(), FakeReply(status=500))
    first, second = handler(budget=1_000_000), handler(budget=1_000_000)
    with pytest.raises(httpx.HTTPStatusError):
        acme(fake_provider).generate(LISTS, callbacks=[first, second])
    for h in (first, second):
        assert_no_run_left(h)
        assert spent_reserved(h) == (WORST, 0)


def test_sync_generate_through_the_sdk_layer_leaves_no_run(
    fake_provider: FakeProvider,
) -> None:
    """ChatOpenAI (charged by the SDK layer): the runs' routes are ended too.

    If this fails with runs in flight: the handler kept the routes of the lists
    LangChain never ended.
    """
    fake_provider.enqueue(FakeReply(), FakeReply(status=500), FakeReply())
    h = handler(budget=1_000_000)
    with pytest.raises(Exception):  # noqa: B017, PT011 - openai's own error
        chat_openai(fake_provider).generate(LISTS, callbacks=[h])
    assert fake_provider.generation_count == 2
    assert_no_run_left(h)
    spent, reserved = spent_reserved(h)
    assert spent > 0  # the 1st list, its usage (the SDK layer saw the answer)
    assert reserved == 0
    assert outcomes(h) == ["error", "ok"]


async def test_agenerate_settles_every_list_by_its_own_callback(
    fake_provider: FakeProvider,
) -> None:
    """``agenerate``: the lists that succeeded are charged their real usage.

    If this fails with their worst case charged (or nothing): the handler
    settled them at the failed list's error, before their own end came.
    """
    fake_provider.enqueue(FakeReply(), FakeReply(status=500), FakeReply())
    h = handler(budget=1_000_000)
    with pytest.raises(httpx.HTTPStatusError):
        await asyncio.wait_for(
            acme(fake_provider).agenerate(LISTS, callbacks=[h]), timeout=30
        )
    assert fake_provider.generation_count == 3
    assert_no_run_left(h)
    records = guard_of(h).ledger.calls()
    assert sorted(r.outcome for r in records) == ["error", "ok", "ok"]
    ok = [
        r.usage.input_tokens + r.usage.output_tokens
        for r in records
        if r.outcome == "ok"
    ]
    assert all(0 < used < WORST for used in ok)
    assert spent_reserved(h) == (sum(ok), 0)


class _FailingLLM(BaseLLM):
    """A completion model whose one request for all prompts fails."""

    @property
    def _llm_type(self) -> str:
        return "failing"

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        raise TimeoutError


def test_sync_generate_of_a_completion_model_errors_every_prompt() -> None:
    """A completion model sends its prompts at once and errors each run.

    Every run is settled by its own error (the worst case: a timeout): none
    is released as never sent when the first one errors.
    """
    h = handler(budget=1_000_000)
    with pytest.raises(TimeoutError):
        _FailingLLM().generate([PROMPT] * 3, callbacks=[h])
    assert_no_run_left(h)
    records = guard_of(h).ledger.calls()
    assert [r.outcome for r in records] == ["error"] * 3
    spent, reserved = spent_reserved(h)
    assert spent == sum(r.estimate_tokens for r in records)
    assert reserved == 0
