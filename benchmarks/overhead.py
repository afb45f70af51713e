"""What the guard adds to a call: raw SDK vs guarded, interleaved A/B, one process.

Usage: ``uv run noxfile.py -s bench`` (or ``python benchmarks/overhead.py -n 3000``).

Each round times one raw call and one guarded call (alternating which goes
first) against the fake provider with no delay, so both see the same machine
state. "added" is the median of the per-round differences of wall time,
"added CPU" the same for the calling thread's CPU time (``thread_time``: what
the guard itself costs, without the scheduling noise of a shared machine); p99
is the guarded call's 99th percentile. The Redis row runs against a throwaway
``redis-server`` on a free local port (skipped when none is installed): its
"added" is two round trips (reserve, commit) plus the client's work. The fake provider runs in its own process: in this one
its server thread would compete with the client for the GIL and blur the
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
from rich.console import Console
from rich.table import Table

import allowance
from allowance.testing import RedisServer

if TYPE_CHECKING:
    from collections.abc import Callable

MESSAGES = [{"role": "user", "content": "Say hello in five words."}]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    raw: Callable[[], Any], guarded: Callable[[], Any], rounds: int
) -> dict[str, float]:
    for _ in range(200):  # warm up connections, caches, pricing lookups
        raw()
        guarded()
    wall: dict[Any, list[float]] = {raw: [], guarded: []}
    cpu: dict[Any, list[float]] = {raw: [], guarded: []}
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            for fn in (raw, guarded) if i % 2 else (guarded, raw):
                start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
                fn()
                cpu[fn].append((time.thread_time_ns() - start_cpu) / 1000)
                wall[fn].append((time.perf_counter_ns() - start) / 1000)
    finally:
        gc.enable()

    def added(times: dict[Any, list[float]]) -> float:
        return statistics.median(
            y - x for x, y in zip(times[raw], times[guarded], strict=True)
        )

    return {
        "raw": statistics.median(wall[raw]),
        "guarded": statistics.median(wall[guarded]),
        "added": added(wall),
        "added_cpu": added(cpu),
        "p99": quantile(wall[guarded], 0.99),
        "raw_p99": quantile(wall[raw], 0.99),
    }


def sync_scenarios(
    fake: RemoteProvider, rounds: int, tmp: Path, redis_url: str | None = None
) -> list[tuple[str, dict[str, float]]]:
    results = []
    raw_client = openai.OpenAI(
        base_url=fake.openai_base_url, api_key="x", max_retries=0
    )

    def raw() -> Any:
        return raw_client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
        )

    ledgers = [
        ("chat, memory ledger", "memory://"),
        ("chat, SQLite ledger", f"sqlite:///{tmp / 'bench.db'}"),
    ]
    if redis_url is not None:
        ledgers.append(("chat, Redis ledger (local server)", redis_url))
    for name, ledger in ledgers:
        client = allowance.wrap(
            openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0),
            budget="$1000",
            ledger=ledger,
        )

        def guarded(client: Any = client) -> Any:
            return client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
            )

        results.append((name, measure(raw, guarded, rounds)))
        client.allowance.guard.close()

    stream_client = allowance.wrap(
        openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0),
        budget="$1000",
        ledger="memory://",
    )

    def raw_stream() -> Any:
        return list(
            raw_client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                max_tokens=64,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    def guarded_stream() -> Any:
        return list(
            stream_client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                max_tokens=64,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    results.append(
        (
            "chat stream (whole call), memory",
            measure(raw_stream, guarded_stream, rounds // 2),
        )
    )
    return results


def concurrency(fake: RemoteProvider, calls: int) -> tuple[float, float]:
    async def run(guarded: bool) -> float:
        client = openai.AsyncOpenAI(
            base_url=fake.openai_base_url, api_key="x", max_retries=0
        )
        if guarded:
            allowance.wrap(client, budget="$1000", ledger="memory://")
        async with client:
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
                    )
                    for _ in range(50)
                )
            )
            start = time.perf_counter()
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
                    )
                    for _ in range(calls)
                )
            )
            return time.perf_counter() - start

    raw = asyncio.run(run(False))
    guarded = asyncio.run(run(True))
    return raw, guarded


class RemoteProvider:
    """A FakeProvider in a child process; ``latency`` is set by restarting it."""

    def __init__(self, latency: float = 0.0) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.start(latency)

    def start(self, latency: float) -> None:
        self.stop()
        code = (
            "import sys, time\n"
            "from allowance.testing import FakeProvider\n"
            f"fake = FakeProvider(latency={latency!r}).start()\n"
            "print(fake.openai_base_url, flush=True)\n"
            "sys.stdin.read()\n"
        )
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self.openai_base_url = self._process.stdout.readline().strip()

    def stop(self) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            self._process.wait(timeout=10)
            self._process = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--rounds", type=int, default=2000)
    parser.add_argument("--concurrent", type=int, default=1000)
    args = parser.parse_args()
    console = Console(width=max(120, Console().width))
    fake = RemoteProvider()
    # A throwaway redis-server on a free local port, when one is installed.
    redis = RedisServer().start() if RedisServer.available() else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = sync_scenarios(
                fake, args.rounds, Path(tmp), redis.url if redis else None
            )
        fake.start(latency=0.02)
        raw_wall, guarded_wall = concurrency(fake, args.concurrent)
    finally:
        fake.stop()
        if redis is not None:
            redis.close()
    table = Table(title=f"allowance overhead, N={args.rounds} interleaved rounds (µs)")
    for column in (
        "scenario",
        "raw",
        "guarded",
        "added",
        "added CPU",
        "ratio",
        "p99 raw",
        "p99 guarded",
    ):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for name, r in rows:
        table.add_row(
            name,
            f"{r['raw']:.0f}",
            f"{r['guarded']:.0f}",
            f"{r['added']:.1f}",
            f"{r['added_cpu']:.1f}",
            f"{r['guarded'] / r['raw']:.3f}",
            f"{r['raw_p99']:.0f}",
            f"{r['p99']:.0f}",
        )
    table.add_row(
        f"{args.concurrent} concurrent async, 20 ms latency (wall ms)",
        f"{raw_wall * 1000:.0f}",
        f"{guarded_wall * 1000:.0f}",
        f"{(guarded_wall - raw_wall) * 1000:.0f}",
        "",
        f"{guarded_wall / raw_wall:.3f}",
        "",
        "",
    )
    console.print(table)


if __name__ == "__main__":
    main()
