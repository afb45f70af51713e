"""Reserve+commit pairs per second on each ledger, sync and async, 1 and 3 keys.

Usage: ``uv run noxfile.py -s bench`` (or ``python benchmarks/ledger.py``).
Each figure is the best of several runs of N pairs, in microseconds per pair.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from allowance import open_ledger
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
        rid = f"b{next(_ids)}"
        ledger.reserve(plans, reservation_id=rid, lease_seconds=60)
        ledger.commit(rid, amounts)
    return (time.perf_counter() - start) / N * 1e6


async def async_pairs(ledger: Ledger, keys: int) -> float:
    plans, amounts = _plans(keys)
    start = time.perf_counter()
    for _ in range(N // 2):
        rid = f"b{next(_ids)}"
        await ledger.areserve(plans, reservation_id=rid, lease_seconds=60)
        await ledger.acommit(rid, amounts)
    return (time.perf_counter() - start) / (N // 2) * 1e6


def best(run: Callable[[], float]) -> float:
    run()
    return min(run() for _ in range(RUNS))


def main() -> None:
    table = Table(title="Ledger: µs per reserve+commit pair (best of runs)")
    for column in ("ledger", "keys", "sync", "async", "pairs/s (sync)"):
        table.add_column(column, justify="left" if column == "ledger" else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in (("memory", "memory://"), ("SQLite", f"sqlite:///{tmp}/b.db")):
            ledger = open_ledger(url)
            for keys in (1, 3):
                sync = best(lambda ledger=ledger, keys=keys: sync_pairs(ledger, keys))
                asyn = best(
                    lambda ledger=ledger, keys=keys: asyncio.run(
                        async_pairs(ledger, keys)
                    )
                )
                table.add_row(
                    name, str(keys), f"{sync:.1f}", f"{asyn:.1f}", f"{1e6 / sync:,.0f}"
                )
            ledger.close()
    Console().print(table)


if __name__ == "__main__":
    main()
