"""The legacy Completions API and ``responses.compact`` go through the guard.

``client.completions.create`` (POST ``/completions``: vLLM and other
OpenAI-compatible servers, gpt-3.5-turbo-instruct) and
``client.responses.compact`` (POST ``/responses/compact``) generate, so they
are reserved before sending and charged after, like chat:

- charged the provider's usage exactly once (JSON, streams, raw responses);
- refused unsent when the budget cannot hold the worst case: per prompt its
  UTF-8 bytes (a token id counts 1) plus 3, ``suffix`` per prompt; output
  ``max_tokens`` (16 when absent, the model's largest when null) times
  ``max(n, best_of)`` times the prompts; compact: its Responses input bound and
  the model's largest output;
- a stream cut short is charged what it produced; an HTTP 500 releases;
  ``on_limit="stop"`` answers an empty, parseable object unsent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai
import pytest
from openai.types import Completion
from tests.sdk.conftest import (
    GPT,
    USAGE,
    as_usage,
    assert_settled,
    aw,
    budget_for,
    drain,
    expected_charge,
    only_record,
)

import allowance
from allowance._sdk import openai as openai_sdk
from allowance.testing import FakeReply

if TYPE_CHECKING:
    from collections.abc import Callable

    from allowance.testing import FakeProvider

INSTRUCT = "gpt-3.5-turbo-instruct"
PROMPT = "Say hello."  # 10 bytes
# 10 bytes + 3; max_tokens absent: the API's default, 16.
WORST_INPUT, WORST_OUTPUT = 13, 16
COMPACT_INPUT = 3 + 4 + 10  # request + one input item + its 10 bytes
COMPACT_OUTPUT = 16_384  # gpt-4o's largest output: compact takes no cap


def complete(client: Any, **body: Any) -> Any:
    return aw(
        client.completions.create(**{"model": INSTRUCT, "prompt": PROMPT, **body})
    )


def compact(client: Any, **body: Any) -> Any:
    return aw(client.responses.compact(**{"model": GPT, "input": PROMPT, **body}))


def held(guard: allowance.Guard) -> tuple[int, int]:
    (status,) = guard.status()
    return status.spent, status.reserved


# -- charged the provider's usage --------------------------------------------------


async def create(client: Any, fake: FakeProvider) -> None:
    result = await complete(client, max_tokens=50)
    assert isinstance(result, Completion)
    assert result.choices[0].text == "Hello from the fake provider."


async def create_stream(client: Any, fake: FakeProvider) -> None:
    chunks = await drain(await complete(client, stream=True))
    # The usage chunk the guard asked for is hidden from the caller...
    assert "".join(c.choices[0].text for c in chunks) == "Hello from the fake provider."
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    # ...but the provider was asked for it.
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}


async def create_stream_include_usage(client: Any, fake: FakeProvider) -> None:
    stream = await complete(client, stream=True, stream_options={"include_usage": True})
    chunks = await drain(stream)
    assert chunks[-1].choices == []  # the caller asked: the usage chunk reaches them
    assert chunks[-1].usage.prompt_tokens == USAGE.input_tokens


async def raw_response(client: Any, fake: FakeProvider) -> None:
    raw = await aw(
        client.completions.with_raw_response.create(model=INSTRUCT, prompt=PROMPT)
    )
    assert isinstance(await aw(raw.parse()), Completion)


async def token_prompts(client: Any, fake: FakeProvider) -> None:
    await complete(client, prompt=[[1, 2, 3], [4, 5]], suffix="!", echo=True)


SHAPES: dict[str, Callable[[Any, FakeProvider], Any]] = {
    "create": create,
    "create(stream)": create_stream,
    "create(stream) include_usage": create_stream_include_usage,
    "with_raw_response": raw_response,
    "token-id prompts, suffix, echo": token_prompts,
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_completion_is_charged_the_provider_usage(
    shape, kind, mode, unit, fake_provider, *, guarded
):
    """One completion, one charge: exactly the reported usage, priced or counted.

    If this fails with a charge of 0 and no record: ``/completions`` passes
    through the guard unreserved (the budget bypass).
    """
    fake_provider.usage = USAGE
    client, guard = guarded("openai", kind, mode, budget_for(unit))

    await SHAPES[shape](client, fake_provider)

    usage = as_usage(USAGE)
    (status,) = guard.status()
    assert status.spent == expected_charge(unit, "openai", INSTRUCT, usage)
    assert status.reserved == 0
    record = only_record(guard)
    assert record.outcome == "ok"
    assert record.usage == usage
    assert record.requested_model == record.model == INSTRUCT
    assert fake_provider.count("/v1/completions") == len(fake_provider.requests) == 1


async def test_compact_is_charged_the_provider_usage(
    kind, mode, unit, fake_provider, guarded
):
    """``responses.compact``: the Responses usage (cache, reasoning), once.

    If this fails with a charge of 0: ``/responses/compact`` is unguarded;
    with a wrong cache or reasoning count: its usage is read as chat's.
    """
    fake_provider.usage = USAGE
    client, guard = guarded("openai", kind, mode, budget_for(unit))

    result = await compact(client)

    assert result.object == "response.compaction"
    assert result.usage.input_tokens == USAGE.input_tokens
    usage = as_usage(USAGE)
    assert held(guard) == (expected_charge(unit, "openai", GPT, usage), 0)
    record = only_record(guard)
    assert record.outcome == "ok"
    assert record.usage == usage
    assert fake_provider.count("/responses/compact") == 1


# -- refused before sending ----------------------------------------------------------


async def test_completion_refused_unsent_when_the_worst_case_does_not_fit(
    kind, fake_provider, guarded
):
    """A budget one token short of the worst case refuses; the worst case fits.

    If the first call is sent: the completion was not reserved (the bypass).
    If the second is refused: the bound is larger than documented.
    """
    worst = WORST_INPUT + WORST_OUTPUT
    client, guard = guarded("openai", kind, "wrap", worst - 1)
    with pytest.raises(allowance.BudgetExceeded):
        await complete(client)
    assert fake_provider.generation_count == 0
    assert held(guard) == (0, 0)
    assert only_record(guard).outcome == "blocked"

    client, guard = guarded("openai", kind, "wrap", worst)
    await complete(client)
    assert fake_provider.generation_count == 1
    assert_settled(guard)


async def test_compact_refused_unsent_when_the_worst_case_does_not_fit(
    kind, fake_provider, guarded
):
    """Compact has no output cap: the model's largest output is reserved."""
    worst = COMPACT_INPUT + COMPACT_OUTPUT
    client, guard = guarded("openai", kind, "wrap", worst - 1)
    with pytest.raises(allowance.BudgetExceeded):
        await compact(client)
    assert fake_provider.generation_count == 0
    assert only_record(guard).outcome == "blocked"

    client, guard = guarded("openai", kind, "wrap", worst)
    await compact(client)
    assert fake_provider.generation_count == 1
    assert_settled(guard)


