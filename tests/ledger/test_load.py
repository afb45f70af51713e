"""Load: 4 processes x 8 async workers, 2,000 calls against a budget that fits 500.

The fake provider answers in 10-100 ms and fails 5% of the calls with HTTP
500 (the SDK does not retry them; the guard releases their reservation). Every
call reserves its worst case E and, when it succeeds, is charged exactly E,
so the budget of 500 x E fits exactly 500 successful calls. A call refused
while other calls are in flight may still fit once one of those fails and
releases its hold, so a refused call is tried again until the committed spend
alone leaves no room for it: then it is refused for good.

What must hold, on SQLite and on Redis: exactly 500 generations succeed,
every request that reached the provider is one of those or a 500, committed
spend is the limit (never above), and nothing stays reserved.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import openai
import pytest

import allowance
from allowance._ledger import open_ledger
from allowance.testing import FakeProvider, FakeUsage

pytestmark = pytest.mark.slow

# A fork server that imported the SDKs and allowance once (``wrap`` imports
# both SDKs): four fresh interpreters importing them at once take ~20 s on a
# 2-core machine.
# Its children unpickle this module's worker by name (``tests.ledger.test_load``):
# make the repository root importable there, as ``python -m pytest`` does but
# the ``pytest`` script (nox, CI) with importlib mode does not.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
SPAWN = multiprocessing.get_context("forkserver")
SPAWN.set_forkserver_preload(
    ["openai", "anthropic", "allowance", "genai_prices.data_snapshot", "redis.asyncio"]
)
PROCESSES, WORKERS, CALLS, FITS = 4, 8, 2_000, 500
MESSAGES = [{"role": "user", "content": "Count to three."}]
MODEL = "gpt-4o-mini"
DEADLINE = 60.0


def _worker_process(results, **job) -> None:
    """One client process: 8 async workers share ``calls`` calls."""
    # No exact token counting: every call reserves the same bound E.
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    counts = asyncio.run(_run_workers(**job))
    results.put(counts)


async def _run_workers(
    *,
    base_url: str,
    ledger: str,
    session: str,
    limit: int,
    cost: int,
    calls: int,
    start,
) -> dict[str, int]:
    client = allowance.wrap(
        openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0),
        budget=limit,
        session=session,
        ledger=ledger,
    )
    guard = client.allowance.guard
    counts: Counter[str] = Counter()
    left = [calls]
    deadline = time.monotonic() + DEADLINE

    async def one() -> str:
        while time.monotonic() < deadline:
            try:
                await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=20
                )
            except openai.InternalServerError:
                return "failed"
            except allowance.BudgetExceeded:
                if guard.status()[0].spent + cost > limit:
                    return "refused"  # committed spend alone leaves no room
                counts["retried"] += 1
                await asyncio.sleep(0.005)  # a call in flight may release
                continue
            return "ok"
        return "timed_out"

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            counts[await one()] += 1

    await asyncio.to_thread(start.wait, 60)
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    await client.close()
    guard.close()
    return dict(counts)


def _worst_case_tokens(fake: FakeProvider) -> int:
    """The E every call reserves, read from the call log of one probe call."""
    probe = allowance.wrap(
        openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0),
        budget=10**9,
        ledger="memory://",
    )
    probe.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    [call] = probe.allowance.guard.ledger.calls()
    probe.close()
    return call.estimate_tokens


def _run_load(url: str) -> None:
    with FakeProvider() as fake:
        cost = _worst_case_tokens(fake)
        fake.usage = FakeUsage(input_tokens=cost - 20, output_tokens=20)
        fake.latency = (0.01, 0.1)
        fake.error_rate = 0.05
        fake.reset()
        limit = FITS * cost
        session = f"load-{uuid.uuid4().hex}"
        start = SPAWN.Barrier(PROCESSES)
        results = SPAWN.Queue()
        processes = [
            SPAWN.Process(
                target=_worker_process,
                args=(results,),
                kwargs={
                    "base_url": fake.openai_base_url,
                    "ledger": url,
                    "session": session,
                    "limit": limit,
                    "cost": cost,
                    "calls": CALLS // PROCESSES,
                    "start": start,
                },
            )
            for _ in range(PROCESSES)
        ]
        for process in processes:
            process.start()
        totals: Counter[str] = Counter()
        for _ in processes:
            totals.update(results.get(timeout=DEADLINE + 30))
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
        results.close()
        results.join_thread()
        generations = fake.generation_count

    print(f"\n{url.partition(':')[0]} load: E={cost} tokens, {dict(totals)}")
    assert totals["timed_out"] == 0
    assert totals["ok"] + totals["failed"] + totals["refused"] == CALLS
    assert totals["ok"] == FITS  # exactly as many calls as fit succeeded
    assert generations == totals["ok"] + totals["failed"]
    ledger = open_ledger(url)
    try:
        [(_, state)] = [
            (k, s) for k, s in ledger.keys().items() if k.endswith(f"session={session}")
        ]
        assert state.spent == limit  # committed <= limit, and all of it used
        assert state.reserved == 0
        outcomes = Counter(c.outcome for c in ledger.calls())
        assert outcomes["ok"] == FITS
        assert outcomes["error"] == totals["failed"]
    finally:
        ledger.close()


def test_load_on_redis(redis_url) -> None:
    _run_load(redis_url)


def test_load_on_sqlite(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'load.db'}"
    open_ledger(url).close()  # the schema exists before the race starts
    _run_load(url)
