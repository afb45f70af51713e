"""``patch()`` / ``unpatch()`` on the real SDK classes, and ``wrap`` beside them.

``patch()`` wraps ``SyncAPIClient.request`` and ``AsyncAPIClient.request`` of
each SDK's ``_base_client``: clients built before it are covered, ``unpatch()``
puts the identical function objects back, and a call is charged once however
many layers see it.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import anthropic
import anthropic._base_client
import openai
import openai._base_client
import pytest
from tests.sdk.conftest import CLAUDE, GPT, USER, aw, expected_charge

import allowance
from allowance.testing import FakeUsage

USAGE = FakeUsage(input_tokens=40, output_tokens=9)
BASES = {"openai": openai._base_client, "anthropic": anthropic._base_client}
CLASSES = ("SyncAPIClient", "AsyncAPIClient")


def originals() -> dict[tuple[str, str], object]:
    return {
        (sdk, cls): getattr(base, cls).__dict__["request"]
        for sdk, base in BASES.items()
        for cls in CLASSES
    }


async def generate(client, sdk: str) -> None:
    if sdk == "openai":
        await aw(client.chat.completions.create(model=GPT, messages=USER))
    else:
        await aw(client.messages.create(model=CLAUDE, messages=USER, max_tokens=64))


def one_charge(sdk: str) -> int:
    model = GPT if sdk == "openai" else CLAUDE
    return expected_charge("usd", sdk, model, allowance.Usage(40, 9))


SDKS = ["openai", "anthropic"]


@pytest.mark.parametrize("sdk", SDKS)
async def test_clients_built_before_patch_are_covered(
    sdk, kind, fake_provider, clients
):
    """A client built before ``patch()`` is charged, and blocked at the limit."""
    fake_provider.usage = USAGE
    before = clients(sdk, kind)
    guard = allowance.patch("$5", ledger="memory://")
    await generate(before, sdk)
    assert guard.status()[0].spent == one_charge(sdk)

    allowance.patch(1, ledger="memory://")  # replace the guard: now nothing fits
    with pytest.raises(allowance.BudgetExceeded):
        await generate(before, sdk)
    assert fake_provider.generation_count == 1


async def test_unpatch_restores_the_identical_functions(kind, fake_provider, clients):
    """After ``unpatch()`` each ``request`` is the very object it was before.

    Also after patching twice, and over several cycles; calls are then free.
    """
    fake_provider.usage = USAGE
    before = originals()
    for _ in range(3):
        guard = allowance.patch("$5", ledger="memory://")
        allowance.patch(guard=guard)
        patched = originals()
        assert all(patched[key] is not before[key] for key in before)
        allowance.unpatch()
        after = originals()
        for key, original in before.items():
            assert after[key] is original, key
    allowance.unpatch()  # a second unpatch is a no-op
    assert originals() == before

    for sdk in SDKS:
        await generate(clients(sdk, kind), sdk)
    assert guard.ledger.calls() == []
    assert allowance.active_guard() is None


@pytest.mark.parametrize("sdk", SDKS)
async def test_patch_twice_charges_once(sdk, kind, fake_provider, clients):
    """Patching again swaps the guard; it does not stack a second wrapper."""
    fake_provider.usage = USAGE
    guard = allowance.Guard(budget="$5", ledger="memory://")
    allowance.patch(guard=guard)
    allowance.patch(guard=guard)
    client = clients(sdk, kind)
    await generate(client, sdk)
    await generate(client, sdk)
    assert len(guard.ledger.calls()) == 2
    assert guard.status()[0].spent == 2 * one_charge(sdk)

    first = allowance.Guard(budget="$5", ledger="memory://")
    second = allowance.Guard(budget="$5", ledger="memory://")
    allowance.patch(guard=first)
    allowance.patch(guard=second)
    await generate(client, sdk)
    assert first.ledger.calls() == []
    assert len(second.ledger.calls()) == 1


@pytest.mark.parametrize("order", ["wrap-then-patch", "patch-then-wrap"])
@pytest.mark.parametrize("sdk", SDKS)
async def test_wrapped_client_under_patch_is_charged_once(
    sdk, order, kind, fake_provider, clients
):
    """One call through ``wrap`` and ``patch`` on one ledger: one record, one charge.

    If this fails with 2 records: both layers charged; the claim in the
    context variable did not reach the inner layer.
    """
    fake_provider.usage = USAGE
    ledger = f"memory://sdk-once-{uuid.uuid4().hex}"
    client = clients(sdk, kind)
    if order == "wrap-then-patch":
        allowance.wrap(client, "$5", ledger=ledger)
        allowance.patch("$5", ledger=ledger)
    else:
        allowance.patch("$5", ledger=ledger)
        allowance.wrap(client, "$5", ledger=ledger)
    for _ in range(3):
        await generate(client, sdk)
    calls = client.allowance.guard.ledger.calls()
    assert len(calls) == 3
    assert len({r.call_id for r in calls}) == 3
    # The wrap guard is the client's own budget: it holds every charge.
    assert client.allowance.status()[0].spent == 3 * one_charge(sdk)
    assert fake_provider.generation_count == 3


@pytest.mark.parametrize("sdk", SDKS)
async def test_shared_guard_for_wrap_and_patch_charges_once(
    sdk, kind, fake_provider, clients
):
    """``wrap(client, guard=g)`` under ``patch(guard=g)``: one record per call."""
    fake_provider.usage = USAGE
    guard = allowance.Guard(budget="$5", ledger="memory://")
    allowance.patch(guard=guard)
    client = allowance.wrap(clients(sdk, kind), guard=guard)
    await generate(client, sdk)
    (record,) = guard.ledger.calls()
    assert record.adapters.count(sdk) == 1


async def test_isinstance_is_preserved(kind, fake_provider, clients):
    """Wrapped and patched clients keep their type (OpenAI, AzureOpenAI, Anthropic)."""
    allowance.patch("$5", ledger="memory://")
    sync = kind == "sync"
    cases = [
        ("openai", openai.OpenAI if sync else openai.AsyncOpenAI),
        ("azure", openai.AzureOpenAI if sync else openai.AsyncAzureOpenAI),
        ("anthropic", anthropic.Anthropic if sync else anthropic.AsyncAnthropic),
    ]
    for sdk, cls in cases:
        client = clients(sdk, kind)
        wrapped = allowance.wrap(client, "$5", ledger="memory://")
        assert wrapped is client
        assert type(wrapped) is cls
        assert isinstance(wrapped, cls)
        copy = wrapped.with_options(timeout=5.0)
        assert type(copy) is cls
    azure = clients("azure", kind)
    assert isinstance(azure, openai.OpenAI if sync else openai.AsyncOpenAI)


@pytest.mark.parametrize("sdk", SDKS)
async def test_of_reads_a_wrapped_client_and_names_one_that_is_not(
    sdk, kind, fake_provider, clients
):
    """``allowance.of(client)`` is ``client.allowance``, typed, on copies too.

    A client never wrapped, or unwrapped since, gets a ``UsageError`` that
    names its class and says what was expected; so does a patched one.
    """
    fake_provider.usage = USAGE
    plain = clients(sdk, kind)
    with pytest.raises(allowance.UsageError, match="is not wrapped") as info:
        allowance.of(plain)
    assert type(plain).__qualname__ in str(info.value)
    assert info.value.value is plain
    assert info.value.expected == "a client returned by allowance.wrap()"

    client = allowance.wrap(plain, "$5", ledger="memory://")
    view = allowance.of(client)
    assert view is client.allowance
    assert isinstance(view, allowance.ClientAllowance)
    assert allowance.of(client.with_options(timeout=30.0)) is view
    await generate(client, sdk)
    micros = view.status()[0].spent
    assert micros > 0
    assert view.spent == Decimal(micros) / 1_000_000

    allowance.unwrap(client)
    with pytest.raises(allowance.UsageError, match="is not wrapped"):
        allowance.of(client)
    allowance.patch(budget="$5", ledger="memory://")
    with pytest.raises(allowance.UsageError, match=r"allowance\.active_guard\(\)"):
        allowance.of(clients(sdk, kind))


@pytest.mark.parametrize("value", [None, 42, "client", object()])
def test_of_rejects_what_is_not_a_client(value):
    """``allowance.of`` of anything else names its type, without an AttributeError."""
    with pytest.raises(allowance.UsageError, match=type(value).__qualname__):
        allowance.of(value)


@pytest.mark.parametrize("sdk", SDKS)
async def test_unwrap_frees_the_client(sdk, kind, fake_provider, clients):
    """``unwrap`` removes the client's guard: calls are neither blocked nor charged."""
    client = allowance.wrap(clients(sdk, kind), 1, ledger="memory://")
    guard = client.allowance.guard
    with pytest.raises(allowance.BudgetExceeded):
        await generate(client, sdk)
    allowance.unwrap(client)
    assert "request" not in vars(client)
    await generate(client, sdk)
    assert fake_provider.generation_count == 1
    assert [r.outcome for r in guard.ledger.calls()] == ["blocked"]


@pytest.mark.parametrize("sdk", SDKS)
async def test_wrapping_again_replaces_the_guard(sdk, kind, fake_provider, clients):
    """A wrapped client wrapped again is charged once, to the new guard only."""
    client = clients(sdk, kind)
    first = allowance.wrap(client, 1, ledger="memory://")
    old = allowance.of(first).guard
    again = allowance.wrap(client, budget="$5", ledger="memory://")
    assert again is client
    await generate(client, sdk)  # 1 token would refuse it: the old guard is gone
    assert fake_provider.generation_count == 1
    assert allowance.of(client).guard is not old
    assert [r.outcome for r in allowance.of(client).guard.ledger.calls()] == ["ok"]
    assert old.ledger.calls() == []
