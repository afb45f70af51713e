"""Concurrent calls on the real SDKs never overspend.

The budget fits exactly 10 calls: 10 times the call's worst case, and the fake
provider reports exactly the worst case as usage, so no commit frees room for
an 11th. Whether 100 calls race from asyncio tasks, threads or 4 processes on
one SQLite file, exactly 10 reach the provider and nothing stays reserved.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import runpy
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.sdk import _spawn_worker
from tests.sdk.conftest import CLAUDE, MINI, USER, aw

import allowance
from allowance._sdk import anthropic as anthropic_sdk
from allowance._sdk import openai as openai_sdk
from allowance.testing import FakeUsage

FITS = 10
CALLS = 100
BODIES = {
    "openai": {"model": MINI, "messages": USER, "max_completion_tokens": 50},
    "anthropic": {"model": CLAUDE, "messages": USER, "max_tokens": 50},
}


def worst(sdk: str) -> allowance.Estimate:
    if sdk == "openai":
        return openai_sdk.CODEC.estimate("/chat/completions", BODIES[sdk])
    return anthropic_sdk.CODEC.estimate("/v1/messages", BODIES[sdk])


def call(client, sdk: str):
    if sdk == "openai":
        return client.chat.completions.create(**BODIES[sdk])
    return client.messages.create(**BODIES[sdk])


def report_worst_case(fake, sdk: str) -> int:
    """Make the fake report exactly the worst case; return the budget for 10 calls."""
    est = worst(sdk)
    fake.usage = FakeUsage(
        input_tokens=est.input_tokens, output_tokens=est.output_tokens
    )
    return FITS * est.total_tokens


def assert_exactly_ten(guard: allowance.Guard, fake, limit: int, outcomes) -> None:
    (status,) = guard.status()
    assert fake.generation_count == FITS
    assert outcomes.count(True) == FITS
    assert outcomes.count(False) == CALLS - FITS
    assert status.limit == limit
    assert status.spent == limit  # each admitted call was charged its worst case
    assert status.spent <= status.limit
    assert status.reserved == 0


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_concurrent_async_calls_never_overspend(sdk, fake_provider, clients):
    """100 ``asyncio.gather``-ed calls on one async client: exactly 10 go out."""
    limit = report_worst_case(fake_provider, sdk)
    fake_provider.latency = 0.05  # keep the admitted calls in flight together
    client = allowance.wrap(clients(sdk, "async"), limit, ledger="memory://")

    async def one() -> bool:
        try:
            await aw(call(client, sdk))
        except allowance.BudgetExceeded:
            return False
        return True

    outcomes = await asyncio.wait_for(
        asyncio.gather(*(one() for _ in range(CALLS))), 60
    )
    assert_exactly_ten(client.allowance.guard, fake_provider, limit, list(outcomes))


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_concurrent_threads_never_overspend(
    sdk, ledger, fake_provider, clients, tmp_path
):
    """100 threads on one sync client: exactly 10 go out."""
    limit = report_worst_case(fake_provider, sdk)
    fake_provider.latency = 0.05
    url = "memory://" if ledger == "memory" else f"sqlite:///{tmp_path / 'threads.db'}"
    client = allowance.wrap(clients(sdk, "sync"), limit, ledger=url)

    def one(_: int) -> bool:
        try:
            call(client, sdk)
        except allowance.BudgetExceeded:
            return False
        return True

    with ThreadPoolExecutor(CALLS) as pool:
        outcomes = list(pool.map(one, range(CALLS), timeout=60))
    assert_exactly_ten(client.allowance.guard, fake_provider, limit, outcomes)
    client.allowance.guard.close()


@pytest.mark.slow
def test_processes_on_one_sqlite_file_never_overspend(fake_provider, tmp_path):
    """4 spawned processes, each wrapping its own client on the same session.

    They share the budget through one SQLite file: 25 calls each (5 threads),
    100 in all, exactly 10 reach the provider.
    """
    limit = report_worst_case(fake_provider, "openai")
    fake_provider.latency = 0.02
    ledger = f"sqlite:///{tmp_path / 'shared.db'}"
    session = f"shared-{uuid.uuid4().hex}"
    ctx = multiprocessing.get_context("spawn")
    processes = 4
    barrier = ctx.Barrier(processes)
    outs = [tmp_path / f"worker-{i}.txt" for i in range(processes)]
    workers = [
        ctx.Process(
            target=runpy.run_path,
            args=(_spawn_worker.__file__,),
            kwargs={
                "run_name": _spawn_worker.RUN_NAME,
                "init_globals": {
                    "PARAMS": {
                        "base_url": fake_provider.openai_base_url,
                        "ledger": ledger,
                        "session": session,
                        "limit": limit,
                        "body": BODIES["openai"],
                        "calls": CALLS // processes,
                        "threads": 5,
                        "barrier": barrier,
                        "out": str(out),
                    }
                },
            },
        )
        for out in outs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    for worker in workers:
        if worker.is_alive():  # pragma: no cover - a wedged child
            worker.kill()
            worker.join(5)
    assert [w.exitcode for w in workers] == [0] * processes

    ok, blocked = (
        sum(int(Path(o).read_text().split()[i]) for o in outs) for i in (0, 1)
    )
    assert (ok, blocked) == (FITS, CALLS - FITS)
    assert fake_provider.generation_count == FITS
    guard = allowance.Guard(budget=limit, ledger=ledger, scope={"session": session})
    (status,) = guard.status()
    assert status.spent == limit
    assert status.reserved == 0
    outcomes = [r.outcome for r in guard.ledger.calls()]
    assert outcomes.count("ok") == FITS
    assert outcomes.count("blocked") == CALLS - FITS
    guard.close()
