"""Failed, retried, cut-short and unmetered calls: charged right, nothing left held.

- HTTP errors (500, 429) release the reservation: outcome ``error``, spent 0.
- Retries inside the SDK are one call: one reservation, one charge.
- A stream cut short by the provider, or abandoned by the consumer (``break``
  then ``close()``, the helpers' ``with`` exit, or dropped and collected), is
  charged what it produced: outcome ``partial``.
- A response without usage keeps the whole reservation (``unmetered``); so does
  a timeout (``error``): the provider may have done the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anthropic
import openai
import pytest
from tests.sdk.conftest import (
    CLAUDE,
    GPT,
    USER,
    Loopback,
    aw,
    drain,
    enter,
    only_record,
    take,
)

import allowance
from allowance import prices
from allowance._ledger import SQLiteLedger
from allowance._sdk import anthropic as anthropic_sdk
from allowance._sdk import openai as openai_sdk
from allowance.testing import FakeReply, FakeUsage

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

MAX = 400
USAGE = FakeUsage(input_tokens=30, output_tokens=12)
TOKENS = 100_000


@dataclass(frozen=True)
class Api:
    name: str
    sdk: str
    path: str
    body: dict[str, Any]
    create: Callable[[Any, dict[str, Any]], Any]

    def call(self, client: Any, **extra: Any) -> Awaitable[Any]:
        return aw(self.create(client, {**self.body, **extra}))

    @property
    def estimate(self) -> allowance.Estimate:
        codec = openai_sdk.CODEC if self.sdk == "openai" else anthropic_sdk.CODEC
        return codec.estimate(self.path, self.body)

    def worst(self, unit: str) -> int:
        est = self.estimate
        if unit == "tokens":
            return est.total_tokens
        return prices.worst_case_micros(
            self.sdk, est.model, est.input_tokens, est.output_tokens
        )


CHAT = Api(
    "chat",
    "openai",
    "/chat/completions",
    {"model": GPT, "messages": USER, "max_completion_tokens": MAX},
    lambda c, body: c.chat.completions.create(**body),
)
RESPONSES = Api(
    "responses",
    "openai",
    "/responses",
    {"model": GPT, "input": "Say hello.", "max_output_tokens": MAX},
    lambda c, body: c.responses.create(**body),
)
MESSAGES = Api(
    "messages",
    "anthropic",
    "/v1/messages",
    {"model": CLAUDE, "messages": USER, "max_tokens": MAX},
    lambda c, body: c.messages.create(**body),
)
APIS = [CHAT, RESPONSES, MESSAGES]
IDS = [a.name for a in APIS]
STATUS_ERRORS = (openai.APIStatusError, anthropic.APIStatusError)
CONNECTION_ERRORS = (openai.APIConnectionError, anthropic.APIConnectionError)
TIMEOUTS = (openai.APITimeoutError, anthropic.APITimeoutError)


def held(guard: allowance.Guard) -> tuple[int, int]:
    (status,) = guard.status()
    return status.spent, status.reserved


# -- HTTP errors -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 429])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_http_error_releases_the_reservation(
    api, stream, status, kind, fake_provider, *, guarded
):
    """No retries, an error status: spent unchanged, nothing reserved, ``error``.

    If this fails with ``spent > 0``: a status error was treated like a
    timeout (charged in full) instead of released.
    """
    client, guard = guarded(api.sdk, kind, "wrap", "$5")
    fake_provider.enqueue(FakeReply(status=status))
    with pytest.raises(STATUS_ERRORS) as caught:
        await api.call(client, stream=stream)
    assert getattr(caught.value, "status_code", None) == status
    assert held(guard) == (0, 0)
    record = only_record(guard)
    assert record.outcome == "error"
    assert record.cost_micros == 0
    assert fake_provider.generation_count == 1


@pytest.mark.parametrize("api", [CHAT, MESSAGES], ids=["chat", "messages"])
async def test_retries_inside_the_sdk_are_one_call(api, kind, fake_provider, guarded):
    """Two 500s then a success with ``max_retries=2``: 3 requests, ONE charge.

    If this fails with 3 records or 3x the charge: the guard sits outside the
    SDK's retry loop and charges each attempt.
    """
    client, guard = guarded(
        api.sdk, kind, "wrap", TOKENS, client_options={"max_retries": 2}
    )
    fake_provider.enqueue(
        FakeReply(status=500), FakeReply(status=500), FakeReply(usage=USAGE)
    )
    await api.call(client)
    assert fake_provider.generation_count == 3
    assert held(guard) == (USAGE.total_tokens, 0)
    record = only_record(guard)
    assert record.outcome == "ok"


# -- streams cut short -----------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_truncated_stream_is_charged_what_it_produced(
    api, kind, fake_provider, guarded
):
    """The provider closes the stream after 2 content events, without usage.

    The consumer gets the SDK's error or an early end; the guard commits a
    partial charge (more than 0, at most the worst case), nothing stays held.
    """
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    fake_provider.enqueue(FakeReply(truncate_after=2, usage=USAGE))
    stream = await api.call(client, stream=True)
    events: list[Any] = []
    failure: BaseException | None = None
    try:
        events = await drain(stream)
    except Exception as err:  # checked below
        failure = err
    if failure is None:  # an early end
        assert len(events) < 8
    else:  # the SDK's error, or httpx's where the SDK passes it on
        assert isinstance(failure, CONNECTION_ERRORS) or (
            type(failure).__name__ == "RemoteProtocolError"
        )
    spent, reserved = held(guard)
    assert reserved == 0
    assert 0 < spent <= api.worst("tokens")
    record = only_record(guard)
    assert record.outcome == "partial"
    assert record.usage.output_tokens > 0


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_abandoned_stream_closed_is_charged_partially(
    api, kind, fake_provider, guarded
):
    """``break`` after 2 events, then ``stream.close()``: partial, nothing held.

    If this fails with a reservation held: ``close()`` does not settle the
    ticket, and the budget stays blocked until garbage collection.
    """
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    fake_provider.usage = USAGE
    stream = await api.call(client, stream=True)
    assert len(await take(stream, 2)) == 2
    await aw(stream.close())
    spent, reserved = held(guard)
    assert reserved == 0
    assert 0 < spent <= api.worst("tokens")
    assert only_record(guard).outcome == "partial"


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_abandoned_stream_context_manager_exit_settles(
    api, kind, fake_provider, guarded
):
    """``with client....create(stream=True) as s: break``: settled on exit."""
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    fake_provider.usage = USAGE
    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(stack, await api.call(client, stream=True))
        await take(stream, 2)
    assert held(guard)[1] == 0
    assert only_record(guard).outcome == "partial"


HELPERS: dict[str, tuple[str, Any]] = {
    "chat.stream()": (
        "openai",
        lambda c: c.chat.completions.stream(
            model=GPT, messages=USER, max_completion_tokens=MAX
        ),
    ),
    "responses.stream()": (
        "openai",
        lambda c: c.responses.stream(model=GPT, input="Hi.", max_output_tokens=MAX),
    ),
    "messages.stream()": (
        "anthropic",
        lambda c: c.messages.stream(model=CLAUDE, messages=USER, max_tokens=MAX),
    ),
}


@pytest.mark.parametrize("helper", list(HELPERS))
async def test_abandoned_stream_helper_settles_on_exit(
    helper, kind, fake_provider, guarded
):
    """``with client....stream() as s: break``: partial charge when the block exits.

    The helpers close the HTTP response themselves (``stream.response.close()``
    for openai), not the stream object the guard returned. Stricter reading:
    the reservation must not wait for garbage collection.
    """
    sdk, open_helper = HELPERS[helper]
    client, guard = guarded(sdk, kind, "wrap", TOKENS)
    fake_provider.usage = USAGE
    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(stack, open_helper(client))
        assert len(await take(stream, 2)) == 2
    # ``stream`` is still referenced here: no garbage collection has settled it.
    assert stream is not None
    spent, reserved = held(guard)
    assert reserved == 0
    assert spent > 0
    assert only_record(guard).outcome == "partial"


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_dropped_stream_is_settled_when_collected(
    api, kind, fake_provider, guarded
):
    """A stream read halfway and dropped, never closed: partial at collection."""
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    fake_provider.usage = USAGE

    async def read_two_and_drop() -> None:
        stream = await api.call(client, stream=True)
        assert len(await take(stream, 2)) == 2
        assert held(guard)[1] > 0

    await read_two_and_drop()
    gc.collect()
    assert held(guard)[1] == 0
    assert only_record(guard).outcome == "partial"


# -- no usage, timeouts ----------------------------------------------------------------


@pytest.mark.parametrize("unit", ["usd", "tokens"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_response_without_usage_is_charged_the_whole_reservation(
    api, stream, unit, kind, fake_provider, *, guarded
):
    """No usage in the answer: the worst case that was reserved is charged.

    If this fails with ``spent == 0``: a missing usage was read as zero usage,
    which would make every unmetered call free.
    """
    budget = "$5" if unit == "usd" else TOKENS
    client, guard = guarded(api.sdk, kind, "wrap", budget)
    fake_provider.enqueue(FakeReply(omit_usage=True))
    result = await api.call(client, stream=stream)
    if stream:
        await drain(result)
    assert held(guard) == (api.worst(unit), 0)
    record = only_record(guard)
    assert record.outcome == "unmetered"


class _UsageServer:
    """A provider on 127.0.0.1 that answers chat and messages with a usage given.

    (``FakeUsage`` accepts only counts: this is a server of its own.)
    """

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}
        self.server = Loopback(self.answer)
        self.url = self.server.url

    def answer(self, path: str, _: bytes) -> tuple[int, bytes]:
        return 200, json.dumps(self.body(path)).encode()

    def body(self, path: str) -> dict[str, Any]:
        if path == "/v1/chat/completions":
            return {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": GPT,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": self.usage,
            }
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": CLAUDE,
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self.usage,
        }

    def base_url(self, api: Api, counts: tuple[object, object]) -> str:
        """Answer ``api``'s calls with ``counts`` (input, output; None: absent)."""
        names = ("prompt_tokens", "completion_tokens")
        if api.sdk == "anthropic":
            names = ("input_tokens", "output_tokens")
        pairs = zip(names, counts, strict=True)
        self.usage = {name: count for name, count in pairs if count is not None}
        return self.url + ("/v1" if api.sdk == "openai" else "")

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def usage_server() -> Iterator[_UsageServer]:
    server = _UsageServer()
    yield server
    server.stop()


