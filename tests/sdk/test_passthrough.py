"""Endpoints that generate nothing pass through: never charged, never blocked.

Even on an exhausted budget, listing models and counting tokens go out, come
back as the SDK's own objects and leave no record in the call log.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.sdk.conftest import CLAUDE, GPT, USER, aw

import allowance

CALLS: dict[str, tuple[str, Any, str]] = {
    "openai models.list": ("openai", lambda c: c.models.list(), "/models"),
    "openai models.retrieve": (
        "openai",
        lambda c: c.models.retrieve(GPT),
        f"/models/{GPT}",
    ),
    "openai responses.input_tokens.count": (
        "openai",
        lambda c: c.responses.input_tokens.count(model=GPT, input="Say hello."),
        "/responses/input_tokens",
    ),
    "anthropic models.list": ("anthropic", lambda c: c.models.list(), "/models"),
    "anthropic messages.count_tokens": (
        "anthropic",
        lambda c: c.messages.count_tokens(model=CLAUDE, messages=USER),
        "/messages/count_tokens",
    ),
    "anthropic beta.messages.count_tokens": (
        "anthropic",
        lambda c: c.beta.messages.count_tokens(model=CLAUDE, messages=USER),
        "/messages/count_tokens",
    ),
}


@pytest.mark.parametrize("name", list(CALLS))
async def test_non_generation_endpoint_passes_an_exhausted_budget(
    name, kind, mode, fake_provider, guarded
):
    """A 1-token budget blocks every generation, yet these calls go through.

    If this fails with ``BudgetExceeded``: the endpoint was taken for a
    billable one (e.g. ``/v1/messages/count_tokens`` matched as ``/messages``).
    """
    sdk, call, path = CALLS[name]
    client, guard = guarded(sdk, kind, mode, 1)
    result = await aw(call(client))
    if hasattr(result, "__aiter__"):  # an async page: iterate it
        items = [item async for item in result]
    elif hasattr(result, "data"):
        items = list(result.data)
    else:
        items = [result]
    assert items
    assert fake_provider.count(path) == 1
    assert fake_provider.generation_count == 0
    assert guard.ledger.calls() == []
    (status,) = guard.status()
    assert (status.spent, status.reserved) == (0, 0)


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_generation_on_the_same_exhausted_budget_is_blocked(
    sdk, kind, fake_provider, guarded
):
    """Control for the test above: the same budget does block a generation."""
    client, _ = guarded(sdk, kind, "wrap", 1)
    if sdk == "openai":
        call = client.chat.completions.create
        body: dict[str, Any] = {"model": GPT, "messages": USER}
    else:
        call = client.messages.create
        body = {"model": CLAUDE, "messages": USER, "max_tokens": 8}
    with pytest.raises(allowance.BudgetExceeded):
        await aw(call(**body))
    assert len(fake_provider.requests) == 0
