"""The ledger conformance suite: one suite, parametrized over memory, SQLite and Redis."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from allowance._ledger import (
    MemoryLedger,
    SQLiteLedger,
    WriteBehindLedger,
    _sqlite,
    open_ledger,
)
from allowance.testing.conformance import LedgerConformance, ManualClock
from allowance.typing import KeyState, ReserveItem

if TYPE_CHECKING:
    from collections.abc import Callable

    from allowance.typing import Ledger

DAY = 86_400.0


BACKENDS = ("memory", "sqlite", "write-behind", "redis")


class TestLedger(LedgerConformance):
    """Every conformance test, once per backend (``test_x[redis]``)."""

    backend: str
    redis_base: str

    @pytest.fixture(autouse=True, params=BACKENDS)
    def _backend(self, request: pytest.FixtureRequest) -> None:
        self.backend = request.param
        if self.backend == "redis":
            self.redis_base = request.getfixturevalue("redis_server").url

    def _url(self) -> str:
        if self.backend == "memory":
            return "memory://"
        if self.backend == "sqlite":
            return f"sqlite:///{self.tmp_path / 'ledger.db'}"
        if self.backend == "write-behind":
            return f"sqlite:///{self.tmp_path / 'ledger.db'}?write_behind=0.001"
        return f"{self.redis_base}?prefix=t-{uuid.uuid4().hex}"

    def make_ledger(self) -> Ledger:
        return open_ledger(self._url())

    def make_ledger_with_clock(self, clock: Callable[[], float]) -> Ledger:
        return open_ledger(self._url(), clock=clock)


class TestMemoryLedger(LedgerConformance):
    """A plain subclass, as third-party ledgers write them (for TestTheGuard)."""

    __test__ = False

    def make_ledger(self) -> Ledger:
        return open_ledger("memory://")

    def make_ledger_with_clock(self, clock: Callable[[], float]) -> Ledger:
        return open_ledger("memory://", clock=clock)


class TestTheGuard:
    """``test_no_overrides_DO_NOT_OVERRIDE`` catches what it is meant to."""

    def _run_guard(self, cls: type[LedgerConformance]) -> None:
        cls().test_no_overrides_DO_NOT_OVERRIDE()

    def test_plain_subclass_passes(self) -> None:
        self._run_guard(TestMemoryLedger)

    def test_override_without_xfail_fails(self) -> None:
        class Sneaky(TestMemoryLedger):
            def test_commit_is_idempotent(self, ledger: Ledger) -> None:
                pass

        with pytest.raises(AssertionError, match="test_commit_is_idempotent"):
            self._run_guard(Sneaky)

    def test_skip_counts_as_an_override(self) -> None:
        class Skipper(TestMemoryLedger):
            @pytest.mark.skip(reason="flaky")
            def test_commit_is_idempotent(self, ledger: Ledger) -> None:
                pass

        with pytest.raises(AssertionError, match="without xfail"):
            self._run_guard(Skipper)

    def test_deleted_test_fails(self) -> None:
        class Deleter(TestMemoryLedger):
            test_claim_is_true_once = None  # type: ignore[assignment]

        with pytest.raises(AssertionError, match="test_claim_is_true_once was deleted"):
            self._run_guard(Deleter)

    def test_xfail_with_reason_is_allowed(self) -> None:
        class Honest(TestMemoryLedger):
            @pytest.mark.xfail(reason="this backend uses the server's clock")
            def test_lease_expires_in_real_time(self, ledger: Ledger) -> None:
                raise NotImplementedError

        self._run_guard(Honest)

    def test_xfail_without_reason_fails(self) -> None:
        class Lazy(TestMemoryLedger):
            @pytest.mark.xfail
            def test_lease_expires_in_real_time(self, ledger: Ledger) -> None:
                raise NotImplementedError

        with pytest.raises(AssertionError, match="test_lease_expires_in_real_time"):
            self._run_guard(Lazy)


def test_missing_make_ledger_says_what_to_do() -> None:
    class Empty(LedgerConformance):
        pass

    with pytest.raises(NotImplementedError, match="Empty must implement make_ledger"):
        Empty().make_ledger()
    with pytest.raises(NotImplementedError, match="make_ledger_with_clock"):
        Empty().make_ledger_with_clock(lambda: 0.0)


def test_backends_are_the_expected_classes(tmp_path) -> None:
    memory = open_ledger("memory://")
    sqlite = open_ledger(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert isinstance(memory, MemoryLedger)
        assert isinstance(sqlite, SQLiteLedger)
    finally:
        sqlite.close()


# -- beyond the suite: what each backend does on its own ---------------------------


@pytest.fixture(params=BACKENDS)
def clocked_backend(request, tmp_path):
    clock = ManualClock()
    if request.param == "memory":
        yield MemoryLedger(clock), clock
        return
    if request.param == "redis":
        ledger = open_ledger(request.getfixturevalue("redis_url"), clock=clock)
    elif request.param == "write-behind":
        ledger = WriteBehindLedger(
            tmp_path / "purge.db", write_behind=0.001, clock=clock
        )
    else:
        ledger = SQLiteLedger(tmp_path / "purge.db", clock=clock)
    yield ledger, clock
    ledger.close()


def test_settled_reservations_are_forgotten_after_a_day(
    clocked_backend, monkeypatch
) -> None:
    """A day after settling, a reservation row may go (and a commit charges)."""
    monkeypatch.setattr(_sqlite, "_PURGE_EVERY", 1)
    ledger, clock = clocked_backend
    plan = [[ReserveItem("k", 5, 100)]]
    ledger.reserve(plan, reservation_id="old", lease_seconds=60)
    ledger.commit("old", {"k": 5})
    ledger.reserve(plan, reservation_id="held", lease_seconds=10 * DAY)
    clock.advance(DAY - 1)
    ledger.reserve([], reservation_id="tick", lease_seconds=60)
    ledger.commit("old", {"k": 5})  # still known: no change
    assert ledger.state(["k"])["k"] == KeyState(spent=5, reserved=5)
    clock.advance(2)
    ledger.reserve([], reservation_id="purge", lease_seconds=60)
    ledger.commit("old", {"k": 5})  # forgotten: charged as a new id
    ledger.commit("held", {"k": 1})  # held rows are never purged
    assert ledger.state(["k"])["k"] == KeyState(spent=11, reserved=0)


def test_sqlite_purge_sweeps_the_whole_table(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_sqlite, "_PURGE_EVERY", 1)
    monkeypatch.setattr(_sqlite, "_PURGE_WINDOW", 3)
    clock = ManualClock()
    ledger = SQLiteLedger(tmp_path / "sweep.db", clock=clock)
    try:
        for i in range(10):
            ledger.commit(f"r{i:02}", {"k": 1})
        clock.advance(DAY + 1)
        for i in range(8):  # 3 rows a step: 4 steps cover 10 rows, then wrap
            ledger.reserve([], reservation_id=f"tick{i}", lease_seconds=60)
        conn = ledger._connection().conn
        left = conn.execute("SELECT count(*) FROM reservations").fetchone()[0]
        assert left == 0
    finally:
        ledger.close()


@pytest.mark.parametrize("write_behind", [0, 0.05])
def test_an_async_call_racing_close_is_never_left_waiting(
    tmp_path, write_behind: float
) -> None:
    """``close()`` stops the worker while a call is about to queue on it.

    The call had read the worker before close() swapped it out: its job went
    behind the worker's end marker, never ran, and the task awaited forever
    (a commit caught so was never written, its hold kept for its lease). The
    state close() leaves mid-way is made here at once: the ledger still
    names a worker that has stopped.
    """
    import asyncio

    from allowance._ledger import open_ledger

    ledger = open_ledger(f"sqlite:///{tmp_path / 'w.db'}?write_behind={write_behind}")
    item = [[ReserveItem("k", 10, 100)]]

    async def race() -> None:
        await ledger.areserve(item, reservation_id="r1", lease_seconds=60)
        ledger._worker.stop()  # close() between _submit's read and its put
        await asyncio.wait_for(ledger.acommit("r1", {"k": 7}), 10)
        await asyncio.wait_for(ledger.astate(["k"]), 10)

    try:
        asyncio.run(race())
        assert ledger.state(["k"])["k"] == KeyState(spent=7, reserved=0)
    finally:
        ledger.close()


def test_sqlite_async_worker_ends_with_the_ledger(tmp_path) -> None:
    import asyncio
    import gc
    import threading

    def workers() -> int:
        return sum(t.name.startswith("allowance-sqlite") for t in threading.enumerate())

    before = workers()
    ledger = SQLiteLedger(tmp_path / "w.db")
    asyncio.run(ledger.astate(["k"]))
    assert workers() == before + 1
    ledger.close()
    assert workers() == before

    dropped = SQLiteLedger(tmp_path / "w.db")
    asyncio.run(dropped.astate(["k"]))
    del dropped
    gc.collect()
    for _ in range(500):
        if workers() == before:
            break
        threading.Event().wait(0.01)
    assert workers() == before