@pytest.mark.parametrize("ledger", ["memory://", "sqlite"])
@pytest.mark.parametrize("unit", ["usd", "tokens"])
@pytest.mark.parametrize("api", [CHAT, MESSAGES], ids=["chat", "messages"])
async def test_a_negative_token_count_is_charged_the_whole_reservation(
    api, unit, ledger, kind, *, usage_server, tmp_path, caplog, guarded
):
    """A provider reporting a negative count: the worst case, not a credit.

    Charged as it is, ``input_tokens=-100000`` would lower the budget's
    counter and let later calls spend past the limit. The memory ledger's
    calls take the express lane, SQLite's the general path.
    """
    budget = "$5" if unit == "usd" else TOKENS
    url = ledger if ledger != "sqlite" else f"sqlite:///{tmp_path / 'neg.db'}"
    base = usage_server.base_url(api, (-100_000, 5))
    client, guard = guarded(
        api.sdk, kind, "wrap", budget, ledger=url, client_options={"base_url": base}
    )
    with caplog.at_level("WARNING", logger="allowance"):
        for _ in range(2):  # the first opens the ledger (the general path)
            await api.call(client)
    assert held(guard) == (2 * api.worst(unit), 0)
    assert [r.outcome for r in guard.ledger.calls()] == ["unmetered"] * 2
    assert caplog.text.count("negative token count") == 2
    guard.close()


