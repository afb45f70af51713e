"""At the limit: ``raise`` blocks before any byte is sent, ``stop`` answers in the
SDK's own types without sending, ``warn`` sends, charges and warns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anthropic
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel
from tests.sdk.conftest import (
    CLAUDE,
    GPT,
    USER,
    aw,
    drain,
    enter,
    expected_charge,
    only_record,
)

import allowance
from allowance._sdk import anthropic as anthropic_sdk
from allowance._sdk import openai as openai_sdk
from allowance.testing import FakeUsage

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

MAX = 300
TINY = {"usd": "$0.0001", "tokens": 10}  # far below any call's worst case


class Answer(BaseModel):
    a: int


@dataclass(frozen=True)
class Api:
    name: str
    sdk: str
    stream: bool
    call: Callable[[Any], Awaitable[Any]]
    """Make the call; return what the caller got (a stream is returned unread)."""
    path: str
    body: dict[str, Any]

    def worst_tokens(self) -> int:
        codec = openai_sdk.CODEC if self.sdk == "openai" else anthropic_sdk.CODEC
        return codec.estimate(self.path, self.body).total_tokens


CHAT = {"model": GPT, "messages": USER, "max_completion_tokens": MAX}
RESP = {"model": GPT, "input": "Say hello.", "max_output_tokens": MAX}
MSG = {"model": CLAUDE, "messages": USER, "max_tokens": MAX}

APIS = [
    Api(
        "chat.create",
        "openai",
        False,
        lambda c: aw(c.chat.completions.create(**CHAT)),
        "/chat/completions",
        CHAT,
    ),
    Api(
        "chat.create(stream)",
        "openai",
        True,
        lambda c: aw(c.chat.completions.create(**CHAT, stream=True)),
        "/chat/completions",
        {**CHAT, "stream": True},
    ),
    Api(
        "responses.create",
        "openai",
        False,
        lambda c: aw(c.responses.create(**RESP)),
        "/responses",
        RESP,
    ),
    Api(
        "responses.create(stream)",
        "openai",
        True,
        lambda c: aw(c.responses.create(**RESP, stream=True)),
        "/responses",
        {**RESP, "stream": True},
    ),
    Api(
        "messages.create",
        "anthropic",
        False,
        lambda c: aw(c.messages.create(**MSG)),
        "/v1/messages",
        MSG,
    ),
    Api(
        "messages.create(stream)",
        "anthropic",
        True,
        lambda c: aw(c.messages.create(**MSG, stream=True)),
        "/v1/messages",
        {**MSG, "stream": True},
    ),
]
IDS = [a.name for a in APIS]


def stop_id(result: Any) -> str:
    """Return the id a stopped answer carries."""
    if isinstance(result, ChatCompletion | ChatCompletionChunk | Response | Message):
        return result.id
    response = getattr(result, "response", None)  # Responses stream events
    if isinstance(response, Response):
        return response.id
    message = getattr(result, "message", None)  # message_start
    if isinstance(message, Message):
        return message.id
    return ""


# -- raise -----------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_raise_blocks_before_sending(
    api, kind, mode, unit, fake_provider, *, guarded
):
    """``BudgetExceeded`` names budget, key, used, limit and unit; 0 requests.

    If this fails with requests sent: the guard admitted a call it could not
    afford, or the check runs after the request.
    """
    client, guard = guarded(api.sdk, kind, mode, TINY[unit])
    with pytest.raises(allowance.BudgetExceeded) as caught:
        await api.call(client)

    (violation,) = caught.value.violations
    (status,) = guard.status()
    assert violation.budget == status.budget
    assert violation.key == status.key
    assert violation.unit == unit
    assert violation.limit == status.limit
    assert violation.used == 0
    if unit == "tokens":
        assert violation.limit == 10
        assert violation.requested == api.worst_tokens()
    assert violation.requested > violation.limit
    assert fake_provider.generation_count == 0
    assert len(fake_provider.requests) == 0
    assert (status.spent, status.reserved) == (0, 0)
    assert only_record(guard).outcome == "blocked"


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_raise_reports_what_was_already_used(api, kind, fake_provider, guarded):
    """After one charged call, the next one that does not fit names the spend.

    The token budget holds one worst case plus a little: the first call fits,
    its actual usage is charged, and the second call's worst case does not fit
    on top of it.
    """
    worst = api.worst_tokens()
    client, guard = guarded(api.sdk, kind, "wrap", worst + 5)
    first = await api.call(client)
    if api.stream:
        await drain(first)
    spent = guard.status()[0].spent
    assert 0 < spent < worst

    with pytest.raises(allowance.BudgetExceeded) as caught:
        await api.call(client)
    (violation,) = caught.value.violations
    assert violation.used == spent
    assert violation.requested == worst
    assert violation.limit == worst + 5
    assert fake_provider.generation_count == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_raise_blocks_the_stream_helpers_and_parse(kind, fake_provider, guarded):
    """``parse`` and the ``.stream()`` helpers skip ``create``; they are blocked too."""
    client, _ = guarded("openai", kind, "wrap", 10)
    claude, _ = guarded("anthropic", kind, "wrap", 10)
    attempts: list[Any] = [
        lambda: aw(client.chat.completions.parse(**CHAT, response_format=Answer)),
        lambda: aw(client.responses.parse(**RESP, text_format=Answer)),
        lambda: aw(
            client.embeddings.create(model="text-embedding-3-small", input="x" * 99)
        ),
    ]
    for attempt in attempts:
        with pytest.raises(allowance.BudgetExceeded):
            await attempt()
    managers = [
        client.chat.completions.stream(**CHAT),
        client.responses.stream(**RESP),
        claude.messages.stream(**MSG),
        claude.beta.messages.stream(**MSG),
    ]
    for manager in managers:
        with pytest.raises(allowance.BudgetExceeded):
            async with contextlib.AsyncExitStack() as stack:
                await drain(await enter(stack, manager))
    assert len(fake_provider.requests) == 0


# -- stop ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_stop_answers_in_the_sdk_types_without_sending(
    api, kind, mode, fake_provider, guarded
):
    """``on_limit="stop"``: the SDK's own type, marked ``allowance-stop``; 0 requests.

    If this fails on the type: the synthetic body does not validate as the
    SDK's model; on requests: the stop happened after sending.
    """
    client, guard = guarded(api.sdk, kind, mode, 10, on_limit="stop")
    result = await api.call(client)

    if api.stream:
        assert isinstance(
            result,
            openai.Stream
            | openai.AsyncStream
            | anthropic.Stream
            | anthropic.AsyncStream,
        )
        events = await drain(result)
        assert events
        event_type: Any = {
            "chat.create(stream)": ChatCompletionChunk,
            "responses.create(stream)": ResponseStreamEvent.__args__,  # type: ignore[attr-defined]
            "messages.create(stream)": RawMessageStreamEvent.__args__,  # type: ignore[attr-defined]
        }[api.name]
        for event in events:
            assert isinstance(event, event_type), event
        assert "allowance-stop" in stop_id(events[0])
    else:
        assert isinstance(result, ChatCompletion | Response | Message)
        assert "allowance-stop" in stop_id(result)
    assert len(fake_provider.requests) == 0
    record = only_record(guard)
    assert record.outcome == "stopped"
    assert record.call_id in stop_id(events[0] if api.stream else result)
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (0, 0)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_stop_through_parse_raw_and_helpers(kind, fake_provider, guarded):
    """``parse``, raw responses, the ``.stream()`` helpers and embeddings stop too."""
    client, _ = guarded("openai", kind, "wrap", 10, on_limit="stop")
    claude, _ = guarded("anthropic", kind, "wrap", 10, on_limit="stop")

    parsed = await aw(client.chat.completions.parse(**CHAT, response_format=Answer))
    assert "allowance-stop" in parsed.id
    assert parsed.choices[0].message.parsed is None

    raw = await aw(client.chat.completions.with_raw_response.create(**CHAT))
    completion = await aw(raw.parse())
    assert isinstance(completion, ChatCompletion)
    assert "allowance-stop" in completion.id

    response = await aw(client.responses.parse(**RESP, text_format=Answer))
    assert isinstance(response, Response)
    assert "allowance-stop" in response.id

    embedded = await aw(
        client.embeddings.create(model="text-embedding-3-small", input=["x" * 99] * 3)
    )
    assert isinstance(embedded, CreateEmbeddingResponse)
    assert [e.embedding for e in embedded.data] == [[], [], []]  # one empty per input

    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(stack, client.chat.completions.stream(**CHAT))
        await drain(stream)
        final = await aw(stream.get_final_completion())
    assert "allowance-stop" in final.id

    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(stack, client.responses.stream(**RESP))
        await drain(stream)
        final_response = await aw(stream.get_final_response())
    assert "allowance-stop" in final_response.id

    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(stack, claude.messages.stream(**MSG))
        message = await aw(stream.get_final_message())
    assert isinstance(message, Message)
    assert "allowance-stop" in message.id

    # Code that reads the first block or the final text gets "", as from
    # OpenAI's stopped completion; it raised on an empty content list.
    assert (await aw(claude.messages.create(**MSG))).content[0].text == ""
    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(stack, claude.messages.stream(**MSG))
        assert await aw(stream.get_final_text()) == ""

    assert len(fake_provider.requests) == 0


# -- warn ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_warn_sends_charges_and_warns(
    api, kind, mode, unit, fake_provider, *, guarded
):
    """``on_limit="warn"``: a ``BudgetThresholdWarning``, the call sent and charged.

    The charge is the provider's usage, even though it pushes spend past the
    limit; nothing stays reserved.
    """
    fake_provider.usage = FakeUsage(input_tokens=20, output_tokens=5)
    client, guard = guarded(api.sdk, kind, mode, TINY[unit], on_limit="warn")
    with pytest.warns(allowance.BudgetThresholdWarning, match="blocked"):
        result = await api.call(client)
    if api.stream:
        await drain(result)

    assert fake_provider.generation_count == 1
    provider = api.sdk
    model = GPT if provider == "openai" else CLAUDE
    usage = allowance.Usage(input_tokens=20, output_tokens=5)
    (status,) = guard.status()
    assert status.spent == expected_charge(unit, provider, model, usage)
    assert status.spent > 0
    assert status.reserved == 0
    record = only_record(guard)
    assert record.outcome == "warned"
    assert record.usage == usage


async def test_crossing_a_warn_threshold_warns(kind, fake_provider, guarded):
    """``threshold=0.5`` without a fallback: crossing 50% issues the warning.

    The call that finds spend past 50% still goes out; the caller is warned
    once with ``BudgetThresholdWarning``.
    """
    fake_provider.usage = FakeUsage(input_tokens=10_000, output_tokens=2_500)
    client, _ = guarded("openai", kind, "wrap", "$0.10", threshold=0.5)
    await aw(client.chat.completions.create(**CHAT))  # $0.05: at 50%
    with pytest.warns(allowance.BudgetThresholdWarning):
        await aw(client.chat.completions.create(**CHAT))
    assert fake_provider.generation_count == 2
