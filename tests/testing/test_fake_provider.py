"""The fake provider, driven by the real openai and anthropic SDKs over loopback."""

from __future__ import annotations

import asyncio
import base64
import http.client
import importlib
import importlib.util
import json
import math
import os
import socket
import struct
import time

import anthropic
import openai
import pytest
from pydantic import BaseModel

from allowance import ConfigurationError, UsageError
from allowance.testing import FakeProvider, FakeReply, FakeRequest, FakeUsage

MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
USER = [{"role": "user", "content": "Say hello."}]
DEFAULT_WORDS = 5  # "Hello from the fake provider."
CACHED = FakeUsage(
    input_tokens=100,
    output_tokens=40,
    cached_tokens=30,
    cache_write_tokens=20,
    reasoning_tokens=10,
)


class Answer(BaseModel):
    a: int


# openai 3.x wraps a connection cut mid-stream in APIConnectionError; openai 2.x
# lets httpx's own RemoteProtocolError through.
CUT_SHORT: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,
    *(
        importlib.import_module(name).RemoteProtocolError
        for name in ("httpx", "httpx2")
        if importlib.util.find_spec(name) is not None
    ),
)


def assert_chat_usage(usage, expected: FakeUsage) -> None:
    assert usage.prompt_tokens == expected.input_tokens
    assert usage.completion_tokens == expected.output_tokens
    assert usage.total_tokens == expected.input_tokens + expected.output_tokens
    assert usage.prompt_tokens_details.cached_tokens == expected.cached_tokens
    details = usage.completion_tokens_details
    assert details.reasoning_tokens == expected.reasoning_tokens


def assert_responses_usage(usage, expected: FakeUsage) -> None:
    assert usage.input_tokens == expected.input_tokens
    assert usage.input_tokens_details.cached_tokens == expected.cached_tokens
    assert usage.output_tokens == expected.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == expected.reasoning_tokens
    assert usage.total_tokens == expected.input_tokens + expected.output_tokens


def assert_anthropic_usage(usage, expected: FakeUsage) -> None:
    # Anthropic's input_tokens excludes cache reads and writes.
    uncached = (
        expected.input_tokens - expected.cached_tokens - expected.cache_write_tokens
    )
    assert usage.input_tokens == uncached
    assert usage.cache_read_input_tokens == expected.cached_tokens
    assert usage.cache_creation_input_tokens == expected.cache_write_tokens
    assert usage.output_tokens == expected.output_tokens


# -- OpenAI Chat Completions -----------------------------------------------------------


def test_chat_create_default_usage_follows_the_documented_rule(
    fake_provider, openai_client
):
    text = "x" * 41  # ceil(41 / 4) == 11 tokens
    result = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}]
    )
    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert result.model == MODEL
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == "Hello from the fake provider."
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens == 11
    assert result.usage.completion_tokens == DEFAULT_WORDS
    assert fake_provider.last_request.input_tokens == 11


def test_chat_create_reports_the_given_usage(fake_provider, openai_client):
    fake_provider.usage = CACHED
    result = openai_client.chat.completions.create(model=MODEL, messages=USER)
    assert_chat_usage(result.usage, CACHED)


def test_chat_max_tokens_cuts_the_text(openai_client):
    result = openai_client.chat.completions.create(
        model=MODEL, messages=USER, max_completion_tokens=2
    )
    assert result.choices[0].message.content == "Hello from"
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 2


async def test_chat_create_async(fake_provider, async_openai_client):
    fake_provider.enqueue(FakeReply(usage=CACHED, text="async text", model="other"))
    result = await async_openai_client.chat.completions.create(
        model=MODEL, messages=USER
    )
    assert result.choices[0].message.content == "async text"
    assert result.model == "other"
    assert_chat_usage(result.usage, CACHED)


def test_chat_stream_with_include_usage(fake_provider, openai_client):
    fake_provider.usage = CACHED
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    words = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert "".join(words) == "Hello from the fake provider."
    assert len(words) == DEFAULT_WORDS
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert_chat_usage(chunks[-1].usage, CACHED)
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)


