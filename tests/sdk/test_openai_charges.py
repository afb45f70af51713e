"""Every OpenAI call shape is charged exactly the usage the provider reported.

Each shape runs on the sync and the async client, guarded by ``wrap`` and by
``patch``, against a USD budget and a token budget: 8 runs per shape. The
charge is compared with the provider's usage priced by genai-prices (USD) or
counted (tokens), the call log holds exactly one ``ok`` record, and nothing is
left reserved.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import openai
import pytest
from pydantic import BaseModel
from tests.sdk.conftest import (
    EMBEDDING,
    GPT,
    USAGE,
    USER,
    as_usage,
    assert_settled,
    aw,
    budget_for,
    drain,
    enter,
    expected_charge,
    only_record,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import allowance
    from allowance.testing import FakeProvider


class Answer(BaseModel):
    a: int


ANSWER_TEXT = '{"a": 7}'
EMBED_INPUT = "hello world, twenty-two"  # 23 bytes: ceil(23 / 4) == 6 tokens


@dataclass(frozen=True)
class Shape:
    name: str
    run: Callable[[Any, FakeProvider], Awaitable[None]]
    path: str = "/chat/completions"
    model: str = GPT

    def usage(self) -> allowance.Usage:
        if self.path == "/embeddings":
            import allowance

            return allowance.Usage(input_tokens=math.ceil(len(EMBED_INPUT) / 4))
        return as_usage(USAGE)


# -- Chat Completions --------------------------------------------------------------


async def chat_create(client, fake):
    result = await aw(client.chat.completions.create(model=GPT, messages=USER))
    assert result.usage.prompt_tokens == USAGE.input_tokens


async def chat_stream_caller_did_not_ask_usage(client, fake):
    stream = await aw(
        client.chat.completions.create(model=GPT, messages=USER, stream=True)
    )
    chunks = await drain(stream)
    # The usage-only chunk the guard asked for is hidden from the caller...
    assert chunks
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    # ...but the provider was asked for it.
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}


async def chat_stream_iterated_in_place(client, fake):
    # Nothing keeps the stream object: only the iterator ``for`` took from it.
    # Settling must wait for that iterator, not for the stream object to go.
    count = 0
    if isinstance(client, openai.AsyncOpenAI):
        async for _ in await client.chat.completions.create(
            model=GPT, messages=USER, stream=True
        ):
            count += 1
    else:
        for _ in client.chat.completions.create(model=GPT, messages=USER, stream=True):
            count += 1
    assert count


async def chat_stream_caller_asked_usage(client, fake):
    stream = await aw(
        client.chat.completions.create(
            model=GPT,
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    chunks = await drain(stream)
    # The caller asked: the usage chunk reaches them.
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == USAGE.input_tokens
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}


async def chat_stream_options_other_keys_kept(client, fake):
    stream = await aw(
        client.chat.completions.create(
            model=GPT,
            messages=USER,
            stream=True,
            stream_options={"include_obfuscation": False},
        )
    )
    chunks = await drain(stream)
    assert all(chunk.choices for chunk in chunks)
    sent = fake.requests[-1].json["stream_options"]
    assert sent == {"include_obfuscation": False, "include_usage": True}


async def chat_parse(client, fake):
    fake.text = ANSWER_TEXT
    result = await aw(
        client.chat.completions.parse(model=GPT, messages=USER, response_format=Answer)
    )
    assert result.choices[0].message.parsed == Answer(a=7)


async def chat_stream_helper(client, fake):
    fake.text = ANSWER_TEXT
    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(
            stack,
            client.chat.completions.stream(
                model=GPT, messages=USER, response_format=Answer
            ),
        )
        events = await drain(stream)
        final = await aw(stream.get_final_completion())
    assert events
    assert final.choices[0].message.parsed == Answer(a=7)


async def chat_raw_response(client, fake):
    raw = await aw(
        client.chat.completions.with_raw_response.create(model=GPT, messages=USER)
    )
    assert raw.headers["server"] == "allowance-fake-provider"
    result = raw.parse()
    assert result.usage.completion_tokens == USAGE.output_tokens


async def chat_raw_response_stream(client, fake):
    raw = await aw(
        client.chat.completions.with_raw_response.create(
            model=GPT, messages=USER, stream=True
        )
    )
    chunks = await drain(await aw(raw.parse()))
    assert all(chunk.choices for chunk in chunks)


async def chat_streaming_response(client, fake):
    async with contextlib.AsyncExitStack() as stack:
        response = await enter(
            stack,
            client.chat.completions.with_streaming_response.create(
                model=GPT, messages=USER
            ),
        )
        result = await aw(response.parse())
    assert result.usage.prompt_tokens == USAGE.input_tokens


async def chat_streaming_response_stream(client, fake):
    async with contextlib.AsyncExitStack() as stack:
        response = await enter(
            stack,
            client.chat.completions.with_streaming_response.create(
                model=GPT, messages=USER, stream=True
            ),
        )
        chunks = await drain(await aw(response.parse()))
    assert all(chunk.choices for chunk in chunks)


async def chat_with_options_copy(client, fake):
    copy = client.with_options(timeout=20.0)
    result = await aw(copy.chat.completions.create(model=GPT, messages=USER))
    assert result.usage.prompt_tokens == USAGE.input_tokens


# -- Responses -------------------------------------------------------------------------


async def responses_create(client, fake):
    result = await aw(client.responses.create(model=GPT, input="Say hello."))
    assert result.usage.input_tokens == USAGE.input_tokens


async def responses_create_stream(client, fake):
    stream = await aw(
        client.responses.create(model=GPT, input="Say hello.", stream=True)
    )
    events = await drain(stream)
    assert events[-1].type == "response.completed"


async def responses_stream_helper(client, fake):
    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(
            stack, client.responses.stream(model=GPT, input="Say hello.")
        )
        await drain(stream)
        final = await aw(stream.get_final_response())
    assert final.usage.output_tokens == USAGE.output_tokens


async def responses_parse(client, fake):
    fake.text = ANSWER_TEXT
    result = await aw(
        client.responses.parse(model=GPT, input="Say hello.", text_format=Answer)
    )
    assert result.output_parsed == Answer(a=7)


async def responses_raw_response(client, fake):
    raw = await aw(client.responses.with_raw_response.create(model=GPT, input="Hi."))
    assert raw.parse().usage.input_tokens == USAGE.input_tokens


async def responses_streaming_response(client, fake):
    async with contextlib.AsyncExitStack() as stack:
        response = await enter(
            stack,
            client.responses.with_streaming_response.create(model=GPT, input="Hi."),
        )
        result = await aw(response.parse())
    assert result.usage.input_tokens == USAGE.input_tokens


# -- Embeddings ------------------------------------------------------------------------


async def embeddings_create(client, fake):
    result = await aw(client.embeddings.create(model=EMBEDDING, input=EMBED_INPUT))
    assert result.usage.prompt_tokens == math.ceil(len(EMBED_INPUT) / 4)


SHAPES = [
    Shape("chat.create", chat_create),
    Shape("chat.create(stream) no include_usage", chat_stream_caller_did_not_ask_usage),
    Shape("chat.create(stream) include_usage", chat_stream_caller_asked_usage),
    Shape("chat.create(stream) iterated in place", chat_stream_iterated_in_place),
    Shape(
        "chat.create(stream) other stream_options", chat_stream_options_other_keys_kept
    ),
    Shape("chat.parse", chat_parse),
    Shape("chat.stream()", chat_stream_helper),
    Shape("chat.with_raw_response", chat_raw_response),
    Shape("chat.with_raw_response(stream)", chat_raw_response_stream),
    Shape("chat.with_streaming_response", chat_streaming_response),
    Shape("chat.with_streaming_response(stream)", chat_streaming_response_stream),
    Shape("with_options().chat.create", chat_with_options_copy),
    Shape("responses.create", responses_create, "/responses"),
    Shape("responses.create(stream)", responses_create_stream, "/responses"),
    Shape("responses.stream()", responses_stream_helper, "/responses"),
    Shape("responses.parse", responses_parse, "/responses"),
    Shape("responses.with_raw_response", responses_raw_response, "/responses"),
    Shape(
        "responses.with_streaming_response", responses_streaming_response, "/responses"
    ),
    Shape("embeddings.create", embeddings_create, "/embeddings", EMBEDDING),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
async def test_call_is_charged_the_provider_usage(
    shape, kind, mode, unit, fake_provider, *, guarded
):
    """One call, one charge: exactly the reported usage, priced or counted.

    If this fails: the interceptor missed a path (charge 0), charged twice, or
    read the usage from the wrong fields (cache, reasoning, Responses shape).
    """
    fake_provider.usage = USAGE
    client, guard = guarded("openai", kind, mode, budget_for(unit))

    await shape.run(client, fake_provider)

    usage = shape.usage()
    (status,) = guard.status()
    assert status.spent == expected_charge(unit, "openai", shape.model, usage)
    assert status.reserved == 0
    record = only_record(guard)
    assert record.outcome == "ok"
    assert record.usage == usage
    assert record.requested_model == record.model == shape.model
    assert "openai" in record.adapters
    assert fake_provider.count(shape.path) == 1
    assert len(fake_provider.requests) == 1


async def test_usage_fields_reach_the_price(kind, fake_provider, guarded):
    """Cached and reasoning tokens are read from the details and priced as such.

    If this fails: ``prompt_tokens_details``/``completion_tokens_details`` are
    not read, so cached input is charged at the full input rate.
    """
    import allowance
    from allowance import prices

    fake_provider.usage = USAGE
    client, guard = guarded("openai", kind, "wrap", "$5")
    await aw(client.chat.completions.create(model=GPT, messages=USER))

    record = only_record(guard)
    assert record.usage.cache_read_tokens == USAGE.cached_tokens
    assert record.usage.cache_write_tokens == USAGE.cache_write_tokens
    assert record.usage.reasoning_tokens == USAGE.reasoning_tokens
    flat = prices.cost_micros(
        "openai", GPT, allowance.Usage(USAGE.input_tokens, USAGE.output_tokens)
    )
    assert guard.status()[0].spent == record.cost_micros
    assert record.cost_micros is not None
    assert record.cost_micros < flat  # cache reads are cheaper than plain input


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_with_options_copies_share_the_wrapped_budget(
    kind, fake_provider, guarded
):
    """``with_options``/``copy`` of a wrapped client stay guarded, on its budget.

    If this fails: the copy is a new client built by ``self.__class__(...)``
    and lost the per-instance wrapper (its calls would be free).
    """
    fake_provider.usage = USAGE
    client, guard = guarded("openai", kind, "wrap", "$5")
    first = client.with_options(timeout=30.0)
    second = first.copy(max_retries=0)
    assert isinstance(first, type(client))
    assert first.allowance is client.allowance
    assert second.allowance.guard is guard

    for each in (client, first, second):
        await aw(each.chat.completions.create(model=GPT, messages=USER))

    one = expected_charge("usd", "openai", GPT, as_usage(USAGE))
    assert client.allowance.status()[0].spent == 3 * one
    assert len(guard.ledger.calls()) == 3
    assert_settled(guard)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_with_options_copy_of_an_exhausted_client_is_blocked(
    kind, fake_provider, guarded
):
    """A copy cannot be used to escape the budget of the client it came from."""
    import allowance

    client, _ = guarded("openai", kind, "wrap", 10)
    copy = client.with_options(max_retries=0)
    with pytest.raises(allowance.BudgetExceeded):
        await aw(copy.chat.completions.create(model=GPT, messages=USER))
    assert fake_provider.generation_count == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_azure_client_is_guarded_and_priced_as_openai(
    kind, fake_provider, guarded
):
    """``AzureOpenAI`` stays an ``AzureOpenAI`` and is guarded (provider ``azure``).

    The fake provider has no ``/deployments/...`` route, so the call gets a
    404: the reservation is released and nothing is charged.
    """
    client, guard = guarded("azure", kind, "wrap", "$5")
    assert isinstance(client, openai.AzureOpenAI | openai.AsyncAzureOpenAI)
    assert isinstance(client, openai.OpenAI | openai.AsyncOpenAI)
    with pytest.raises(openai.NotFoundError):
        await aw(client.chat.completions.create(model=GPT, messages=USER))
    record = only_record(guard)
    assert record.provider == "azure"
    assert record.outcome == "error"
    assert fake_provider.requests[-1].path == f"/v1/deployments/{GPT}/chat/completions"
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (0, 0)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_guarded_streams_keep_the_sdk_protocols(kind, fake_provider, guarded):
    """A guarded stream is an ``isinstance`` of the SDK's stream, with its protocols.

    A sync ``Stream`` has no ``__aenter__``/``__aiter__`` and an ``AsyncStream``
    no ``__iter__``/``__enter__``: duck-typing code (``hasattr``) must pick the
    same branch as for the SDK's own object.
    """
    client, _ = guarded("openai", kind, "wrap", "$5")
    stream = await aw(
        client.chat.completions.create(model=GPT, messages=USER, stream=True)
    )
    plain = openai.OpenAI if kind == "sync" else openai.AsyncOpenAI
    raw = plain(api_key="test", base_url=fake_provider.openai_base_url, max_retries=0)
    unguarded = await aw(
        raw.chat.completions.create(model=GPT, messages=USER, stream=True)
    )
    try:
        assert isinstance(stream, type(unguarded))
        for name in ("__iter__", "__next__", "__enter__", "__exit__", "__aiter__"):
            assert hasattr(stream, name) == hasattr(unguarded, name), name
        for name in ("__anext__", "__aenter__", "__aexit__"):
            assert hasattr(stream, name) == hasattr(unguarded, name), name
        assert stream.response.status_code == 200
    finally:
        await drain(stream)
        await drain(unguarded)
        await aw(raw.close())