@pytest.mark.parametrize(
    "counts",
    [(None, None), (None, 5), (12, None), ("12", "5"), (12.5, 5), (True, 5)],
    ids=["empty", "no input", "no output", "text", "a fraction", "a bool"],
)
@pytest.mark.parametrize("api", [CHAT, MESSAGES], ids=["chat", "messages"])
async def test_a_usage_that_cannot_be_read_is_charged_the_whole_reservation(
    api, counts, kind, *, usage_server, guarded
):
    """A usage object whose input or output count is missing, null or not a
    count is charged as a missing usage (it counted 0 before: a free call)."""
    base = usage_server.base_url(api, counts)
    client, guard = guarded(
        api.sdk, kind, "wrap", TOKENS, client_options={"base_url": base}
    )
    for _ in range(2):  # the general path, then the express lane
        await api.call(client)
    assert held(guard) == (2 * api.worst("tokens"), 0)
    assert [r.outcome for r in guard.ledger.calls()] == ["unmetered"] * 2


@pytest.mark.parametrize("api", [CHAT, MESSAGES], ids=["chat", "messages"])
async def test_a_count_sent_as_a_whole_float_is_read(
    api, kind, *, usage_server, guarded
):
    """``12.0`` (an OpenAI-compatible server's JSON) is 12 tokens."""
    base = usage_server.base_url(api, (12.0, 5.0))
    client, guard = guarded(
        api.sdk, kind, "wrap", TOKENS, client_options={"base_url": base}
    )
    for _ in range(2):
        await api.call(client)
    assert held(guard) == (2 * 17, 0)
    records = [(r.outcome, r.usage.total_tokens) for r in guard.ledger.calls()]
    assert records == [("ok", 17)] * 2