async def test_chat_stream_without_include_usage_has_no_usage(async_openai_client):
    stream = await async_openai_client.chat.completions.create(
        model=MODEL, messages=USER, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert all(c.choices for c in chunks)
    # Default usage: one chunk per output token.
    assert len(chunks) == DEFAULT_WORDS + 2


def test_chat_parse_with_a_pydantic_response_format(fake_provider, openai_client):
    fake_provider.enqueue(FakeReply(text='{"a": 1}'))
    result = openai_client.chat.completions.parse(
        model=MODEL, messages=USER, response_format=Answer
    )
    assert result.choices[0].message.parsed == Answer(a=1)
    assert fake_provider.last_request.json["response_format"]["type"] == "json_schema"


def test_chat_stream_helper(fake_provider, openai_client):
    fake_provider.usage = CACHED
    with openai_client.chat.completions.stream(
        model=MODEL, messages=USER, stream_options={"include_usage": True}
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta" and e.delta]
        final = stream.get_final_completion()
    assert len(deltas) == DEFAULT_WORDS
    assert final.choices[0].message.content == "Hello from the fake provider."
    assert_chat_usage(final.usage, CACHED)


async def test_chat_stream_helper_async(fake_provider, async_openai_client):
    fake_provider.enqueue(FakeReply(text='{"a": 2}'))
    async with async_openai_client.chat.completions.stream(
        model=MODEL, messages=USER, response_format=Answer
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.parsed == Answer(a=2)


def test_chat_tool_calls(fake_provider, openai_client):
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object"}},
        }
    ]
    fake_provider.enqueue(
        FakeReply(tool_calls=[("lookup", '{"q": "x"}')]),
        FakeReply(tool_calls=[("lookup", '{"q": "y"}')]),
    )
    result = openai_client.chat.completions.create(
        model=MODEL, messages=USER, tools=tools
    )
    call = result.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("lookup", '{"q": "x"}')
    assert result.choices[0].message.content is None
    assert result.choices[0].finish_reason == "tool_calls"
    with openai_client.chat.completions.stream(
        model=MODEL, messages=USER, tools=tools
    ) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("lookup", '{"q": "y"}')


# -- OpenAI Responses ------------------------------------------------------------------


def test_responses_create(fake_provider, openai_client):
    fake_provider.usage = CACHED
    result = openai_client.responses.create(model=MODEL, input="Say hello.")
    assert result.id.startswith("resp_")
    assert result.object == "response"
    assert result.status == "completed"
    assert result.output[0].type == "message"
    assert result.output_text == "Hello from the fake provider."
    assert_responses_usage(result.usage, CACHED)


def test_responses_max_output_tokens_gives_incomplete(openai_client):
    result = openai_client.responses.create(
        model=MODEL, input="Say hello.", max_output_tokens=3
    )
    assert result.status == "incomplete"
    assert result.incomplete_details.reason == "max_output_tokens"
    assert result.output_text == "Hello from the"
    assert result.usage.output_tokens == 3


def test_responses_create_stream_events(fake_provider, openai_client):
    fake_provider.usage = CACHED
    stream = openai_client.responses.create(model=MODEL, input="Hi", stream=True)
    with stream:
        events = list(stream)
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == DEFAULT_WORDS
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))
    assert_responses_usage(events[-1].response.usage, CACHED)


async def test_responses_stream_helper(fake_provider, async_openai_client):
    fake_provider.usage = CACHED
    async with async_openai_client.responses.stream(model=MODEL, input="Hi") as stream:
        text = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(text) == final.output_text == "Hello from the fake provider."
    assert_responses_usage(final.usage, CACHED)


def test_responses_parse(fake_provider, openai_client):
    fake_provider.enqueue(FakeReply(text='{"a": 3}'), FakeReply(text='{"a": 4}'))
    result = openai_client.responses.parse(model=MODEL, input="Hi", text_format=Answer)
    assert result.output_parsed == Answer(a=3)
    with openai_client.responses.stream(
        model=MODEL, input="Hi", text_format=Answer
    ) as stream:
        assert stream.get_final_response().output_parsed == Answer(a=4)


