"""Real processes sharing one ledger (a SQLite file, a Redis server).

Strict mode never overspends when processes race for the last unit, and a
worker killed with SIGKILL while holding a reservation keeps its committed
spend while its hold ends with the lease.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid

import pytest

from allowance._ledger import open_ledger
from allowance.testing.conformance import hold_until_killed, run_reserve_commit_loop
from allowance.typing import KeyState, ReserveItem

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request, tmp_path) -> str:
    """An empty ledger that several processes open by URL."""
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    open_ledger(url).close()  # the schema exists before the race starts
    return url


def test_processes_never_overspend(shared_url) -> None:
    """4 processes x 40 reserves of 3 under 300: exactly 100 admitted."""
    start = SPAWN.Barrier(4)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=run_reserve_commit_loop,
            args=(shared_url,),
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
    ledger = open_ledger(shared_url)
    try:
        assert ledger.state(["tenant:acme"])["tenant:acme"] == KeyState(300, 0)
    finally:
        ledger.close()


def test_killed_worker_hold_returns_after_its_lease(shared_url) -> None:
    """SIGKILL a worker holding a reservation: its spend stays, its hold ends
    with the lease (the ledger's own clock: SQLite's host, Redis's server)."""
    ready = SPAWN.Event()
    child = SPAWN.Process(
        target=hold_until_killed,
        args=(shared_url,),
        kwargs={
            "key": "k",
            "spend": 7,
            "hold": 40,
            "lease_seconds": 2.0,
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
    ledger = open_ledger(shared_url)
    try:
        # Still held (state does not reap; a slow machine may pass the lease).
        assert ledger.state(["k"])["k"] == KeyState(spent=7, reserved=40)
        deadline = time.monotonic() + 10
        while True:
            result = ledger.reserve(
                [[ReserveItem("k", 60, 100)]],
                reservation_id=uuid.uuid4().hex,
                lease_seconds=60,
            )
            if result.admitted or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert result.admitted
        assert result.before["k"] == KeyState(spent=7, reserved=0)
        assert ledger.state(["k"])["k"] == KeyState(spent=7, reserved=60)
    finally:
        ledger.close()
