"""Every Anthropic call shape is charged exactly the usage the provider reported.

Anthropic's ``input_tokens`` excludes cache reads and writes: the charge must
add them back and price them at the cache rates. Each shape runs sync and
async, wrapped and patched, on a USD and a token budget.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from tests.sdk.conftest import (
    CLAUDE,
    USAGE,
    USER,
    as_usage,
    aw,
    budget_for,
    drain,
    enter,
    expected_charge,
    only_record,
)

import allowance
from allowance import prices

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from allowance.testing import FakeProvider

MAX = 256


@dataclass(frozen=True)
class Shape:
    name: str
    run: Callable[[Any, FakeProvider], Awaitable[None]]


async def messages_create(client, fake):
    message = await aw(
        client.messages.create(model=CLAUDE, messages=USER, max_tokens=MAX)
    )
    # The SDK object shows Anthropic's split: uncached input only.
    assert message.usage.input_tokens == USAGE.uncached_input_tokens


async def messages_create_stream(client, fake):
    stream = await aw(
        client.messages.create(model=CLAUDE, messages=USER, max_tokens=MAX, stream=True)
    )
    events = await drain(stream)
    assert events[0].type == "message_start"
    assert events[-1].type == "message_stop"


async def messages_stream_helper(client, fake):
    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(
            stack, client.messages.stream(model=CLAUDE, messages=USER, max_tokens=MAX)
        )
        final = await aw(stream.get_final_message())
    assert final.usage.output_tokens == USAGE.output_tokens
    assert final.usage.cache_read_input_tokens == USAGE.cached_tokens


async def messages_stream_helper_iterated(client, fake):
    async with contextlib.AsyncExitStack() as stack:
        stream = await enter(
            stack, client.messages.stream(model=CLAUDE, messages=USER, max_tokens=MAX)
        )
        events = await drain(stream)
        final = await aw(stream.get_final_message())
    assert events
    assert final.content[0].text == fake.text


async def beta_messages_create(client, fake):
    message = await aw(
        client.beta.messages.create(model=CLAUDE, messages=USER, max_tokens=MAX)
    )
    assert type(message).__name__ == "BetaMessage"
    # anthropic 0.73 adds ?beta=true, 2.x does not: the guard ignores the query.
    assert fake.requests[-1].route == "/messages"


async def beta_messages_stream(client, fake):
    stream = await aw(
        client.beta.messages.create(
            model=CLAUDE, messages=USER, max_tokens=MAX, stream=True
        )
    )
    await drain(stream)


async def raw_response(client, fake):
    raw = await aw(
        client.messages.with_raw_response.create(
            model=CLAUDE, messages=USER, max_tokens=MAX
        )
    )
    assert (await aw(raw.parse())).usage.output_tokens == USAGE.output_tokens


async def streaming_response(client, fake):
    async with contextlib.AsyncExitStack() as stack:
        response = await enter(
            stack,
            client.messages.with_streaming_response.create(
                model=CLAUDE, messages=USER, max_tokens=MAX
            ),
        )
        message = await aw(response.parse())
    assert message.usage.output_tokens == USAGE.output_tokens


async def with_options_copy(client, fake):
    copy = client.with_options(timeout=20.0)
    await aw(copy.messages.create(model=CLAUDE, messages=USER, max_tokens=MAX))


SHAPES = [
    Shape("messages.create", messages_create),
    Shape("messages.create(stream)", messages_create_stream),
    Shape("messages.stream().get_final_message()", messages_stream_helper),
    Shape("messages.stream() iterated", messages_stream_helper_iterated),
    Shape("beta.messages.create", beta_messages_create),
    Shape("beta.messages.create(stream)", beta_messages_stream),
    Shape("messages.with_raw_response", raw_response),
    Shape("messages.with_streaming_response", streaming_response),
    Shape("with_options().messages.create", with_options_copy),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
async def test_call_is_charged_the_provider_usage(
    shape, kind, mode, unit, fake_provider, *, guarded
):
    """One call, one charge: exactly the reported usage, cache included.

    If this fails with a charge too low: the cache tokens Anthropic reports
    apart from ``input_tokens`` were not added back.
    """
    fake_provider.usage = USAGE
    client, guard = guarded("anthropic", kind, mode, budget_for(unit))

    await shape.run(client, fake_provider)

    usage = as_usage(USAGE)
    # Normalised: input counts cache reads and writes (allowance's convention).
    assert usage.input_tokens == USAGE.input_tokens
    (status,) = guard.status()
    assert status.spent == expected_charge(unit, "anthropic", CLAUDE, usage)
    assert status.reserved == 0
    record = only_record(guard)
    assert record.outcome == "ok"
    assert record.usage.input_tokens == usage.input_tokens
    assert record.usage.output_tokens == usage.output_tokens
    assert record.usage.cache_read_tokens == usage.cache_read_tokens
    assert record.usage.cache_write_tokens == usage.cache_write_tokens
    assert record.model == record.requested_model == CLAUDE
    assert fake_provider.generation_count == 1
    assert len(fake_provider.requests) == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_cache_tokens_are_priced_at_cache_rates(
    kind, stream, fake_provider, guarded
):
    """The charge is uncached input, cache reads and cache writes at their own rates.

    Computed here from the model's rates, independently of ``cost_micros``.
    If this fails: cache tokens were dropped (charge too low) or charged at
    the plain input rate.
    """
    fake_provider.usage = USAGE
    client, guard = guarded("anthropic", kind, "wrap", "$5")
    result = await aw(
        client.messages.create(
            model=CLAUDE, messages=USER, max_tokens=MAX, stream=stream
        )
    )
    if stream:
        await drain(result)

    rates = prices.rates("anthropic", CLAUDE)
    assert rates is not None
    assert rates.cache_read < rates.input < rates.cache_write
    exact = (
        USAGE.uncached_input_tokens * rates.input
        + USAGE.cached_tokens * rates.cache_read
        + USAGE.cache_write_tokens * rates.cache_write
        + USAGE.output_tokens * rates.output
    )
    expected = -(-exact // rates.denominator)
    assert guard.status()[0].spent == expected
    without_cache = prices.cost_micros(
        "anthropic",
        CLAUDE,
        allowance.Usage(USAGE.uncached_input_tokens, USAGE.output_tokens),
    )
    assert expected > without_cache


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_with_options_copies_share_the_wrapped_budget(
    kind, fake_provider, guarded
):
    """A ``with_options`` copy of a wrapped Anthropic client charges its budget."""
    fake_provider.usage = USAGE
    client, guard = guarded("anthropic", kind, "wrap", "$5")
    copy = client.with_options(timeout=30.0)
    assert copy.allowance is client.allowance
    await aw(copy.messages.create(model=CLAUDE, messages=USER, max_tokens=MAX))
    await aw(client.messages.create(model=CLAUDE, messages=USER, max_tokens=MAX))
    one = expected_charge("usd", "anthropic", CLAUDE, as_usage(USAGE))
    assert guard.status()[0].spent == 2 * one
    assert len(guard.ledger.calls()) == 2


def _cut_stream(text: str) -> bytes:
    """A Messages stream closed cleanly after its text: no ``message_delta``.

    ``message_start`` holds the input usage and ``output_tokens: 1``; the
    output count comes in ``message_delta``, which never does here.
    """
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": 30, "output_tokens": 1},
    }
    block = {"type": "text", "text": ""}
    events = [
        ("message_start", {"type": "message_start", "message": message}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
        *(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": f"{w} "},
                },
            )
            for w in text.split()
        ),
    ]
    return "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events).encode()


async def test_a_stream_closed_before_its_final_usage_is_charged_what_it_produced(
    kind, guarded
):
    """The server closes the stream cleanly after 100 words, before the
    ``message_delta`` that carries the output count.

    If this fails with 1 output token charged: the output count of
    ``message_start`` (1) was taken for the stream's.
    """
    from tests.sdk.conftest import Loopback

    text = " ".join(["word"] * 100)  # 500 bytes, each at least a token's
    loopback = Loopback(lambda _path, _body: (200, _cut_stream(text)))
    try:
        client, guard = guarded(
            "anthropic",
            kind,
            "wrap",
            1_000_000,
            client_options={"base_url": loopback.url, "max_retries": 0},
        )
        stream = await aw(
            client.messages.create(
                model=CLAUDE, messages=USER, max_tokens=MAX, stream=True
            )
        )
        events = await drain(stream)
    finally:
        loopback.stop()
    assert events[-1].type == "content_block_delta"  # ended there, no error
    record = only_record(guard)
    assert record.usage.input_tokens == 30
    assert record.usage.output_tokens == MAX  # 500 bytes, capped at max_tokens
    assert record.outcome == "partial"  # cut short, as an abandoned stream