def test_responses_tool_calls(fake_provider, openai_client):
    fake_provider.enqueue(
        FakeReply(text="Looking.", tool_calls=[("lookup", '{"q": 1}')]),
        FakeReply(tool_calls=[("lookup", '{"q": 2}')]),
    )
    result = openai_client.responses.create(model=MODEL, input="Hi")
    assert [item.type for item in result.output] == ["message", "function_call"]
    assert result.output[1].arguments == '{"q": 1}'
    with openai_client.responses.stream(model=MODEL, input="Hi") as stream:
        final = stream.get_final_response()
    assert [(i.type, i.name, i.arguments) for i in final.output] == [
        ("function_call", "lookup", '{"q": 2}')
    ]


def test_responses_input_tokens(fake_provider, openai_client):
    result = openai_client.responses.input_tokens.count(model=MODEL, input="x" * 8)
    assert result.input_tokens == 2
    assert fake_provider.generation_count == 0


# -- Anthropic Messages ----------------------------------------------------------------


def test_messages_create(fake_provider, anthropic_client):
    fake_provider.usage = CACHED
    result = anthropic_client.messages.create(
        model=CLAUDE, max_tokens=100, messages=USER
    )
    assert result.id.startswith("msg_")
    assert result.type == "message"
    assert result.role == "assistant"
    assert result.model == CLAUDE
    assert result.content[0].text == "Hello from the fake provider."
    assert result.stop_reason == "end_turn"
    assert_anthropic_usage(result.usage, CACHED)
    assert (result.usage.input_tokens, result.usage.cache_read_input_tokens) == (50, 30)


async def test_messages_create_async_max_tokens(async_anthropic_client):
    result = await async_anthropic_client.messages.create(
        model=CLAUDE, max_tokens=1, messages=USER, system="Be brief."
    )
    assert result.content[0].text == "Hello"
    assert result.stop_reason == "max_tokens"
    # "Say hello." + "Be brief." = 19 bytes -> 5 tokens; no cache.
    assert (result.usage.input_tokens, result.usage.output_tokens) == (5, 1)


def test_messages_create_stream_true(fake_provider, anthropic_client):
    fake_provider.usage = CACHED
    stream = anthropic_client.messages.create(
        model=CLAUDE, max_tokens=100, messages=USER, stream=True
    )
    with stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert types.count("content_block_delta") == DEFAULT_WORDS
    start_usage = events[0].message.usage
    assert start_usage.output_tokens == 1
    assert start_usage.input_tokens == 50
    assert_anthropic_usage(events[-2].usage, CACHED)
    assert events[-2].delta.stop_reason == "end_turn"


def test_messages_stream_helper(fake_provider, anthropic_client):
    fake_provider.usage = CACHED
    with anthropic_client.messages.stream(
        model=CLAUDE, max_tokens=100, messages=USER
    ) as stream:
        text = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(text) == final.content[0].text == "Hello from the fake provider."
    assert_anthropic_usage(final.usage, CACHED)


