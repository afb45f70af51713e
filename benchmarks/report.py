"""`allowance report` over a large SQLite call log: build time, size, report time.

Usage: ``uv run noxfile.py -s bench`` (or ``python benchmarks/report.py -n 1000000``).

Builds a SQLite ledger whose call log holds N calls spread evenly over DAYS
days (one ``executemany`` in one transaction, rows in the ledger's own format:
sessions of 20 calls, each session in one of 50 tenants, its calls made by
three agents),
then times ``allowance report --since <day> --until <next day>`` for one day,
run as the command a user types (a fresh process: imports included), and
prints the database's bytes per call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from allowance._ledger import _sqlite_schema as sql
from allowance._ledger._sqlite import SQLiteLedger
from allowance.typing import CallRecord, Usage

START = dt.datetime(2026, 10, 1, tzinfo=dt.UTC).timestamp()
MODELS = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "gpt-4.1-nano")
TENANTS = [f"tenant-{i}" for i in range(50)]


def rows(count: int, days: int) -> list[tuple[object, ...]]:
    rng = random.Random(8)
    span = days * 86_400
    out = []
    for i in range(count):
        model = MODELS[i % len(MODELS)]
        record = CallRecord(
            call_id=f"c{i:x}",
            ts=START + span * i / count,
            scope={
                "tenant": TENANTS[i // 20 % len(TENANTS)],
                "session": f"s{i // 20:x}",
                "agent": ("researcher", "writer", "editor")[i % 3],
            },
            provider="anthropic" if model.startswith("claude") else "openai",
            model=model,
            requested_model=model,
            usage=Usage(
                input_tokens=rng.randrange(50, 4000),
                output_tokens=rng.randrange(10, 800),
                cache_read_tokens=0,
            ),
            cost_micros=rng.randrange(10, 20_000),
            adapters=("openai",),
            outcome="ok" if i % 97 else "blocked",
            estimate_tokens=5000,
            estimate_micros=30_000,
            latency_ms=float(rng.randrange(200, 3000)),
        )
        out.append(sql.call_row(record))
    return out


def build(path: Path, count: int, days: int) -> float:
    SQLiteLedger(path).close()  # the schema, as the ledger creates it
    data = rows(count, days)
    start = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql.INSERT_CALL, data)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - start


def report_seconds(path: Path, day: int, fmt: str) -> float:
    since = dt.datetime.fromtimestamp(START + day * 86_400, tz=dt.UTC)
    until = since + dt.timedelta(days=1)
    command = [
        str(Path(sys.executable).parent / "allowance"),
        "report",
        "--ledger",
        f"sqlite:///{path}",
        "--since",
        since.strftime("%Y-%m-%dT%H:%M"),
        "--until",
        until.strftime("%Y-%m-%dT%H:%M"),
        "--format",
        fmt,
    ]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--calls", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    console = Console(width=max(100, Console().width))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.db"
        SQLiteLedger(path).close()
        empty = path.stat().st_size
        path.unlink()
        seconds = build(path, args.calls, args.days)
        size = path.stat().st_size
        for suffix in ("-wal", "-shm"):
            extra = Path(f"{path}{suffix}")
            size += extra.stat().st_size if extra.exists() else 0
        per_day = args.calls // args.days
        table = Table(
            title=f"allowance report over {args.calls:,} logged calls"
            f" ({args.days} days, ~{per_day:,} a day), SQLite"
        )
        for column in ("measure", "value"):
            table.add_column(column, justify="left" if column == "measure" else "right")
        table.add_row("build (executemany, one transaction)", f"{seconds:.1f} s")
        table.add_row("database size", f"{size / 1e6:.0f} MB")
        table.add_row("bytes per logged call", f"{(size - empty) / args.calls:.0f}")
        for fmt in ("table", "json"):
            took = report_seconds(path, args.days // 2, fmt)
            table.add_row(
                f"`allowance report` for one day, --format {fmt} (process, best of 3)",
                f"{took * 1000:.0f} ms",
            )
        console.print(table)


if __name__ == "__main__":
    main()
