"""Scopes attribute SDK calls: the tenant budget is charged, the call log says who.

``allowance.scope(tenant=...)`` lives in a context variable: it follows asyncio
tasks and threads started with ``contextvars.copy_context().run``; a thread
without the copied context does not inherit it.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from tests.sdk.conftest import CLAUDE, GPT, USER, aw, expected_charge

import allowance
from allowance.testing import FakeUsage

USAGE = FakeUsage(input_tokens=40, output_tokens=9)


def tenant_guard() -> allowance.Guard:
    return allowance.Guard(
        allowance.Policy([allowance.Budget("$1", per="tenant")]), ledger="memory://"
    )


def charge(sdk: str) -> int:
    model = GPT if sdk == "openai" else CLAUDE
    return expected_charge("usd", sdk, model, allowance.Usage(40, 9))


def generate_sync(client, sdk: str) -> None:
    if sdk == "openai":
        client.chat.completions.create(model=GPT, messages=USER)
    else:
        client.messages.create(model=CLAUDE, messages=USER, max_tokens=64)


async def generate(client, sdk: str) -> None:
    if sdk == "openai":
        await aw(client.chat.completions.create(model=GPT, messages=USER))
    else:
        await aw(client.messages.create(model=CLAUDE, messages=USER, max_tokens=64))


def spent(guard: allowance.Guard, tenant: str) -> int:
    (status,) = guard.status(scope={"tenant": tenant})
    assert status.key == f"usd:tenant={tenant}"
    assert status.reserved == 0
    return status.spent


SDKS = ["openai", "anthropic"]


@pytest.mark.parametrize("sdk", SDKS)
async def test_calls_are_charged_to_the_tenant_in_scope(
    sdk, kind, mode, fake_provider, clients
):
    """``with scope(tenant="acme")``: the tenant key is charged, the log says acme."""
    fake_provider.usage = USAGE
    guard = tenant_guard()
    client = clients(sdk, kind)
    if mode == "wrap":
        allowance.wrap(client, guard=guard)
    else:
        allowance.patch(guard=guard)

    with allowance.scope(tenant="acme"):
        await generate(client, sdk)
        with allowance.scope(run="r-1"):
            await generate(client, sdk)
    with allowance.scope(tenant="globex"):
        await generate(client, sdk)

    assert spent(guard, "acme") == 2 * charge(sdk)
    assert spent(guard, "globex") == charge(sdk)
    scopes = [dict(r.scope) for r in guard.ledger.calls()]
    assert scopes[0]["tenant"] == "acme"
    assert scopes[1] == {**scopes[1], "tenant": "acme", "run": "r-1"}
    assert scopes[2]["tenant"] == "globex"


@pytest.mark.parametrize("sdk", SDKS)
async def test_tenant_budget_blocks_only_its_tenant(sdk, kind, fake_provider, clients):
    """An exhausted tenant is blocked; another tenant on the same client is not."""
    guard = allowance.Guard(
        allowance.Policy([allowance.Budget(10, per="tenant")]), ledger="memory://"
    )
    client = allowance.wrap(clients(sdk, kind), guard=guard)
    with (
        allowance.scope(tenant="acme"),
        pytest.raises(allowance.BudgetExceeded) as caught,
    ):
        await generate(client, sdk)
    assert caught.value.violations[0].key == "tokens:tenant=acme"
    assert caught.value.violations[0].dimension == "tenant"
    assert fake_provider.generation_count == 0


@pytest.mark.parametrize("sdk", SDKS)
async def test_scope_follows_asyncio_tasks(sdk, fake_provider, clients):
    """Concurrent tasks, each in its own tenant scope, each charge their tenant."""
    fake_provider.usage = USAGE
    fake_provider.latency = 0.02  # let the tasks interleave
    guard = tenant_guard()
    client = allowance.wrap(clients(sdk, "async"), guard=guard)
    tenants = ["acme", "globex", "initech"]

    async def work(tenant: str, calls: int) -> None:
        with allowance.scope(tenant=tenant):
            await asyncio.gather(*(generate(client, sdk) for _ in range(calls)))

    await asyncio.gather(*(work(t, n) for n, t in enumerate(tenants, start=1)))

    for n, tenant in enumerate(tenants, start=1):
        assert spent(guard, tenant) == n * charge(sdk)
    by_tenant = [r.scope["tenant"] for r in guard.ledger.calls()]
    assert sorted(by_tenant) == ["acme", "globex", "globex", *["initech"] * 3]


@pytest.mark.parametrize("sdk", SDKS)
def test_scope_follows_copied_context_into_threads(sdk, fake_provider, clients):
    """``copy_context().run`` in a thread pool carries the scope; a bare thread not."""
    fake_provider.usage = USAGE
    guard = tenant_guard()
    client = allowance.wrap(clients(sdk, "sync"), guard=guard)

    with allowance.scope(tenant="acme"), ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(contextvars.copy_context().run, generate_sync, client, sdk)
            for _ in range(4)
        ]
        for future in futures:
            future.result(timeout=30)
        # Control: a thread that did not copy the context has no tenant.
        bare = threading.Thread(target=generate_sync, args=(client, sdk))
        bare.start()
        bare.join(timeout=30)
        assert not bare.is_alive()

    assert spent(guard, "acme") == 4 * charge(sdk)
    records = guard.ledger.calls()
    assert len(records) == 5
    assert sum(1 for r in records if r.scope.get("tenant") == "acme") == 4
    assert fake_provider.generation_count == 5


@pytest.mark.parametrize("sdk", SDKS)
async def test_scope_follows_to_thread(sdk, fake_provider, clients):
    """``asyncio.to_thread`` copies the context: a sync client there is attributed."""
    fake_provider.usage = USAGE
    guard = tenant_guard()
    client = allowance.wrap(clients(sdk, "sync"), guard=guard)
    with allowance.scope(tenant="acme"):
        await asyncio.to_thread(generate_sync, client, sdk)
    assert spent(guard, "acme") == charge(sdk)
    assert guard.ledger.calls()[0].scope["tenant"] == "acme"