async def test_messages_stream_helper_async(fake_provider, async_anthropic_client):
    fake_provider.enqueue(FakeReply(usage=CACHED, text="one two three"))
    async with async_anthropic_client.messages.stream(
        model=CLAUDE, max_tokens=100, messages=USER
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "one two three"
    assert_anthropic_usage(final.usage, CACHED)


def test_beta_messages(fake_provider, anthropic_client):
    fake_provider.usage = CACHED
    result = anthropic_client.beta.messages.create(
        model=CLAUDE, max_tokens=100, messages=USER, betas=["some-beta-2025-01-01"]
    )
    assert type(result.usage).__name__ == "BetaUsage"
    assert_anthropic_usage(result.usage, CACHED)
    with anthropic_client.beta.messages.stream(
        model=CLAUDE, max_tokens=100, messages=USER
    ) as stream:
        assert_anthropic_usage(stream.get_final_message().usage, CACHED)
    assert fake_provider.count("/messages") == 2
    assert fake_provider.requests[0].headers["anthropic-beta"] == "some-beta-2025-01-01"


def test_messages_tool_use(fake_provider, anthropic_client):
    fake_provider.enqueue(
        FakeReply(tool_calls=[("lookup", '{"q": "x"}')]),
        FakeReply(text="Let me look.", tool_calls=[("lookup", '{"q": "y"}')]),
    )
    result = anthropic_client.messages.create(
        model=CLAUDE, max_tokens=100, messages=USER
    )
    assert result.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in result.content] == [
        ("tool_use", "lookup", {"q": "x"})
    ]
    with anthropic_client.messages.stream(
        model=CLAUDE, max_tokens=100, messages=USER
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"q": "y"}


def test_count_tokens(fake_provider, anthropic_client):
    result = anthropic_client.messages.count_tokens(
        model=CLAUDE, messages=[{"role": "user", "content": "y" * 9}]
    )
    assert result.input_tokens == 3
    fake_provider.usage = CACHED
    result = anthropic_client.messages.count_tokens(model=CLAUDE, messages=USER)
    assert result.input_tokens == CACHED.input_tokens
    assert fake_provider.count("/count_tokens") == 2
    assert fake_provider.generation_count == 0


# -- Other endpoints -------------------------------------------------------------------


def test_models_list(openai_client, anthropic_client):
    assert MODEL in [m.id for m in openai_client.models.list()]
    assert CLAUDE in [m.id for m in anthropic_client.models.list()]
    assert anthropic_client.models.retrieve(CLAUDE).id == CLAUDE


def test_embeddings_are_deterministic(fake_provider, openai_client):
    first = openai_client.embeddings.create(model="text-embedding-3-small", input="a")
    again = openai_client.embeddings.create(
        model="text-embedding-3-small", input=["a", "bb"], encoding_format="float"
    )
    assert len(first.data[0].embedding) == 8
    assert first.data[0].embedding == again.data[0].embedding
    assert again.data[0].embedding != again.data[1].embedding
    assert all(-1 <= x < 1 for x in again.data[1].embedding)
    assert again.usage.prompt_tokens == again.usage.total_tokens == 2
    # The SDK asks for base64 unless told otherwise.
    assert fake_provider.requests[0].json["encoding_format"] == "base64"


def test_embeddings_token_arrays_and_dimensions(openai_client):
    result = openai_client.embeddings.create(
        model="m", input=[[1, 2, 3], [4]], dimensions=16, encoding_format="base64"
    )
    raw = base64.b64decode(result.data[1].embedding)
    assert len(struct.unpack("<16f", raw)) == 16
    assert result.usage.prompt_tokens == 4


def test_raw_responses(fake_provider, openai_client, anthropic_client):
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL, messages=USER
    )
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["x-request-id"]
    assert raw.parse().choices[0].message.content == "Hello from the fake provider."
    raw = anthropic_client.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=10, messages=USER
    )
    assert raw.parse().usage.output_tokens == DEFAULT_WORDS
    assert fake_provider.generation_count == 2


def test_unknown_route_is_a_json_404(openai_client, anthropic_client):
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.get("/nowhere", cast_to=object)
    assert "no route" in caught.value.body["message"]
    with pytest.raises(anthropic.NotFoundError) as caught:
        anthropic_client.get("/v1/nowhere", cast_to=object)
    assert caught.value.body["error"]["type"] == "not_found_error"


# -- Errors, truncation, omitted usage, latency ----------------------------------------


def test_500_without_retries_is_counted_once(fake_provider, openai_client):
    fake_provider.enqueue(FakeReply(status=500))
    with pytest.raises(openai.InternalServerError) as caught:
        openai_client.chat.completions.create(model=MODEL, messages=USER)
    assert caught.value.body["type"] == "server_error"
    assert fake_provider.count("/chat/completions") == 1