WORST_CASES = [
    # (request, input bound, output cap)
    ({}, 13, 16),
    ({"max_tokens": 50}, 13, 50),
    ({"max_tokens": 0}, 13, 0),
    ({"max_tokens": None}, 13, 4_096),  # null: the model's largest (gpt-3.5)
    ({"max_tokens": 10, "n": 3}, 13, 30),
    ({"max_tokens": 10, "n": 2, "best_of": 5}, 13, 50),  # best_of are billed
    ({"max_tokens": 10, "suffix": "end."}, 17, 10),
    ({"prompt": "héllo"}, 9, 16),  # UTF-8 bytes
    ({"prompt": [1, 2, 3, 4]}, 7, 16),  # token ids count 1 each
    ({"prompt": ["ab", "cde"], "max_tokens": 10}, 11, 20),  # per prompt
    ({"prompt": [[1, 2], [3]], "n": 2, "max_tokens": 10, "suffix": "x"}, 11, 40),
]


@pytest.mark.parametrize(("extra", "bound", "cap"), WORST_CASES)
async def test_completion_worst_case_is_the_documented_bound(
    extra, bound, cap, fake_provider, guarded
):
    """The estimate is the documented bound, and the guard refuses by it.

    If a refusal is missing: the call was not reserved, or ``max_tokens``'
    default, ``n``, ``best_of`` or the prompts were not multiplied in.
    """
    body = {"model": INSTRUCT, "prompt": PROMPT, **extra}
    estimate = openai_sdk.CODEC.estimate("/completions", body)
    assert (estimate.input_tokens, estimate.output_tokens) == (bound, cap)

    client, _ = guarded("openai", "sync", "wrap", bound + cap - 1)
    with pytest.raises(allowance.BudgetExceeded):
        await complete(client, **extra)
    assert fake_provider.generation_count == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", -1), ("max_tokens", True), ("n", 0), ("best_of", "2")],
)
async def test_bad_completion_values_raise_configuration_error(
    field, value, kind, fake_provider, guarded
):
    """Malformed caps raise ``ConfigurationError`` naming the value, unsent."""
    client, _ = guarded("openai", kind, "wrap", 1_000_000)
    with pytest.raises(allowance.ConfigurationError, match=field) as caught:
        await complete(client, **{"max_tokens": 10, field: value})
    assert caught.value.value == value
    assert fake_provider.generation_count == 0


