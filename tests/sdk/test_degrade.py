"""Degrading to the fallback model: the provider receives the cheaper model.

``wrap(client, budget=..., fallback="gpt-4o-mini", threshold=0.5)``: once spend
crosses 50% the request that goes out asks for the fallback, the response says
so, and the call log keeps the model the caller asked for. A call whose model
no longer fits is tried on the fallback before it is blocked.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from tests.sdk.conftest import CLAUDE, GPT, MINI, USER, Loopback, aw, drain

import allowance
from allowance import prices
from allowance._sdk import openai as openai_sdk
from allowance.testing import FakeUsage

HEAVY = FakeUsage(input_tokens=10_000, output_tokens=5_000)
HEAVY_GPT = prices.cost_micros("openai", GPT, allowance.Usage(10_000, 5_000))
BUDGET_MICROS = 100_000  # $0.10: one heavy gpt-4o call (~$0.075) crosses 50%
MAX = 1_000


async def chat(client, *, stream: bool = False):
    result = await aw(
        client.chat.completions.create(
            model=GPT, messages=USER, max_completion_tokens=MAX, stream=stream
        )
    )
    if stream:
        return (await drain(result))[0].model
    return result.model


async def responses(client, *, stream: bool = False):
    result = await aw(
        client.responses.create(
            model=GPT, input="Say hello.", max_output_tokens=MAX, stream=stream
        )
    )
    if stream:
        return (await drain(result))[-1].response.model
    return result.model


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("call", [chat, responses], ids=["chat", "responses"])
async def test_past_the_threshold_the_provider_receives_the_fallback(
    call, stream, kind, mode, fake_provider, *, guarded
):
    """Below 50%: gpt-4o goes out. Above: gpt-4o-mini goes out and answers.

    If this fails on ``fake.requests[-1]``: the ticket's model was not put in
    the outgoing body (the record would say degraded, the bill would not).
    """
    assert HEAVY_GPT > BUDGET_MICROS // 2
    fake_provider.usage = HEAVY
    client, guard = guarded("openai", kind, mode, "$0.10", fallback=MINI, threshold=0.5)

    assert await call(client, stream=stream) == GPT
    assert fake_provider.requests[-1].json["model"] == GPT
    assert guard.status()[0].spent == HEAVY_GPT

    answered = await call(client, stream=stream)
    assert fake_provider.requests[-1].json["model"] == MINI
    assert answered == MINI
    first, second = guard.ledger.calls()
    assert (first.outcome, first.model, first.requested_model) == ("ok", GPT, GPT)
    assert second.outcome == "degraded"
    assert second.requested_model == GPT
    assert second.model == MINI
    heavy_mini = prices.cost_micros("openai", MINI, allowance.Usage(10_000, 5_000))
    (status,) = guard.status()
    assert status.spent == HEAVY_GPT + heavy_mini  # priced as the model that answered
    assert status.reserved == 0


async def test_degrade_through_parse_and_the_stream_helper(
    kind, fake_provider, guarded
):
    """``parse`` and ``chat.completions.stream()`` skip ``create``; they degrade too."""
    fake_provider.usage = HEAVY
    client, guard = guarded(
        "openai", kind, "wrap", "$0.10", fallback=MINI, threshold=0.5
    )
    small = {"model": GPT, "messages": USER, "max_completion_tokens": MAX}
    await aw(client.chat.completions.create(**small))
    assert guard.status()[0].spent == HEAVY_GPT

    parsed = await aw(client.chat.completions.parse(**small))
    assert parsed.model == MINI
    assert fake_provider.requests[-1].json["model"] == MINI

    manager = client.chat.completions.stream(**small)
    if hasattr(manager, "__aenter__"):
        async with manager as stream:
            final = await stream.get_final_completion()
    else:
        with manager as stream:
            final = stream.get_final_completion()
    assert final.model == MINI
    assert fake_provider.requests[-1].json["model"] == MINI
    assert [r.outcome for r in guard.ledger.calls()] == ["ok", "degraded", "degraded"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_fallback_before_block(stream, kind, mode, fake_provider, guarded):
    """gpt-4o's worst case does not fit a $0.01 budget; gpt-4o-mini's does.

    The call goes out as gpt-4o-mini instead of raising ``BudgetExceeded``.
    """
    fake_provider.usage = FakeUsage(input_tokens=50, output_tokens=20)
    client, guard = guarded("openai", kind, mode, "$0.01", fallback=MINI)
    body = {"model": GPT, "messages": USER, "max_completion_tokens": 1_500}
    est = openai_sdk.CODEC.estimate("/chat/completions", body)
    worst_gpt = prices.worst_case_micros("openai", GPT, est.input_tokens, 1_500)
    worst_mini = prices.worst_case_micros("openai", MINI, est.input_tokens, 1_500)
    assert worst_mini <= 10_000 < worst_gpt

    result = await aw(client.chat.completions.create(**body, stream=stream))
    if stream:
        await drain(result)
    assert fake_provider.requests[-1].json["model"] == MINI
    record = guard.ledger.calls()[-1]
    assert (record.outcome, record.requested_model, record.model) == (
        "degraded",
        GPT,
        MINI,
    )
    assert guard.status()[0].spent == prices.cost_micros(
        "openai", MINI, allowance.Usage(50, 20)
    )


async def test_no_fallback_fits_raises_naming_the_primary(kind, fake_provider, guarded):
    """Neither model fits: ``BudgetExceeded`` for the model asked for; 0 requests."""
    client, _ = guarded("openai", kind, "wrap", "$0.0001", fallback=MINI)
    with pytest.raises(allowance.BudgetExceeded) as caught:
        await aw(client.chat.completions.create(model=GPT, messages=USER))
    assert caught.value.model == GPT
    assert len(fake_provider.requests) == 0


async def test_anthropic_client_ignores_an_openai_fallback(
    kind, fake_provider, guarded
):
    """A fallback named for another provider is never sent to this one."""
    fake_provider.usage = FakeUsage(input_tokens=10_000, output_tokens=5_000)
    client, guard = guarded(
        "anthropic", kind, "wrap", "$0.10", fallback=MINI, threshold=0.5
    )
    for _ in range(2):
        await aw(client.messages.create(model=CLAUDE, messages=USER, max_tokens=MAX))
    assert [r.json["model"] for r in fake_provider.requests] == [CLAUDE, CLAUDE]
    assert guard.status()[0].reserved == 0


async def test_anthropic_degrades_to_a_claude_fallback(kind, fake_provider, guarded):
    """``messages.create`` degrades to the Claude fallback past the threshold."""
    fake_provider.usage = FakeUsage(input_tokens=20_000, output_tokens=5_000)
    sonnet = "claude-sonnet-4-6"
    client, guard = guarded(
        "anthropic", kind, "wrap", "$0.20", fallback=CLAUDE, threshold=0.5
    )
    first = await aw(
        client.messages.create(model=sonnet, messages=USER, max_tokens=MAX)
    )
    second = await aw(
        client.messages.create(model=sonnet, messages=USER, max_tokens=MAX)
    )
    assert first.model == sonnet
    assert second.model == CLAUDE
    assert [r.json["model"] for r in fake_provider.requests] == [sonnet, CLAUDE]
    record = guard.ledger.calls()[-1]
    assert (record.requested_model, record.model, record.outcome) == (
        sonnet,
        CLAUDE,
        "degraded",
    )


@pytest.fixture
def azure(fake_provider):
    """Azure's routing in front of the fake provider: the URL's deployment answers.

    ``/openai/deployments/{name}/chat/completions`` is answered by the model
    ``name``, whatever the body's ``model`` says (as Azure does). Each request's
    path and body model is kept in ``azure.seen``.
    """
    seen: list[tuple[str, str]] = []

    def answer(path: str, raw: bytes) -> tuple[int, bytes]:
        body = json.loads(raw)
        seen.append((path.partition("?")[0], body["model"]))
        body["model"] = path.split("/deployments/", 1)[1].partition("/")[0]
        request = urllib.request.Request(  # noqa: S310 - the fake, on loopback
            fake_provider.openai_base_url + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return 200, response.read()

    server = Loopback(answer)
    server.seen = seen
    yield server
    server.stop()


def _azure_options(proxy, **options):
    return {"base_url": None, "azure_endpoint": proxy.url, **options}


async def test_a_fixed_azure_deployment_cannot_degrade(
    kind, mode, fake_provider, azure, guarded, *, caplog
):
    """``azure_deployment=`` fixes the model in the URL: past the gate, refused.

    Azure answers with the URL's deployment whatever the body says, so the
    fallback cannot be sent: below the degrade threshold the call goes as
    asked; past it, it is refused unsent, the violation naming the threshold's
    amount as its limit (a fallback that does not fit is refused the same way).
    If this fails with a second request whose body asks for gpt-4o-mini: the
    call was admitted at the fallback's worst case and gpt-4o answered it.
    """
    fake_provider.usage = HEAVY
    client, guard = guarded(
        "azure",
        kind,
        mode,
        "$0.10",
        client_options=_azure_options(azure, azure_deployment=GPT),
        fallback=MINI,
        threshold=0.5,
    )
    first = await aw(
        client.chat.completions.create(
            model=GPT, messages=USER, max_completion_tokens=MAX
        )
    )
    assert first.model == GPT
    with (
        caplog.at_level("WARNING", logger="allowance"),
        pytest.raises(allowance.BudgetExceeded) as caught,
    ):
        await aw(
            client.chat.completions.create(
                model=GPT, messages=USER, max_completion_tokens=MAX
            )
        )
    assert azure.seen == [(f"/openai/deployments/{GPT}/chat/completions", GPT)]
    (violation,) = caught.value.violations
    assert (violation.used, violation.limit) == (HEAVY_GPT, BUDGET_MICROS // 2)
    assert "cannot degrade" in caplog.text
    assert [(r.outcome, r.model) for r in guard.ledger.calls()] == [
        ("ok", GPT),
        ("blocked", GPT),
    ]
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (HEAVY_GPT, 0)


async def test_an_azure_client_without_a_deployment_degrades_by_its_url(
    kind, mode, fake_provider, azure, guarded
):
    """Without ``azure_deployment=`` the SDK puts the body's model in the URL.

    Past the threshold both name the fallback's deployment, which answers.
    """
    fake_provider.usage = HEAVY
    client, guard = guarded(
        "azure",
        kind,
        mode,
        "$0.10",
        client_options=_azure_options(azure),
        fallback=MINI,
        threshold=0.5,
    )
    for _ in range(2):
        await aw(
            client.chat.completions.create(
                model=GPT, messages=USER, max_completion_tokens=MAX
            )
        )
    assert azure.seen == [
        (f"/openai/deployments/{GPT}/chat/completions", GPT),
        (f"/openai/deployments/{MINI}/chat/completions", MINI),
    ]
    first, second = guard.ledger.calls()
    assert (first.outcome, first.model) == ("ok", GPT)
    assert (second.outcome, second.requested_model, second.model) == (
        "degraded",
        GPT,
        MINI,
    )