def test_500_with_two_retries_is_counted_three_times(fake_provider, openai_client):
    fake_provider.enqueue(*[FakeReply(status=500)] * 3)
    client = openai_client.with_options(max_retries=2)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=USER)
    assert fake_provider.generation_count == 3


def test_a_retry_after_a_500_succeeds(fake_provider, anthropic_client):
    fake_provider.enqueue(FakeReply(status=500))
    client = anthropic_client.with_options(max_retries=1)
    result = client.messages.create(model=CLAUDE, max_tokens=10, messages=USER)
    assert result.content[0].text == "Hello from the fake provider."
    assert fake_provider.count("/messages") == 2


def test_429_and_400(fake_provider, openai_client, anthropic_client):
    fake_provider.enqueue(
        FakeReply(status=429), FakeReply(status=429), FakeReply(status=400)
    )
    with pytest.raises(openai.RateLimitError) as caught:
        openai_client.responses.create(model=MODEL, input="Hi")
    assert caught.value.response.headers["retry-after"] == "0"
    assert caught.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as limited:
        anthropic_client.messages.create(model=CLAUDE, max_tokens=5, messages=USER)
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.BadRequestError):
        anthropic_client.messages.create(
            model=CLAUDE, max_tokens=5, messages=USER, stream=True
        )


def test_error_rate_is_seeded(openai_client):
    def outcomes(seed: int) -> list[bool]:
        with FakeProvider(error_rate=0.5, seed=seed) as fake:
            client = openai_client.with_options(base_url=fake.openai_base_url)
            results = []
            for _ in range(20):
                try:
                    client.chat.completions.create(model=MODEL, messages=USER)
                    results.append(True)
                except openai.InternalServerError:
                    results.append(False)
            return results

    first = outcomes(7)
    assert first == outcomes(7)
    assert True in first
    assert False in first


def test_truncated_chat_stream_raises_in_the_sdk(fake_provider, openai_client):
    fake_provider.enqueue(FakeReply(truncate_after=2, usage=CACHED))
    got = []
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    with pytest.raises(CUT_SHORT), stream:
        got.extend(c.choices[0].delta.content for c in stream if c.choices)
    assert got == ["", "Hello", " from"]


def test_truncated_anthropic_stream_raises_in_the_sdk(fake_provider, anthropic_client):
    fake_provider.enqueue(FakeReply(truncate_after=1))
    types = []
    # anthropic lets the transport's error through (httpx or httpx2).
    with (
        pytest.raises(Exception, match="incomplete chunked read"),
        anthropic_client.messages.stream(
            model=CLAUDE, max_tokens=100, messages=USER
        ) as stream,
    ):
        types.extend(event.type for event in stream)
    assert "message_delta" not in types
    assert types.count("content_block_delta") == 1


async def collect_types(stream, into: list[str]) -> None:
    async with stream:
        async for event in stream:
            into.append(event.type)  # noqa: PERF401 - keep what came before the error


async def test_truncated_responses_stream_and_non_stream(
    fake_provider, async_openai_client
):
    fake_provider.enqueue(FakeReply(truncate_after=0), FakeReply(truncate_after=3))
    types = []
    stream = await async_openai_client.responses.create(
        model=MODEL, input="Hi", stream=True
    )
    with pytest.raises(CUT_SHORT):
        await collect_types(stream, types)
    assert "response.output_text.delta" not in types
    assert types[0] == "response.created"
    with pytest.raises(CUT_SHORT):
        await async_openai_client.responses.create(model=MODEL, input="Hi")
    # The connection drop consumed its reply; the next request is normal.
    result = await async_openai_client.responses.create(model=MODEL, input="Hi")
    assert result.status == "completed"