# -- streams cut short, errors, stop -------------------------------------------------


async def test_completion_stream_cut_short_is_charged_what_it_produced(
    kind, fake_provider, guarded
):
    """Cut after 2 words ("Hello", " from": 10 bytes), no usage: charged that.

    If this fails with a charge of 0: the stream was unguarded; with the
    whole worst case: the stream's text was not counted.
    """
    client, guard = guarded("openai", kind, "wrap", 1_000)
    fake_provider.enqueue(FakeReply(truncate_after=2, usage=USAGE))
    stream = await complete(client, stream=True, max_tokens=100)
    chunks: list[Any] = []
    failure: BaseException | None = None
    try:
        chunks = await drain(stream)
    except Exception as err:  # checked below
        failure = err
    if failure is None:  # an early end
        assert len(chunks) == 2
    else:  # the SDK's error, or httpx's where the SDK passes it on
        assert isinstance(failure, openai.APIConnectionError) or (
            type(failure).__name__ == "RemoteProtocolError"
        )
    record = only_record(guard)
    assert record.outcome == "partial"
    assert record.usage == allowance.Usage(input_tokens=WORST_INPUT, output_tokens=10)
    assert held(guard) == (WORST_INPUT + 10, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_completion_http_error_releases_the_reservation(
    stream, kind, fake_provider, guarded
):
    """An HTTP 500 releases: nothing spent or held, outcome ``error``."""
    client, guard = guarded("openai", kind, "wrap", 1_000)
    fake_provider.enqueue(FakeReply(status=500))
    with pytest.raises(openai.InternalServerError):
        await complete(client, stream=stream)
    assert fake_provider.generation_count == 1
    assert held(guard) == (0, 0)
    assert only_record(guard).outcome == "error"


async def test_compact_http_error_releases_the_reservation(
    kind, fake_provider, guarded
):
    client, guard = guarded("openai", kind, "wrap", 100_000)
    fake_provider.enqueue(FakeReply(status=500))
    with pytest.raises(openai.InternalServerError):
        await compact(client)
    assert fake_provider.generation_count == 1
    assert held(guard) == (0, 0)
    assert only_record(guard).outcome == "error"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_completion_stop_answers_an_empty_completion_unsent(
    stream, kind, fake_provider, guarded
):
    """``on_limit="stop"``: a parseable empty ``Completion``, marked; 0 requests."""
    client, guard = guarded("openai", kind, "wrap", 10, on_limit="stop")
    result = await complete(client, stream=stream, n=2)
    chunks = await drain(result) if stream else [result]
    assert chunks
    for chunk in chunks:
        assert isinstance(chunk, Completion)
        assert chunk.object == "text_completion"
        assert "allowance-stop" in chunk.id
        assert [c.text for c in chunk.choices] == ["", ""]  # one per choice asked
    assert len(fake_provider.requests) == 0
    record = only_record(guard)
    assert record.outcome == "stopped"
    assert record.call_id in chunks[0].id
    assert held(guard) == (0, 0)


async def test_compact_stop_answers_an_empty_compaction_unsent(
    kind, fake_provider, guarded
):
    client, guard = guarded("openai", kind, "wrap", 10, on_limit="stop")
    result = await compact(client)
    assert result.object == "response.compaction"
    assert "allowance-stop" in result.id
    assert result.output == []
    assert result.usage.total_tokens == 0
    assert len(fake_provider.requests) == 0
    assert only_record(guard).outcome == "stopped"
