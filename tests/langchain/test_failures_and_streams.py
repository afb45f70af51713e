"""Failed calls, streams broken off, and who charges what around a LangChain call.

Real models over real HTTP on the fake provider: ``AcmeChatModel`` (and its
streaming twin) stand for models the handler charges itself, ChatOpenAI and
ChatAnthropic for models the SDK layer charges.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from typing import TYPE_CHECKING, Any

import openai
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.runnables import RunnableLambda, RunnableParallel
from tests.langchain.conftest import (
    ACME,
    AcmeChatModel,
    acme,
    acme_stream,
    chat_anthropic,
    chat_openai,
    guard_of,
    handler,
)

import allowance
from allowance import integration
from allowance.testing import FakeReply
from allowance_langchain import AllowanceCallbackHandler

if TYPE_CHECKING:
    from collections.abc import Callable

    from langchain_core.language_models import BaseChatModel

    from allowance.testing import FakeProvider

PROMPT = "Say hello."
TEXT = " ".join(f"w{i}" for i in range(40))  # one word per stream chunk
WORST = integration.estimate_chat(
    "acme", ACME, [{"role": "user", "content": PROMPT}], max_output_tokens=64
)
"""What the handler reserves for one ``acme`` call of PROMPT."""


def spent_reserved(guard: allowance.Guard) -> tuple[int, int]:
    (status,) = guard.status()
    return status.spent, status.reserved


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a call that raised: released only when the provider did no work ----------------


def _fails_with_an_error_status(fake: FakeProvider) -> AcmeChatModel:
    fake.enqueue(FakeReply(status=500))
    return acme(fake)


def _never_connects(fake: FakeProvider) -> AcmeChatModel:
    return AcmeChatModel(base_url=f"http://127.0.0.1:{closed_port()}/v1", max_tokens=64)


def _dropped_mid_answer(fake: FakeProvider) -> AcmeChatModel:
    fake.enqueue(FakeReply(truncate_after=0))
    return acme(fake)


def _times_out(fake: FakeProvider) -> AcmeChatModel:
    fake.enqueue(FakeReply(latency=1.0))
    return AcmeChatModel(base_url=fake.openai_base_url, max_tokens=64, timeout=0.2)


@pytest.mark.parametrize(
    ("failure", "released"),
    [
        (_fails_with_an_error_status, True),
        (_never_connects, True),
        (_dropped_mid_answer, False),
        (_times_out, False),
    ],
    ids=["http-500", "never-connected", "dropped", "timeout"],
)
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_failed_call_is_released_only_if_the_provider_did_no_work(
    failure: Callable[[FakeProvider], AcmeChatModel],
    mode: str,
    fake_provider: FakeProvider,
    *,
    released: bool,
) -> None:
    """An error status or a connection never made: free. Else the worst case.

    If this fails on "dropped" or "timeout" with nothing spent: the handler
    released a call the provider may have billed.
    """
    h = handler(budget=1_000_000)
    model = failure(fake_provider)

    async def call() -> object:
        if mode == "invoke":
            return model.invoke(PROMPT, config={"callbacks": [h]})
        return await asyncio.wait_for(
            model.ainvoke(PROMPT, config={"callbacks": [h]}), timeout=30
        )

    with pytest.raises(Exception):  # noqa: B017, PT011 - each model's own error
        await call()
    (record,) = guard_of(h).ledger.calls()
    assert record.outcome == "error"
    expected = 0 if released else WORST.total_tokens
    assert spent_reserved(guard_of(h)) == (expected, 0)


# -- a stream broken off: charged what it produced ------------------------------------


def _assert_partial(h: AllowanceCallbackHandler) -> allowance.CallRecord:
    (record,) = guard_of(h).ledger.calls()
    assert record.outcome == "partial"
    assert record.usage.input_tokens == WORST.input_tokens
    assert 0 < record.usage.output_tokens < WORST.output_tokens
    assert spent_reserved(guard_of(h)) == (record.usage.total_tokens, 0)
    return record


def test_a_stream_broken_off_is_charged_what_it_produced(
    fake_provider: FakeProvider,
) -> None:
    """Budget for one call: a stream closed after 3 chunks, then the next is refused.

    If this fails with a second request: the broken-off stream was released
    (charged nothing), and every stream cut short was free.
    """
    fake_provider.text = TEXT
    h = handler(budget=WORST.total_tokens)
    model = acme_stream(fake_provider)
    stream = model.stream(PROMPT, config={"callbacks": [h]})
    for i, _chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()
    _assert_partial(h)
    with pytest.raises(allowance.BudgetExceeded):
        list(model.stream(PROMPT, config={"callbacks": [h]}))
    assert fake_provider.generation_count == 1


async def test_an_async_stream_closed_early_is_charged_what_it_produced(
    fake_provider: FakeProvider,
) -> None:
    """``astream`` left after 3 chunks and ``aclose``d: charged, not released."""
    fake_provider.text = TEXT
    h = handler(budget=WORST.total_tokens)
    model = acme_stream(fake_provider)

    async def consume() -> None:
        stream = model.astream(PROMPT, config={"callbacks": [h]})
        seen = 0
        async for _chunk in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()

    await asyncio.wait_for(consume(), timeout=30)
    _assert_partial(h)
    with pytest.raises(allowance.BudgetExceeded):
        await asyncio.wait_for(model.ainvoke(PROMPT, config={"callbacks": [h]}), 30)
    assert fake_provider.generation_count == 1


async def test_an_async_stream_cancelled_is_charged_what_it_produced(
    fake_provider: FakeProvider,
) -> None:
    """A task cancelled while its stream waits for the next chunk: charged."""
    fake_provider.text = TEXT
    h = handler(budget=1_000_000)
    model = acme_stream(fake_provider, stall_after=3)
    three = asyncio.Event()

    async def consume() -> None:
        seen = 0
        async for _chunk in model.astream(PROMPT, config={"callbacks": [h]}):
            seen += 1
            if seen == 3:
                three.set()

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(three.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=30)
    _assert_partial(h)


class _Started(BaseCallbackHandler):
    """Tell when a model call has started (after the handler before it)."""

    run_inline = True

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.event.set()


async def test_an_async_call_cancelled_keeps_its_worst_case_not_its_hold(
    fake_provider: FakeProvider,
) -> None:
    """``agenerate`` cancelled: no end nor error callback; settled as the task ends.

    Whether the request went out, the handler cannot tell: the worst case
    is charged (``error``), and nothing stays reserved for the lease.
    """
    h = handler(budget=1_000_000)
    started = _Started()
    task = asyncio.ensure_future(
        acme(fake_provider).ainvoke(PROMPT, config={"callbacks": [h, started]})
    )
    await asyncio.wait_for(started.event.wait(), timeout=30)
    assert spent_reserved(guard_of(h)) == (0, WORST.total_tokens)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=30)
    await asyncio.sleep(0)  # the task's done callbacks
    (record,) = guard_of(h).ledger.calls()
    assert record.outcome == "error"
    assert spent_reserved(guard_of(h)) == (WORST.total_tokens, 0)


def test_parallel_branches_cancelled_by_asyncio_run_hold_nothing(
    fake_provider: FakeProvider,
) -> None:
    """A branch of an async RunnableParallel refused: the others hold nothing.

    ``asyncio.run`` cancels the admitted branches as the refusal leaves it;
    LangChain calls none of their callbacks. Each is settled as its task ends.
    """
    h = handler(budget=WORST.total_tokens * 5 + 1)
    model = acme(fake_provider)
    parallel = RunnableParallel({f"b{i}": model for i in range(20)})
    with pytest.raises(allowance.BudgetExceeded):
        asyncio.run(parallel.ainvoke(PROMPT, config={"callbacks": [h]}))
    outcomes = [c.outcome for c in guard_of(h).ledger.calls()]
    assert outcomes.count("blocked") == 15
    assert set(outcomes) <= {"blocked", "error", "ok"}
    (status,) = guard_of(h).status()
    assert status.reserved == 0
    assert status.spent <= WORST.total_tokens * 5


# -- a handler bound to a model inside a chain, under patch() -------------------------

MODELS: dict[str, Callable[..., BaseChatModel]] = {
    "openai": chat_openai,
    "anthropic": chat_anthropic,
    "acme": acme,
}


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "astream"])
@pytest.mark.parametrize("provider", sorted(MODELS))
async def test_a_handler_bound_inside_a_chain_wins_over_the_global_one(
    provider: str, mode: str, fake_provider: FakeProvider
) -> None:
    """``RunnableLambda | model.with_config(callbacks=[own])`` under ``patch()``.

    The call is charged to ``own`` only, and the global budget (exhausted
    here) does not block it: as when ``own`` is passed to the model directly.

    If this fails with BudgetExceeded, or a record in the global ledger: the
    global handler started the model's run before ``own`` and charged it too.
    """
    glob = allowance.patch(budget=1, ledger="memory://", adapters=["langchain"])
    try:
        own = handler(budget=1_000_000)
        chain = RunnableLambda(lambda x: x) | MODELS[provider](
            fake_provider
        ).with_config(callbacks=[own])
        if mode == "invoke":
            chain.invoke(PROMPT)
        elif mode == "ainvoke":
            await asyncio.wait_for(chain.ainvoke(PROMPT), timeout=30)
        else:

            async def consume() -> None:
                async for _chunk in chain.astream(PROMPT):
                    pass

            await asyncio.wait_for(consume(), timeout=30)
    finally:
        allowance.unpatch()
    assert fake_provider.generation_count == 1
    assert [r.outcome for r in guard_of(own).ledger.calls()] == ["ok"]
    assert glob.ledger.calls() == []


@pytest.mark.parametrize("provider", sorted(MODELS))
def test_under_patch_a_model_deep_in_a_chain_is_charged_to_the_root_run(
    provider: str, fake_provider: FakeProvider
) -> None:
    """The global handler still sees every run of the tree (``run`` = the root).

    If this fails: the global handler missed a chain start below the root
    (it is added to every run's manager by the configure hook, not inherited).
    """
    glob = allowance.patch(budget=1_000_000, ledger="memory://", adapters=["langchain"])
    root = uuid.uuid4()
    try:
        inner = RunnableLambda(lambda x: x) | MODELS[provider](fake_provider)

        def nested(text: str) -> Any:
            return inner.invoke(text)  # a child of ``outer``, two levels down

        outer = RunnableLambda(nested)
        outer.invoke(PROMPT, config={"run_id": root})
    finally:
        allowance.unpatch()
    (record,) = glob.ledger.calls()
    assert record.scope["run"] == str(root)
    assert record.scope["langchain_parent"] != str(root)


# -- a client called while a stream is consumed is charged to its own budget ---------

STREAMING: dict[str, Callable[..., BaseChatModel]] = {
    "openai": chat_openai,
    "anthropic": chat_anthropic,
    "acme": acme_stream,
}


@pytest.mark.parametrize("mode", ["stream", "astream"])
@pytest.mark.parametrize("provider", sorted(STREAMING))
async def test_a_client_called_in_a_stream_loop_is_charged_to_its_own_budget(
    provider: str, mode: str, fake_provider: FakeProvider
) -> None:
    """``for chunk in model.stream(...)``: the loop's body is not the model's call.

    A client the user wrapped with a budget too small for any call, called
    in the loop, is refused by its own budget; the handler charges only its
    model's call.

    If this fails with requests sent: the handler's route (guard, scope) was
    still in force between chunks, and the client's call was charged to the
    handler's guard (or, for a model the handler charges, to nobody).
    """
    fake_provider.text = TEXT
    h = handler(budget=1_000_000)
    model = STREAMING[provider](fake_provider)
    config: Any = {"callbacks": [h]}
    refused = 0
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 64,
    }
    if mode == "stream":
        client = allowance.wrap(
            openai.OpenAI(
                base_url=fake_provider.openai_base_url, api_key="x", max_retries=0
            ),
            budget=20,
            ledger="memory://",
        )
        for _chunk in model.stream(PROMPT, config=config):
            assert integration.current_route() is None
            assert "langchain_run" not in allowance.current_scope()
            with pytest.raises(allowance.BudgetExceeded):
                client.chat.completions.create(**body)
            refused += 1
    else:
        aclient = allowance.wrap(
            openai.AsyncOpenAI(
                base_url=fake_provider.openai_base_url, api_key="x", max_retries=0
            ),
            budget=20,
            ledger="memory://",
        )

        async def consume() -> int:
            count = 0
            async for _chunk in model.astream(PROMPT, config=config):
                assert integration.current_route() is None
                with pytest.raises(allowance.BudgetExceeded):
                    await aclient.chat.completions.create(**body)
                count += 1
            return count

        refused = await asyncio.wait_for(consume(), timeout=30)
    assert refused > 1
    assert fake_provider.generation_count == 1
    assert [r.outcome for r in guard_of(h).ledger.calls()] == ["ok"]


@pytest.mark.parametrize("mode", ["invoke", "stream"])
@pytest.mark.parametrize("provider", sorted(STREAMING))
def test_two_handlers_on_one_run_leave_no_scope_behind(
    provider: str, mode: str, fake_provider: FakeProvider
) -> None:
    """Two handlers set the same context variables; both are undone, in order.

    If this fails with a ``langchain_run`` left in the scope: the handlers
    reset what they set in the order their callbacks came (first set, first
    reset), which put the first handler's values back; a later direct SDK
    call would be attributed to that run.
    """
    first, second = handler(budget=1_000_000), handler(budget=1_000_000)
    model = STREAMING[provider](fake_provider)
    config: Any = {"callbacks": [first, second]}
    if mode == "invoke":
        model.invoke(PROMPT, config=config)
    else:
        for _chunk in model.stream(PROMPT, config=config):
            assert "langchain_run" not in allowance.current_scope()
    assert integration.current_route() is None
    assert "langchain_run" not in allowance.current_scope()
    assert fake_provider.generation_count == 1