def test_omit_usage(fake_provider, openai_client, anthropic_client):
    fake_provider.enqueue(*[FakeReply(omit_usage=True)] * 5)
    result = openai_client.chat.completions.create(model=MODEL, messages=USER)
    assert result.usage is None
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    with stream:
        chunks = list(stream)
    assert all(c.choices for c in chunks)
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert openai_client.responses.create(model=MODEL, input="Hi").usage is None
    message = anthropic_client.messages.create(
        model=CLAUDE, max_tokens=10, messages=USER
    )
    assert getattr(message, "usage", None) is None
    events = anthropic_client.messages.create(
        model=CLAUDE, max_tokens=10, messages=USER, stream=True
    )
    with events:
        usages = [getattr(e, "usage", None) for e in events]
    assert usages == [None] * len(usages)


def test_usage_callable_sees_the_request(fake_provider, openai_client):
    seen: list[FakeRequest] = []

    def usage(request: FakeRequest) -> FakeUsage:
        seen.append(request)
        return FakeUsage(input_tokens=request.max_tokens or 0, output_tokens=1)

    fake_provider.usage = usage
    result = openai_client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=77
    )
    assert result.usage.prompt_tokens == 77
    assert seen[0].model == MODEL
    assert seen[0].route == "/chat/completions"


def test_latency_delays_the_answer(fake_provider, openai_client):
    fake_provider.enqueue(FakeReply(latency=0.05))
    started = time.monotonic()
    openai_client.chat.completions.create(model=MODEL, messages=USER)
    assert time.monotonic() - started >= 0.05
    fake_provider.latency = (0.01, 0.02)
    started = time.monotonic()
    openai_client.chat.completions.create(model=MODEL, messages=USER)
    assert time.monotonic() - started >= 0.01


# -- Load and HTTP details -------------------------------------------------------------


async def test_200_concurrent_async_requests(fake_provider, async_openai_client):
    fake_provider.latency = 0.02

    async def one(i: int) -> str:
        result = await async_openai_client.chat.completions.create(
            model=f"m{i}", messages=USER
        )
        return result.model

    models = await asyncio.gather(*(one(i) for i in range(200)))
    assert models == [f"m{i}" for i in range(200)]
    assert fake_provider.generation_count == 200


