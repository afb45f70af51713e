"""``with_streaming_response`` read without ``.parse()``: charged what it read.

- A response closed with its body read whole (``json()``, ``text()``,
  ``read()``) is charged the usage in that body.
- A stream read raw to its end (``iter_lines()``, ``iter_bytes()``,
  ``iter_text()``, ``read()``) is charged the usage in its last events; the
  usage-only chunk allowance asks OpenAI chat for is among its lines.
- Unread, a stream cut short, or one that failed (an ``error`` event), it
  keeps its whole reservation (``unmetered``): no final usage was seen.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from tests.sdk.conftest import (
    CLAUDE,
    GPT,
    USAGE,
    USER,
    Loopback,
    as_usage,
    aw,
    drain,
    enter,
    only_record,
    take,
)

from allowance._sdk import anthropic as anthropic_sdk
from allowance._sdk import openai as openai_sdk

if TYPE_CHECKING:
    from collections.abc import Callable

    import allowance

MAX = 400
TOKENS = 1_000_000


@dataclass(frozen=True)
class Api:
    name: str
    sdk: str
    path: str
    body: dict[str, Any]
    resource: Callable[[Any], Any]

    def open(self, client: Any, **extra: Any) -> Any:
        return self.resource(client).with_streaming_response.create(
            **self.body, **extra
        )

    def worst(self) -> int:
        codec = openai_sdk.CODEC if self.sdk == "openai" else anthropic_sdk.CODEC
        return codec.estimate(self.path, self.body).total_tokens


CHAT = Api(
    "chat",
    "openai",
    "/chat/completions",
    {"model": GPT, "messages": USER, "max_completion_tokens": MAX},
    lambda c: c.chat.completions,
)
RESPONSES = Api(
    "responses",
    "openai",
    "/responses",
    {"model": GPT, "input": "Say hello.", "max_output_tokens": MAX},
    lambda c: c.responses,
)
MESSAGES = Api(
    "messages",
    "anthropic",
    "/v1/messages",
    {"model": CLAUDE, "messages": USER, "max_tokens": MAX},
    lambda c: c.messages,
)
APIS = [CHAT, RESPONSES, MESSAGES]
IDS = [a.name for a in APIS]


def held(guard: allowance.Guard) -> tuple[int, int]:
    (status,) = guard.status()
    return status.spent, status.reserved


def assert_charged_the_usage(guard: allowance.Guard) -> None:
    usage = as_usage(USAGE)
    assert held(guard) == (usage.input_tokens + usage.output_tokens, 0)
    record = only_record(guard)
    assert record.outcome == "ok"
    assert (record.usage.input_tokens, record.usage.output_tokens) == (
        usage.input_tokens,
        usage.output_tokens,
    )


async def read_lines(response: Any) -> list[str]:
    return await drain(response.iter_lines())


async def read_bytes(response: Any) -> list[str]:
    return b"".join(await drain(response.iter_bytes(7))).decode().splitlines()


async def read_text(response: Any) -> list[str]:
    return "".join(await drain(response.iter_text(5))).splitlines()


async def read_whole(response: Any) -> list[str]:
    return (await aw(response.read())).decode().splitlines()


STREAM_READS: list[Callable[[Any], Any]] = [
    read_lines,
    read_bytes,
    read_text,
    read_whole,
]


@pytest.mark.parametrize("read", ["json", "text", "read"])
@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_body_read_whole_is_charged_its_usage(
    api, read, kind, fake_provider, guarded
):
    """``with ...with_streaming_response.create() as r: r.json()``: the usage read.

    If this fails with ``unmetered``: closing the response kept the whole
    reservation although its body, with the usage, was read.
    """
    fake_provider.usage = USAGE
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    async with contextlib.AsyncExitStack() as stack:
        response = await enter(stack, api.open(client))
        await aw(getattr(response, read)())
    assert_charged_the_usage(guard)


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_body_unread_keeps_the_reservation(api, kind, fake_provider, guarded):
    """Closed unread: the usage was never seen, the whole reservation is kept."""
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    async with contextlib.AsyncExitStack() as stack:
        await enter(stack, api.open(client))
    assert held(guard) == (api.worst(), 0)
    assert only_record(guard).outcome == "unmetered"


@pytest.mark.parametrize("read", STREAM_READS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_stream_read_raw_to_its_end_is_charged_its_usage(
    api, read, kind, fake_provider, guarded
):
    """A stream read by lines, bytes, text or whole: the usage in its last events.

    If this fails with ``unmetered``: the raw read was not seen, and the
    whole reservation was kept.
    """
    fake_provider.usage = USAGE
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    async with contextlib.AsyncExitStack() as stack:
        response = await enter(stack, api.open(client, stream=True))
        lines = await read(response)
    assert any(line.startswith("data:") for line in lines)
    assert_charged_the_usage(guard)


async def test_raw_chat_stream_shows_the_usage_chunk(kind, fake_provider, guarded):
    """The usage-only chunk allowance asked for is among the raw lines (README)."""
    fake_provider.usage = USAGE
    client, _ = guarded("openai", kind, "wrap", TOKENS)
    async with contextlib.AsyncExitStack() as stack:
        response = await enter(stack, CHAT.open(client, stream=True))
        lines = await read_lines(response)
    chunks = [json.loads(line[5:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == USAGE.output_tokens


@pytest.mark.parametrize("api", APIS, ids=IDS)
async def test_stream_read_raw_halfway_keeps_the_reservation(
    api, kind, fake_provider, guarded
):
    """Two lines read, then the ``with`` exits: no usage seen, kept whole."""
    fake_provider.usage = USAGE
    client, guard = guarded(api.sdk, kind, "wrap", TOKENS)
    async with contextlib.AsyncExitStack() as stack:
        response = await enter(stack, api.open(client, stream=True))
        assert len(await take(response.iter_lines(), 2)) == 2
    assert held(guard) == (api.worst(), 0)
    assert only_record(guard).outcome == "unmetered"


FAILED_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_1","type":"message",\
"role":"assistant","model":"claude-haiku-4-5","content":[],"stop_reason":null,\
"usage":{"input_tokens":30,"output_tokens":1}}}

event: error
data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}

"""


async def test_stream_read_raw_that_failed_keeps_the_reservation(kind, guarded):
    """An Anthropic stream ended by an ``error`` event, read by lines: kept whole.

    If this fails with ``ok``: the input usage of ``message_start`` (output
    1) was charged as the stream's, though the SDK raises on that event.
    """
    loopback = Loopback(lambda _path, _body: (200, FAILED_STREAM))
    try:
        client, guard = guarded(
            "anthropic",
            kind,
            "wrap",
            TOKENS,
            client_options={"base_url": loopback.url},
        )
        async with contextlib.AsyncExitStack() as stack:
            response = await enter(stack, MESSAGES.open(client, stream=True))
            assert "event: error" in await read_lines(response)
    finally:
        loopback.stop()
    assert held(guard) == (MESSAGES.worst(), 0)
    assert only_record(guard).outcome == "unmetered"
