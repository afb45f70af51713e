"""OpenAI's priority tier is reserved and charged at twice the listed price.

``service_tier="priority"`` is billed at about 1.7-2x the standard rate
(gpt-4o $4.25/$17 per 1M tokens against $2.50/$10), which genai-prices does
not hold: the call reserves 2x its worst case, and is charged 2x its usage
when the response says the priority tier served it; the standard rate when
it says another (the provider fell back). Token budgets count tokens as ever.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from tests.sdk.conftest import GPT, USER, Loopback, aw, drain, only_record

import allowance
from allowance import prices
from allowance._sdk import openai as openai_sdk
from allowance.testing import FakeUsage

USED = FakeUsage(input_tokens=10, output_tokens=1_500)
MAX = 1_500


def _body(api: str, tier: str | None) -> dict:
    body: dict = (
        {"model": GPT, "messages": USER, "max_completion_tokens": MAX}
        if api == "chat"
        else {"model": GPT, "input": "Say hello.", "max_output_tokens": MAX}
    )
    if tier is not None:
        body["service_tier"] = tier
    return body


async def _call(client, api: str, body: dict, *, stream: bool):
    create = (
        client.chat.completions.create if api == "chat" else client.responses.create
    )
    result = await aw(create(**body, stream=stream))
    if stream:
        await drain(result)


def _worst(api: str, body: dict) -> int:
    path = "/chat/completions" if api == "chat" else "/responses"
    est = openai_sdk.CODEC.estimate(path, body)
    return prices.worst_case_micros("openai", GPT, est.input_tokens, est.output_tokens)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_priority_is_reserved_and_charged_twice_the_listed_price(
    api, stream, kind, mode, fake_provider, *, guarded
):
    """Reserved at 2x the worst case, charged 2x the usage; tokens counted once.

    If this fails with the standard price: the request's ``service_tier`` was
    not read (the express lane took the call, or the codec ignored it).
    """
    fake_provider.usage = USED
    client, guard = guarded("openai", kind, mode, "$5")
    body = _body(api, "priority")
    await _call(client, api, body, stream=stream)
    assert fake_provider.requests[-1].json["service_tier"] == "priority"
    record = only_record(guard)
    listed = prices.cost_micros("openai", GPT, allowance.Usage(10, 1_500))
    assert record.cost_micros == 2 * listed
    assert record.estimate_micros == 2 * _worst(api, body)
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (2 * listed, 0)


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_priority_past_the_limit_is_refused_unsent(
    api, kind, fake_provider, guarded
):
    """Its standard worst case fits the budget, its priority one does not."""
    body = _body(api, "priority")
    worst = _worst(api, body)
    client, _ = guarded("openai", kind, "wrap", f"${1.5 * worst / 1e6:.6f}")
    with pytest.raises(allowance.BudgetExceeded) as caught:
        await _call(client, api, body, stream=False)
    assert caught.value.violations[0].requested == 2 * worst
    assert len(fake_provider.requests) == 0


@pytest.mark.parametrize("tier", [None, "default", "flex"])
async def test_other_tiers_are_charged_the_listed_price(
    tier, kind, fake_provider, guarded
):
    """No tier, default and flex (half price: an overcharge) at the listed price."""
    fake_provider.usage = USED
    client, guard = guarded("openai", kind, "wrap", "$5")
    await _call(client, "chat", _body("chat", tier), stream=False)
    record = only_record(guard)
    assert record.cost_micros == prices.cost_micros(
        "openai", GPT, allowance.Usage(10, 1_500)
    )


async def test_priority_served_at_the_default_tier_is_charged_the_listed_price(
    kind, fake_provider, guarded
):
    """A response saying ``service_tier: "default"``: the provider fell back.

    Reserved at 2x, charged the standard rate.
    """

    def fell_back(_path: str, raw: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(  # noqa: S310 - the fake, on loopback
            fake_provider.openai_base_url + "/chat/completions",
            data=raw,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            answer = json.loads(response.read())
        assert answer["service_tier"] == "priority"
        answer["service_tier"] = "default"
        return 200, json.dumps(answer).encode()

    server = Loopback(fell_back)
    try:
        fake_provider.usage = USED
        client, guard = guarded(
            "openai", kind, "wrap", "$5", client_options={"base_url": server.url}
        )
        body = _body("chat", "priority")
        await _call(client, "chat", body, stream=False)
        record = only_record(guard)
        assert record.cost_micros == prices.cost_micros(
            "openai", GPT, allowance.Usage(10, 1_500)
        )
        assert record.estimate_micros == 2 * _worst("chat", body)
    finally:
        server.stop()