@pytest.mark.slow
async def test_1000_concurrent_connections_with_latency():
    body = json.dumps({"model": MODEL, "messages": USER}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )

    async def one(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        return data.split(b"\r\n", 1)[0]

    with FakeProvider(latency=0.02) as fake:
        lines = await asyncio.gather(*(one(fake.port) for _ in range(1000)))
        assert fake.generation_count == 1000
    assert set(lines) == {b"HTTP/1.1 200 OK"}


def test_keep_alive_serves_many_requests_on_one_connection(fake_provider):
    conn = http.client.HTTPConnection("127.0.0.1", fake_provider.port, timeout=10)
    try:
        body = json.dumps({"model": MODEL, "messages": USER, "stream": True})
        sockets = set()
        for path in ("/v1/chat/completions", "/chat/completions", "/v1/messages"):
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            sockets.add(id(conn.sock))
            answer = conn.getresponse()
            assert answer.status == 200
            assert answer.getheader("transfer-encoding") == "chunked"
            assert answer.read().count(b"data: ") >= DEFAULT_WORDS
        conn.request("GET", "/v1/models")
        sockets.add(id(conn.sock))
        assert json.loads(conn.getresponse().read())["object"] == "list"
    finally:
        conn.close()
    assert len(sockets) == 1
    assert fake_provider.count() == 4
    assert fake_provider.generation_count == 3


def test_connection_close_is_honoured(fake_provider):
    with socket.create_connection(("127.0.0.1", fake_provider.port), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        for _ in range(100):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["object"] == "list"


def test_chunked_request_and_http_1_0_stream(fake_provider):
    payload = json.dumps({"model": CLAUDE, "max_tokens": 9, "messages": USER})
    with socket.create_connection(("127.0.0.1", fake_provider.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(payload), payload.encode())
        )
        answer = s.makefile("rb").readline()
    assert answer.startswith(b"HTTP/1.1 200")
    stream = json.dumps(
        {"model": CLAUDE, "max_tokens": 9, "messages": USER, "stream": True}
    )
    with socket.create_connection(("127.0.0.1", fake_provider.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/messages HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
            % (len(stream), stream.encode())
        )
        data = b""
        for _ in range(1000):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert b"transfer-encoding" not in data.lower()
    assert data.rstrip().endswith(b'data: {"type":"message_stop"}')


def test_bad_json_is_a_400(fake_provider):
    conn = http.client.HTTPConnection("127.0.0.1", fake_provider.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", b"{not json")
        answer = conn.getresponse()
        assert answer.status == 400
        assert "not valid JSON" in json.loads(answer.read())["error"]["message"]
    finally:
        conn.close()


# -- The request log and the provider's API --------------------------------------------


def test_request_log(fake_provider, anthropic_client):
    anthropic_client.messages.create(
        model=CLAUDE,
        max_tokens=10,
        messages=USER,
        extra_query={"beta": "true"},
    )
    (request,) = fake_provider.requests
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.query == {"beta": "true"}
    # anthropic 2.x sends the key as a bearer token, 0.73 as x-api-key.
    key = request.headers.get("x-api-key") or request.headers["authorization"]
    assert key.endswith("test")
    assert request.json["model"] == CLAUDE
    assert request.is_generation
    assert request.text == "Say hello."
    assert request.input_tokens == math.ceil(len("Say hello.") / 4)
    assert fake_provider.count("/v1/messages") == 1
    assert fake_provider.count("/chat/completions") == 0


def test_reset_clears_the_log_and_the_queue(fake_provider, openai_client):
    fake_provider.enqueue(FakeReply(text="queued"))
    openai_client.models.list()
    assert fake_provider.count() == 1
    fake_provider.reset()
    assert fake_provider.requests == []
    result = openai_client.chat.completions.create(model=MODEL, messages=USER)
    assert result.choices[0].message.content == "Hello from the fake provider."


def test_replies_are_used_in_order_by_generation_requests_only(
    fake_provider, openai_client
):
    fake_provider.enqueue(FakeReply(text="one"), FakeReply(text="two"))
    openai_client.embeddings.create(model="m", input="x")
    texts = [
        openai_client.chat.completions.create(model=MODEL, messages=USER)
        .choices[0]
        .message.content
        for _ in range(3)
    ]
    assert texts == ["one", "two", "Hello from the fake provider."]


def test_lifecycle():
    fake = FakeProvider()
    with pytest.raises(UsageError):
        _ = fake.url
    with fake:
        assert fake.is_running
        assert fake.start() is fake
        assert fake.openai_base_url == fake.url + "/v1"
        assert fake.anthropic_base_url == fake.url
        assert fake.url.startswith("http://127.0.0.1:")
    assert not fake.is_running
    fake.stop()
    with fake:
        assert fake.is_running


def test_settings_are_validated():
    with pytest.raises(ConfigurationError):
        FakeUsage(
            input_tokens=10, output_tokens=1, cached_tokens=8, cache_write_tokens=3
        )
    with pytest.raises(ConfigurationError):
        FakeUsage(input_tokens=-1, output_tokens=1)
    with pytest.raises(ConfigurationError):
        FakeReply(status=302)
    with pytest.raises(ConfigurationError):
        FakeReply(tool_calls=[("f", "not json")])
    with pytest.raises(ConfigurationError):
        FakeProvider(latency=(0.2, 0.1))
    with pytest.raises(ConfigurationError):
        FakeProvider(error_rate=1.5)


@pytest.fixture(scope="module")
def leaky_env():
    patch = pytest.MonkeyPatch()
    patch.setenv("OPENAI_API_KEY", "sk-real")
    patch.setenv("ANTHROPIC_BASE_URL", "https://api.anthropic.com")
    patch.setenv("ALLOWANCE_LEDGER", "redis://example")
    yield
    patch.undo()


def test_hermetic_env_clears_provider_variables(leaky_env):
    names = ("OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ALLOWANCE_LEDGER")
    assert [name for name in names if name in os.environ] == []
