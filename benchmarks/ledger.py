"""Ledger throughput: µs per reserve+commit pair, and pairs/s across processes.

Usage: ``uv run noxfile.py -s bench`` (or ``python benchmarks/ledger.py``).

1. One process: µs per pair on each ledger, sync and async, 1 and 3 keys
   (best of several runs of N pairs).
2. Several client processes (1, 4, 8) on one SQLite file and one Redis server,
   each pair holding a budget every process shares (``tenant``) and one of its
   own (``session``): pairs per second, all processes together.

Redis runs on a throwaway ``redis-server`` (on ``PATH``) on a free local port,
with persistence off; the figures are skipped without one.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import multiprocessing
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from allowance import open_ledger
from allowance.testing import RedisServer
from allowance.typing import Ledger, ReserveItem

if TYPE_CHECKING:
    from collections.abc import Callable

RUNS, N = 7, 2000
_ids = itertools.count()


def _plans(keys: int) -> tuple[list[list[ReserveItem]], dict[str, int]]:
    names = [f"usd:tenant=t{j}" for j in range(keys)]
    return [[ReserveItem(k, 1, 10**15) for k in names]], dict.fromkeys(names, 1)


def sync_pairs(ledger: Ledger, keys: int) -> float:
    plans, amounts = _plans(keys)
    start = time.perf_counter()
    for _ in range(N):
        rid = f"b{next(_ids)}-{uuid.uuid4().hex[:8]}"
        ledger.reserve(plans, reservation_id=rid, lease_seconds=60)
        ledger.commit(rid, amounts)
    return (time.perf_counter() - start) / N * 1e6


async def async_pairs(ledger: Ledger, keys: int) -> float:
    plans, amounts = _plans(keys)
    start = time.perf_counter()
    for _ in range(N // 2):
        rid = f"b{next(_ids)}-{uuid.uuid4().hex[:8]}"
        await ledger.areserve(plans, reservation_id=rid, lease_seconds=60)
        await ledger.acommit(rid, amounts)
    return (time.perf_counter() - start) / (N // 2) * 1e6


def run_async_pairs(ledger: Ledger, keys: int) -> float:
    return asyncio.run(async_pairs(ledger, keys))


def best(run: Callable[[], float]) -> float:
    run()
    return min(run() for _ in range(RUNS))


def one_process(urls: list[tuple[str, str]]) -> Table:
    table = Table(title="One process: µs per reserve+commit pair (best of runs)")
    for column in ("ledger", "keys", "sync", "async", "pairs/s (sync)"):
        table.add_column(column, justify="left" if column == "ledger" else "right")
    for name, url in urls:
        ledger = open_ledger(url)
        for keys in (1, 3):
            sync = best(functools.partial(sync_pairs, ledger, keys))
            asyn = best(functools.partial(run_async_pairs, ledger, keys))
            table.add_row(
                name, str(keys), f"{sync:.1f}", f"{asyn:.1f}", f"{1e6 / sync:,.0f}"
            )
        ledger.close()
    return table


def _client(url: str, pairs: int, start: Any, results: Any) -> None:
    """One client process: ``pairs`` reserve+commit pairs, timed from ``start``."""
    ledger = open_ledger(url)
    session = uuid.uuid4().hex
    plan = [
        [
            ReserveItem("usd:tenant=shared", 1, 10**15),
            ReserveItem(f"usd:session={session}", 1, 10**15),
        ]
    ]
    amounts = {"usd:tenant=shared": 1, f"usd:session={session}": 1}
    ledger.state(["usd:tenant=shared"])  # connected before the clock starts
    start.wait()
    began = time.perf_counter()
    for i in range(pairs):
        rid = f"{session}-{i}"
        ledger.reserve(plan, reservation_id=rid, lease_seconds=60)
        ledger.commit(rid, amounts)
    results.put((began, time.perf_counter()))
    ledger.close()


def processes(url: str, count: int, seconds: float) -> float:
    """Pairs per second of ``count`` processes together."""
    context = multiprocessing.get_context("spawn")
    # Enough pairs per process for about ``seconds`` of work.
    probe = open_ledger(url)
    rid = uuid.uuid4().hex
    began = time.perf_counter()
    for i in range(200):
        probe.reserve(
            [[ReserveItem("probe", 1, 10**15)]],
            reservation_id=f"{rid}-{i}",
            lease_seconds=60,
        )
        probe.commit(f"{rid}-{i}", {"probe": 1})
    rate = 200 / (time.perf_counter() - began)
    probe.close()
    pairs = max(200, int(rate * seconds / count))
    start = context.Barrier(count)
    results = context.Queue()
    workers = [
        context.Process(target=_client, args=(url, pairs, start, results))
        for _ in range(count)
    ]
    for worker in workers:
        worker.start()
    spans = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    wall = max(end for _, end in spans) - min(begin for begin, _ in spans)
    return float(pairs * count / wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--processes", default="1,4,8")
    args = parser.parse_args()
    console = Console()
    counts = [int(n) for n in args.processes.split(",")]
    redis = RedisServer().start() if RedisServer.available() else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            urls = [("memory", "memory://"), ("SQLite", f"sqlite:///{tmp}/b.db")]
            if redis is not None:
                urls.append(("Redis", f"{redis.url}?prefix=bench-{uuid.uuid4().hex}"))
            console.print(one_process(urls))
            table = Table(
                title="Reserve+commit pairs/s, all client processes together"
                " (2 keys a pair: one shared, one per process)"
            )
            table.add_column("ledger")
            for count in counts:
                table.add_column(
                    f"{count} process{'es' if count > 1 else ''}", justify="right"
                )
            for name, url in urls[1:]:
                shared = f"sqlite:///{tmp}/multi.db" if name == "SQLite" else url
                open_ledger(shared).close()  # a SQLite schema exists before the race
                rates = [processes(shared, count, args.seconds) for count in counts]
                table.add_row(name, *(f"{rate:,.0f}" for rate in rates))
            console.print(table)
    finally:
        if redis is not None:
            redis.close()


if __name__ == "__main__":
    main()
