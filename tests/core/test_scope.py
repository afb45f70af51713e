"""Scopes nest, merge and follow tasks and copied-context threads."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

import allowance
from allowance import current_scope, scope


def test_scopes_nest_and_inner_values_win() -> None:
    with scope(tenant="acme", user="u1"):
        with scope(user="u2", run=17):
            assert dict(current_scope()) == {
                "tenant": "acme",
                "user": "u2",
                "run": "17",
            }
        assert dict(current_scope()) == {"tenant": "acme", "user": "u1"}
    assert dict(current_scope()) == {}


def test_scope_is_a_decorator_for_sync_and_async() -> None:
    @scope(tenant="t1")
    def sync() -> dict[str, str]:
        return dict(current_scope())

    @scope(tenant="t2")
    async def run_async() -> dict[str, str]:
        await asyncio.sleep(0)
        return dict(current_scope())

    assert sync() == {"tenant": "t1"}
    assert asyncio.run(run_async()) == {"tenant": "t2"}
    assert dict(current_scope()) == {}


def test_scope_follows_tasks_without_leaking_between_them() -> None:
    async def worker(name: str) -> dict[str, str]:
        with scope(agent=name):
            await asyncio.sleep(0.001)
            return dict(current_scope())

    async def main() -> list[dict[str, str]]:
        with scope(tenant="acme"):
            return await asyncio.gather(*(worker(f"a{i}") for i in range(20)))

    results = asyncio.run(main())
    assert results == [{"tenant": "acme", "agent": f"a{i}"} for i in range(20)]


def test_scope_follows_copied_context_threads() -> None:
    with scope(tenant="acme"), ThreadPoolExecutor(4) as pool:
        ctx = contextvars.copy_context()
        seen = pool.submit(ctx.run, lambda: dict(current_scope())).result()
        plain = pool.submit(lambda: dict(current_scope())).result()
    assert seen == {"tenant": "acme"}
    assert plain == {}  # a thread without a copied context starts empty


def test_to_thread_copies_the_context() -> None:
    async def main() -> dict[str, str]:
        with scope(user="u"):
            return await asyncio.to_thread(lambda: dict(current_scope()))

    assert asyncio.run(main()) == {"user": "u"}


def test_budget_decorator_gives_each_invocation_a_fresh_dimension() -> None:
    seen: list[str] = []

    @allowance.budget("$0.10")
    def handle() -> None:
        seen.append(current_scope()["invocation"])

    handle()
    handle()
    assert len(set(seen)) == 2
    assert "invocation" not in current_scope()


def test_budget_is_also_a_context_manager() -> None:
    with allowance.budget(100) as inner:
        assert "invocation" in inner
    assert "invocation" not in current_scope()


def test_budget_decorator_on_coroutines_gives_each_call_its_own_budget() -> None:
    guard = allowance.Guard(ledger="memory://")

    @allowance.budget(250)
    async def handle() -> int:
        calls = 0
        for _ in range(10):
            try:
                ticket = await guard.abegin(
                    allowance.Estimate("openai", "gpt-4o", 100, 0)
                )
            except allowance.BudgetExceeded:
                break
            await ticket.acommit(allowance.Usage(100, 0))
            calls += 1
        return calls

    async def main() -> list[int]:
        return await asyncio.gather(handle(), handle(), handle())

    assert asyncio.run(main()) == [2, 2, 2]