@pytest.mark.parametrize(
    "how", ["commit", "acommit", "commit_partial", "acommit_partial"]
)
async def test_a_ticket_does_not_take_a_negative_usage_as_a_credit(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``Ticket.commit`` and its twins, as an integration calls them."""
    guard = allowance.Guard(budget=1_000, ledger="memory://")
    estimate = allowance.Estimate("openai", GPT, 100, 50)
    with caplog.at_level("WARNING", logger="allowance"):
        ticket = guard.begin(estimate)
        await aw(getattr(ticket, how)(allowance.Usage(-500, 10)))
    assert held(guard) == (estimate.total_tokens, 0)
    assert only_record(guard).outcome == "unmetered"
    assert "negative token count" in caplog.text


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_timeout_is_charged_in_full(api, kind, fake_provider, guarded):
    """A 0.05 s client timeout on a 0.5 s answer: worst case kept, ``error``."""
    client, guard = guarded(
        api.sdk, kind, "wrap", TOKENS, client_options={"timeout": 0.05}
    )
    fake_provider.enqueue(FakeReply(latency=0.5))
    with pytest.raises(TIMEOUTS):
        await api.call(client)
    assert held(guard) == (api.worst("tokens"), 0)
    record = only_record(guard)
    assert record.outcome == "error"
    assert fake_provider.generation_count == 1


# An attempt the provider may have billed, which the SDK retries: a read that
# timed out once sent, and a connection dropped after the request arrived
# (no answer: the SDK raises httpx's RemoteProtocolError, and retries).
MAYBE_BILLED = {"timeout": FakeReply(latency=3), "dropped": FakeReply(truncate_after=0)}


@pytest.mark.parametrize("failure", MAYBE_BILLED)
@pytest.mark.parametrize("mode", ["wrap", "patch"])
@pytest.mark.parametrize("api", [CHAT, MESSAGES], ids=["chat", "messages"])
async def test_an_attempt_that_may_be_billed_before_a_retry_is_charged(  # noqa: PLR0917 - fixtures
    api, mode, failure, kind, fake_provider, guarded
):
    """A timeout or a dropped connection, then the SDK's retry answers.

    Two charges: the failed attempt may have been billed, so its worst case
    is kept as a call of its own (``error``); the answer is charged its
    usage. (A dropped attempt was charged nothing before: only timeouts
    were.)

    If this fails with only the answer charged: the SDK's retries inside
    ``request`` hide the failed attempt (``_sleep_for_retry`` hook).
    """
    client, guard = guarded(
        api.sdk,
        kind,
        mode,
        TOKENS,
        client_options={"timeout": 0.5, "max_retries": 1},
    )
    fake_provider.enqueue(MAYBE_BILLED[failure], FakeReply(usage=USAGE))
    await api.call(client)
    assert fake_provider.generation_count == 2
    assert held(guard) == (api.worst("tokens") + USAGE.total_tokens, 0)
    calls = guard.ledger.calls()
    assert sorted(c.outcome for c in calls) == ["error", "ok"]
    (timed_out,) = (c for c in calls if c.outcome == "error")
    assert timed_out.estimate_tokens == api.worst("tokens")


@pytest.mark.parametrize("failure", MAYBE_BILLED)
@pytest.mark.parametrize("api", [CHAT, MESSAGES], ids=["chat", "messages"])
async def test_a_retry_the_budget_cannot_hold_is_not_sent(
    api, failure, kind, fake_provider, guarded
):
    """The budget holds one worst case: the attempt that failed keeps it.

    The retry would need a second: ``BudgetExceeded``, and it is not sent.
    """
    worst = api.worst("tokens")
    client, guard = guarded(
        api.sdk,
        kind,
        "wrap",
        worst + worst // 2,
        client_options={"timeout": 0.5, "max_retries": 2},
    )
    fake_provider.enqueue(MAYBE_BILLED[failure], FakeReply(usage=USAGE))
    with pytest.raises(allowance.BudgetExceeded):
        await api.call(client)
    assert fake_provider.generation_count == 1
    assert held(guard) == (worst, 0)
    assert sorted(c.outcome for c in guard.ledger.calls()) == ["blocked", "error"]


async def test_a_call_cancelled_between_its_reserve_and_its_send_keeps_nothing(
    tmp_path, fake_provider, clients
):
    """Cancelled while the guard claims a threshold's marker (a busy file).

    The reservation is made, nothing is sent yet: it is released (``error``),
    not left held until its lease ends.
    """
    claiming = threading.Event()

    class SlowClaim(SQLiteLedger):
        def claim(self, marker: str) -> bool:
            claiming.set()
            time.sleep(0.3)
            return super().claim(marker)

    client = clients("openai", "async")
    budget = allowance.Budget(
        TOKENS, per="session", thresholds=[allowance.Threshold(0.0001, "warn")]
    )
    allowance.wrap(client, budget, ledger=SlowClaim(tmp_path / "ledger.db"))
    guard = client.allowance.guard
    fake_provider.enqueue(FakeReply(usage=USAGE))
    await client.chat.completions.create(**CHAT.body)  # past the threshold
    task = asyncio.ensure_future(client.chat.completions.create(**CHAT.body))
    await asyncio.to_thread(claiming.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the release runs on the ledger's worker
        if held(guard)[1] == 0:
            break
        await asyncio.sleep(0.01)
    assert held(guard) == (USAGE.total_tokens, 0)
    assert fake_provider.generation_count == 1
    assert [c.outcome for c in guard.ledger.calls()] == ["ok", "error"]
    guard.close()


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_a_connection_dropped_before_the_answer_is_charged_in_full(
    api, kind, fake_provider, guarded
):
    """The request was sent, the connection closed without an answer.

    The provider may have done the work: the worst case is kept (``error``).
    If this fails with ``(0, 0)``: every connection error was released.
    """
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    fake_provider.enqueue(FakeReply(truncate_after=0))
    with pytest.raises(CONNECTION_ERRORS):
        await api.call(client)
    assert fake_provider.generation_count == 1
    assert held(guard) == (api.worst("tokens"), 0)
    assert only_record(guard).outcome == "error"


@pytest.mark.parametrize("api", [CHAT, MESSAGES], ids=["chat", "messages"])
async def test_connection_refused_releases(api, kind, clients):
    """Nothing listening: a connection never made releases the reservation."""
    client = clients(api.sdk, kind, base_url="http://127.0.0.1:9/v1")
    allowance.wrap(client, TOKENS, ledger="memory://")
    with pytest.raises(CONNECTION_ERRORS):
        await api.call(client)
    guard = client.allowance.guard
    assert held(guard) == (0, 0)
    assert only_record(guard).outcome == "error"


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_stream_read_on_after_a_break_is_whole_and_charged_once(
    api, kind, fake_provider, guarded
):
    """``for e in stream: break`` then reading on: every event, the full usage.

    The SDK's streams can be resumed after a ``break``; the guarded one must
    not end there (nor charge a partial stream that the caller finishes).
    """
    fake_provider.usage = USAGE
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    stream = await api.call(client, stream=True)
    first = await take(stream, 1)
    rest = await drain(stream)
    # The fake sends 5 words: more events than that reach the caller in all.
    assert len(first) == 1
    assert len(rest) > 5
    assert fake_provider.generation_count == 1
    assert held(guard) == (USAGE.total_tokens, 0)
    assert only_record(guard).outcome == "ok"


# -- raw responses of streams ----------------------------------------------------------


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_streaming_response_of_a_stream_exited_unread_is_charged_in_full(
    sdk, kind, fake_provider, guarded
):
    """``with ...with_streaming_response.create(stream=True): pass``: settled on exit.

    Nothing was read, so the usage is unknown: the whole reservation is kept
    (``unmetered``), as for ``with_streaming_response`` without a stream.
    """
    client, guard = guarded(sdk, kind, "wrap", TOKENS)
    api = CHAT if sdk == "openai" else MESSAGES
    resource = (
        client.chat.completions if sdk == "openai" else client.messages
    ).with_streaming_response
    async with contextlib.AsyncExitStack() as stack:
        await enter(stack, resource.create(**api.body, stream=True))
    assert held(guard) == (api.worst("tokens"), 0)
    assert only_record(guard).outcome == "unmetered"


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_streaming_response_of_a_stream_read_halfway_is_partial_on_exit(
    sdk, kind, fake_provider, guarded
):
    """Parsed, 2 events read, then the ``with`` block exits: a partial charge."""
    fake_provider.usage = USAGE
    client, guard = guarded(sdk, kind, "wrap", TOKENS)
    api = CHAT if sdk == "openai" else MESSAGES
    resource = (
        client.chat.completions if sdk == "openai" else client.messages
    ).with_streaming_response
    async with contextlib.AsyncExitStack() as stack:
        response = await enter(stack, resource.create(**api.body, stream=True))
        stream = await aw(response.parse())
        assert len(await take(stream, 2)) == 2
    spent, reserved = held(guard)
    assert reserved == 0
    assert 0 < spent < api.worst("tokens")
    assert only_record(guard).outcome == "partial"


async def test_raw_response_of_a_stream_dropped_unread_is_settled(
    kind, fake_provider, guarded
):
    """``with_raw_response.create(stream=True)`` dropped without ``parse()``.

    If this fails with a reservation held: nothing settles an unread raw
    stream, and the budget stays blocked until the lease expires.
    """
    client, guard = guarded("openai", kind, "wrap", TOKENS)

    async def open_and_drop() -> None:
        raw = await aw(
            client.chat.completions.with_raw_response.create(**CHAT.body, stream=True)
        )
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert held(guard)[1] > 0

    await open_and_drop()
    gc.collect()
    assert held(guard) == (CHAT.worst("tokens"), 0)
    assert only_record(guard).outcome == "unmetered"
