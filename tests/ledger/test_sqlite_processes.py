"""Real processes sharing one SQLite file: the limit holds, crashes heal."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from allowance._ledger import SQLiteLedger, open_ledger
from allowance.testing.conformance import hold_until_killed, run_reserve_commit_loop
from allowance.typing import KeyState, ReserveItem

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")


def test_processes_never_overspend(tmp_path) -> None:
    """4 processes x 40 reserves of 3 under 300: exactly 100 admitted."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    open_ledger(url).close()  # the schema exists before the race starts
    start = SPAWN.Barrier(4)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=run_reserve_commit_loop,
            args=(url,),
            kwargs={
                "key": "tenant:acme",
                "limit": 300,
                "amount": 3,
                "attempts": 40,
                "start": start,
                "results": results,
            },
        )
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    admitted = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    results.close()
    results.join_thread()
    assert sum(admitted) == 100
    ledger = open_ledger(url)
    try:
        assert ledger.state(["tenant:acme"])["tenant:acme"] == KeyState(300, 0)
    finally:
        ledger.close()


def test_killed_process_hold_ends_with_its_lease(tmp_path) -> None:
    """A process killed while holding: its spend stays, its hold is reaped."""
    path = tmp_path / "shared.db"
    url = f"sqlite:///{path}"
    ready = SPAWN.Event()
    child = SPAWN.Process(
        target=hold_until_killed,
        args=(url,),
        kwargs={
            "key": "k",
            "spend": 7,
            "hold": 40,
            "lease_seconds": 5.0,
            "ready": ready,
        },
    )
    child.start()
    try:
        assert ready.wait(60), "the child never reserved"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL

    now = SQLiteLedger(path)
    try:
        assert now.state(["k"])["k"] == KeyState(spent=7, reserved=40)
    finally:
        now.close()
    later = SQLiteLedger(path, clock=lambda: time.time() + 6)  # past the lease
    try:
        result = later.reserve(
            [[ReserveItem("k", 1, 100)]], reservation_id="after", lease_seconds=60
        )
        assert result.before["k"] == KeyState(spent=7, reserved=0)
        later.release("after")
        assert later.state(["k"])["k"] == KeyState(spent=7, reserved=0)
    finally:
        later.close()
