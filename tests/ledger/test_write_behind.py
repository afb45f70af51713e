"""The write-behind SQLite ledger (``sqlite:///x.db?write_behind=SECONDS``).

- In one process it decides every call as the memory ledger does, and ends in
  the same state, while its thread tops slices up and writes at any moment.
- Processes sharing the file never overspend.
- A clean exit writes everything; a killed process loses only what it had
  not written, and its slice ends with the slice's lease.
- A failing write keeps the charges in memory and writes them later.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from typing import TYPE_CHECKING

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings

from allowance import ConfigurationError, UsageError
from allowance._ledger import (
    MemoryLedger,
    SQLiteLedger,
    WriteBehindLedger,
    _write_behind,
    open_ledger,
)
from allowance.typing import KeyState, ReserveItem, ReserveResult

from .conftest import KEYS, call_record

if TYPE_CHECKING:
    from pathlib import Path

LEASE = 600.0


def _admit(
    ledger: WriteBehindLedger,
    items: list[tuple[str, int, int]],
    rid: str,
    ceilings: list[int] | None = None,
) -> bool:
    """What the guard does: the fast lane's ``hold``, else ``reserve``."""
    if ledger.hold(items, rid, LEASE, ceilings) is not None:
        return True
    plan = _plan(items, ceilings)
    return ledger.reserve([plan], reservation_id=rid, lease_seconds=LEASE).admitted


def _plan(
    items: list[tuple[str, int, int]], ceilings: list[int] | None
) -> list[ReserveItem]:
    """The plan ``reserve`` decides for ``hold``'s items and ceilings (gates)."""
    gates = ceilings or [None] * len(items)
    return [
        ReserveItem(key, amount, limit, gate)
        for (key, amount, limit), gate in zip(items, gates, strict=True)
    ]


def _charge(ledger: WriteBehindLedger, rid: str, amounts: dict[str, int]) -> None:
    """What the guard does: the fast lane's ``settle``, else ``commit``."""
    if not ledger.settle(rid, amounts, call_record(rid)):
        ledger.commit(rid, amounts, record=call_record(rid))


# -- one process: the same decisions as the memory ledger ------------------------

admits = st.tuples(
    st.just("admit"),
    st.lists(
        st.tuples(
            st.sampled_from(KEYS),
            st.one_of(st.integers(1, 4), st.integers(0, 40)),  # small: the slice
        ),
        min_size=1,
        max_size=3,
        unique_by=lambda item: item[0],
    ),
    st.booleans(),  # then write, as the thread would: the slice arrives
    st.none() | st.integers(0, 300),  # a ceiling (a threshold's gate) on each key
)
limits = st.tuples(st.just("limit"), st.sampled_from(KEYS), st.integers(0, 400))
charges = st.tuples(st.just("charge"), st.integers(0, 30), st.integers(0, 50))
releases = st.tuples(st.just("release"), st.integers(0, 30))
others = st.tuples(st.sampled_from(["flush", "pause"]))
resets = st.tuples(st.just("reset"), st.sampled_from(["usd:", "tokens:", "x"]))


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.fixed_dictionaries({key: st.integers(0, 400) for key in KEYS}),
    st.lists(
        st.one_of(admits, admits, admits, charges, charges, releases),
        min_size=4,
        max_size=40,
    ),
    st.lists(st.one_of(others, resets, limits), max_size=8),
    st.randoms(use_true_random=False),
)
def test_one_process_decides_as_the_memory_ledger(
    tmp_path: Path,
    limit_of: dict[str, int],
    calls: list[tuple[object, ...]],
    events: list[tuple[object, ...]],
    rand: random.Random,
) -> None:
    """Random calls: the same admissions and states as ``MemoryLedger``, step by
    step, whatever the thread wrote meanwhile; the same file state after close.

    Calls, interleaved with writes, pauses (the thread writes and tops up),
    resets and limit changes, each budget under its own limit.
    """
    steps = list(calls)
    for extra in events:
        steps.insert(rand.randint(0, len(steps)), extra)
    _same_as_memory(tmp_path, limit_of, steps)


# Calls under ceilings (a threshold's gate): most admitted, some ceilings met.
# Some have a fallback (a degrade threshold): ``reserve`` of two plans, the
# first gated, the second half the amounts, after the lane's ``hold`` of the
# first plan, or of the second past the gates (a layout the guard knows
# degrades), or without one.
gated_admits = st.tuples(
    st.just("admit"),
    st.lists(
        st.tuples(st.sampled_from(KEYS[:2]), st.integers(1, 8)),
        min_size=1,
        max_size=2,
        unique_by=lambda item: item[0],
    ),
    st.booleans(),
    st.integers(0, 120),
    st.sampled_from([None, None, "hold", "degraded", "reserve"]),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.one_of(gated_admits, gated_admits, gated_admits, admits, charges, charges),
        min_size=4,
        max_size=40,
    ),
    st.lists(st.one_of(others, others, resets, limits), max_size=8),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_calls_under_ceilings_are_decided_as_the_memory_ledger(
    tmp_path: Path,
    calls: list[tuple[object, ...]],
    events: list[tuple[object, ...]],
    rand: random.Random,
    threaded: bool,
) -> None:
    """Gated holds (``hold``'s ceilings) and gated reserves: admitted on the
    slice only when what the key holds (the file beyond the slice, read at
    each write or set by ``reserve``, and this process's calls since) is
    within the ceiling, as the memory ledger decides; a degraded call (its
    first plan gated out) held on the slice too, with the plan and the
    states the memory ledger returns. Without the thread, memory and the file
    part for as long as possible: only ``flush`` and ``pause`` steps write."""
    steps = list(calls)
    for extra in events:
        steps.insert(rand.randint(0, len(steps)), extra)
    ledger = WriteBehindLedger if threaded else _Unthreaded
    _same_as_memory(tmp_path, dict.fromkeys(KEYS, 1_000), steps, ledger)


class _Unthreaded(WriteBehindLedger):
    """Writes only when flushed (``pause`` flushes): no background thread."""

    def _kick(self) -> None:
        pass

    def pause(self) -> None:
        self.flush()


def _same_as_memory(
    tmp_path: Path,
    limit_of: dict[str, int],
    steps: list[tuple[object, ...]],
    ledger: type[WriteBehindLedger] = WriteBehindLedger,
) -> None:
    path = tmp_path / f"wb-{time.monotonic_ns()}.db"
    pair = _Pair(ledger(path, write_behind=0.001), dict(limit_of))
    try:
        for n, step in enumerate(steps):
            getattr(pair, str(step[0]))(n, *step[1:])
            assert pair.ledger.state(KEYS) == pair.reference.state(KEYS), (n, step)
        assert len(pair.ledger.calls()) == len(pair.reference.calls())
    finally:
        pair.ledger.close()
    # What the file holds once the ledger is closed: the calls still in flight.
    plain = SQLiteLedger(path)
    try:
        assert plain.state(KEYS) == pair.reference.state(KEYS)
        assert len(plain.calls()) == len(pair.reference.calls())
    finally:
        plain.close()


class _Pair:
    """The write-behind ledger and the memory ledger, given the same steps."""

    def __init__(self, ledger: WriteBehindLedger, limit_of: dict[str, int]) -> None:
        self.ledger = ledger
        self.reference = MemoryLedger()
        self.limit_of = limit_of
        self.held: list[tuple[str, list[str]]] = []

    def admit(
        self,
        n: int,
        calls: list[tuple[str, int]],
        then_write: bool,
        ceiling: int | None,
        fallback: str | None = None,
    ) -> None:
        items = [(key, amount, self.limit_of[key]) for key, amount in calls]
        ceilings = None if ceiling is None else [ceiling] * len(items)
        rid = f"r{n}"
        if fallback is not None:
            self._degrade(n, items, ceilings, fallback)
        else:
            held = self.ledger.hold(items, rid, LEASE, ceilings) is not None
            if held:
                event(f"held{'' if ceilings is None else ', under ceilings'}")
            got = held or _admit(self.ledger, items, rid, ceilings)
            plan = _plan(items, ceilings)
            want = self.reference.reserve(
                [plan], reservation_id=rid, lease_seconds=LEASE
            )
            assert got == want.admitted, (n, calls)
            if got:
                self.held.append((rid, [k for k, _, _ in items]))
        if then_write:
            self.ledger.flush()

    def _degrade(
        self,
        n: int,
        items: list[tuple[str, int, int]],
        ceilings: list[int] | None,
        lane: str,
    ) -> None:
        """A call with a fallback, as the guard makes it: the lane's ``hold``
        of the call asked for ("hold": the guard does not know the layout
        degrades) or of its fallback past the gates ("degraded": the last call
        was degraded), then ``reserve`` of both plans; the same plan, states
        and ledger as the memory ledger."""
        rid = f"r{n}"
        fallback = [(key, amount // 2, limit) for key, amount, limit in items]
        plans = [_plan(items, ceilings), _plan(fallback, None)]
        if lane == "hold" and self.ledger.hold(items, rid, LEASE, ceilings) is not None:
            want = self.reference.reserve(
                [plans[0]], reservation_id=rid, lease_seconds=LEASE
            )
            assert want.plan == 0, n
        elif (
            lane == "degraded"
            and self.ledger.hold(fallback, rid, LEASE, None, ceilings) is not None
        ):
            event("degraded: held on the slice")
            want = self.reference.reserve(
                plans, reservation_id=rid, lease_seconds=LEASE
            )
            assert want.plan == 1, n
        else:
            result = self.ledger.reserve(plans, reservation_id=rid, lease_seconds=LEASE)
            if result.plan is not None:
                where = "slice" if rid in self.ledger._holds else "file"
                event(f"reserve: plan {result.plan}, on the {where}")
            want = self.reference.reserve(
                plans, reservation_id=rid, lease_seconds=LEASE
            )
            assert (result.plan, result.before) == (want.plan, want.before), n
            if result.plan is None:
                return
        self.held.append((rid, [k for k, _, _ in items]))

    def charge(self, _: int, index: int, amount: int) -> None:
        if self.held:
            rid, keys = self.held.pop(index % len(self.held))
            amounts = dict.fromkeys(keys, amount)
            _charge(self.ledger, rid, amounts)
            self.reference.commit(rid, amounts, record=call_record(rid))

    def release(self, _: int, index: int) -> None:
        if self.held:
            rid, _keys = self.held.pop(index % len(self.held))
            self.ledger.release(rid, record=call_record(rid))
            self.reference.release(rid, record=call_record(rid))

    def flush(self, _: int) -> None:
        self.ledger.flush()

    def pause(self, _: int) -> None:
        if isinstance(self.ledger, _Unthreaded):
            self.ledger.pause()
        else:
            time.sleep(0.005)  # the thread writes and tops up meanwhile

    def limit(self, _: int, key: str, limit: int) -> None:
        self.limit_of[key] = limit

    def reset(self, _: int, prefix: str) -> None:
        self.ledger.reset(prefix)
        self.reference.reset(prefix)


# -- the lane and its slice, step by step ------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path):
    ledger = WriteBehindLedger(tmp_path / "wb.db", write_behind=0.001)
    yield ledger
    ledger.close()


def test_a_slice_is_taken_after_the_first_call_and_serves_the_next(
    tmp_path: Path,
) -> None:
    ledger = WriteBehindLedger(tmp_path / "wb.db", write_behind=1.0)
    try:
        _slice_serves_the_next(ledger)
    finally:
        ledger.close()


def _slice_serves_the_next(ledger: WriteBehindLedger) -> None:
    key = "tokens:session=a"
    assert ledger.hold([(key, 10, 1000)], "r0", LEASE) is None  # no slice yet
    ledger.flush()  # the top-up the miss asked for
    assert ledger.hold([(key, 10, 1000)], "r1", LEASE) == {key: 10}
    assert ledger.settle("r1", {key: 7}, call_record("r1"))
    assert not ledger.settle("r1", {key: 7}, call_record("r1"))  # once
    ledger.commit("r1", {key: 7})  # a second commit changes nothing
    assert ledger.state([key])[key] == KeyState(spent=7, reserved=0)
    # Another ledger on the file sees the slice as reserved, and the charge
    # once written (the thread may have written it already).
    other = SQLiteLedger(ledger.path)
    try:
        before = other.state([key])[key]
        assert before.used == 10 * _write_behind.SLICE_CALLS
        assert before.spent in {0, 7}
        ledger.flush()
        after = other.state([key])[key]
        assert after == KeyState(spent=7, reserved=10 * _write_behind.SLICE_CALLS - 7)
    finally:
        other.close()
    with pytest.raises(UsageError, match="r1"):
        ledger.hold([(key, 1, 1000)], "r1", LEASE)  # ids are never reused


def test_a_slice_takes_at_most_half_of_what_is_left(ledger) -> None:
    key = "usd:tenant=t"
    assert ledger.reserve(
        [[ReserveItem(key, 900, 1000)]], reservation_id="big", lease_seconds=LEASE
    ).admitted
    assert ledger.hold([(key, 10, 1000)], "r0", LEASE) is None
    ledger.flush()
    other = SQLiteLedger(ledger.path)
    try:
        assert other.state([key])[key].reserved == 900 + 50  # half of the 100 left
    finally:
        other.close()


def test_reserve_gives_back_the_unused_slice_first(ledger) -> None:
    """The slice holds 100 of 200 (half of what was left); a call of 150 it
    cannot cover is admitted by ``reserve`` on the file, as the memory ledger
    would admit it, and the next ones are decided exactly too."""
    key = "tokens:session=a"
    assert ledger.hold([(key, 10, 200)], "r0", LEASE) is None
    ledger.flush()
    assert ledger.state([key])[key] == KeyState(0, 0)  # the slice is not shown
    assert _admit(ledger, [(key, 150, 200)], "r1")
    assert ledger.state([key])[key] == KeyState(0, 150)
    assert not _admit(ledger, [(key, 51, 200)], "r2")
    assert _admit(ledger, [(key, 50, 200)], "r3")
    assert ledger.state([key])[key] == KeyState(0, 200)


def test_reserve_picks_the_plan_it_would_pick_without_the_slice(
    tmp_path: Path,
) -> None:
    """A plan the unused slice refuses on a limit is decided again without
    the slice; one its gate refuses is passed over, and the slice kept."""
    key = "usd:session=a"
    ledger = _Unthreaded(tmp_path / "wb.db", write_behind=1.0)
    try:
        assert ledger.hold([(key, 10, 100)], "probe", LEASE) is None
        ledger.flush()  # a slice of 50: half of what is left
        assert ledger.hold([(key, 10, 100)], "r0", LEASE) == {key: 10}
        # 60 fits under 100 without the slice's 40 unused, not with it.
        plans = [[ReserveItem(key, 60, 100)], [ReserveItem(key, 5, 100)]]
        result = ledger.reserve(plans, reservation_id="r1", lease_seconds=LEASE)
        assert result.plan == 0
        ledger.release("r1")
        assert ledger.hold([(key, 10, 100)], "r2", LEASE) is None  # given back
        ledger.flush()  # a slice again: half of the 90 left
        # A gated hold: what the key holds beyond the slice is read from now.
        assert ledger.hold([(key, 10, 100)], "r3", LEASE, [100]) is None
        ledger.flush()
        assert ledger.hold([(key, 10, 100)], "r3", LEASE, [100]) == {key: 10}
        # 20 held: over a gate of 15, whatever the slice; the fallback fits.
        gated = [[ReserveItem(key, 5, 100, gate=15)], [ReserveItem(key, 5, 100)]]
        result = ledger.reserve(gated, reservation_id="r4", lease_seconds=LEASE)
        assert result.plan == 1
        # 25 held: within a gate of 25.
        gated = [[ReserveItem(key, 5, 100, gate=25)], [ReserveItem(key, 5, 100)]]
        result = ledger.reserve(gated, reservation_id="r5", lease_seconds=LEASE)
        assert result.plan == 0
        assert ledger.hold([(key, 10, 100)], "r6", LEASE) == {key: 10}  # kept
        assert ledger.state([key])[key] == KeyState(0, 40)
    finally:
        ledger.close()


def _hold_under_a_gate(ledger: WriteBehindLedger, key: str, calls: int) -> None:
    """Take a slice by a gated call, then hold ``calls`` of 10 under a gate of 50."""
    assert ledger.hold([(key, 10, 1000)], "r0", LEASE, [50]) is None
    ledger.flush()  # the slice, and what the file holds beyond it: 0
    for n in range(1, calls + 1):
        assert ledger.hold([(key, 10, 1000)], f"r{n}", LEASE, [50])


def test_a_degraded_call_is_held_on_the_slice(tmp_path: Path) -> None:
    """A call whose first plan its gate refuses (past a degrade threshold) is
    held and charged on the slice, as the lane's calls are: nothing written,
    the plan and states the file would give. A limit below the one the slice
    was granted under goes to the file."""
    key = "usd:session=a"
    ledger = _Unthreaded(tmp_path / "wb.db", write_behind=1.0)
    other = SQLiteLedger(tmp_path / "wb.db")
    try:
        _hold_under_a_gate(ledger, key, 6)  # 0, 10, ..., 50 held before each
        in_file = other.state([key])
        plans = [[ReserveItem(key, 10, 1000, gate=50)], [ReserveItem(key, 2, 1000)]]
        result = ledger.reserve(plans, reservation_id="d1", lease_seconds=LEASE)
        assert result == ReserveResult(1, {key: KeyState(0, 60)})
        _charge(ledger, "d1", {key: 1})
        assert ledger.state([key])[key] == KeyState(1, 60)
        assert other.state([key]) == in_file  # held and charged in memory
        # 61 used: the fallback's 2 do not fit under 62, whatever the slice.
        low = [[ReserveItem(key, 10, 62, gate=50)], [ReserveItem(key, 2, 62)]]
        result = ledger.reserve(low, reservation_id="d2", lease_seconds=LEASE)
        assert result == ReserveResult(None, {key: KeyState(1, 60)})
    finally:
        ledger.close()
        other.close()


def test_a_lower_limit_is_not_served_from_an_older_slice(ledger) -> None:
    key = "usd:session=a"
    ledger.hold([(key, 10, 1000)], "r0", LEASE)
    ledger.flush()
    assert ledger.hold([(key, 10, 1000)], "r1", LEASE) == {key: 10}
    assert ledger.hold([(key, 10, 5)], "r2", LEASE) is None  # limit now 5
    assert not _admit(ledger, [(key, 10, 5)], "r3")


def test_a_gated_call_holds_on_the_slice_while_its_keys_are_under_the_gate(
    tmp_path: Path,
) -> None:
    """Gates count what the key holds beyond the slice as of the last write:
    another process's spend (here another ledger on the file) applies from
    this process's next write; this process's own calls at once."""
    key = "tokens:session=a"
    ledger = _Unthreaded(tmp_path / "wb.db", write_behind=1.0)
    other = SQLiteLedger(tmp_path / "wb.db")
    try:
        _hold_under_a_gate(ledger, key, 5)  # 0, 10, ..., 40 held before each
        assert ledger.hold([(key, 10, 1000)], "r6", LEASE, [49]) is None  # 50 held
        assert ledger.hold([(key, 10, 1000)], "r6", LEASE, [50]) == {key: 10}
        for n in range(1, 7):  # charged 1 each: 6 held
            _charge(ledger, f"r{n}", {key: 1})
        assert ledger.state([key])[key] == KeyState(6, 0)
        # Another process spends 100: not seen until this process writes.
        other.commit("elsewhere", {key: 100})
        assert ledger.hold([(key, 10, 1000)], "r7", LEASE, [50]) == {key: 10}
        ledger.flush()
        assert ledger.hold([(key, 10, 1000)], "r8", LEASE, [50]) is None
        assert not _admit(ledger, [(key, 10, 1000)], "r8", [50])  # 100 + 6 + 10
        assert _admit(ledger, [(key, 10, 1000)], "r9")  # no gate: within the limit
    finally:
        ledger.close()
        other.close()


def test_close_writes_everything_and_gives_the_slice_back(tmp_path: Path) -> None:
    path = tmp_path / "wb.db"
    ledger = WriteBehindLedger(path, write_behind=1.0)  # the thread waits
    key = "tokens:session=a"
    ledger.hold([(key, 10, 1000)], "r0", LEASE)
    ledger.flush()
    for n in range(1, 6):
        assert ledger.hold([(key, 10, 1000)], f"r{n}", LEASE)
        assert ledger.settle(f"r{n}", {key: 3}, call_record(f"r{n}"))
    assert ledger.hold([(key, 10, 1000)], "inflight", LEASE)
    ledger.close()
    plain = SQLiteLedger(path)
    try:
        assert plain.state([key])[key] == KeyState(spent=15, reserved=10)
        assert len(plain.calls()) == 5
    finally:
        plain.close()


def test_bad_write_behind_is_refused(tmp_path: Path) -> None:
    for bad in (0, -1.0, 2.0, float("nan"), "0.1"):
        with pytest.raises(ConfigurationError, match="write_behind"):
            WriteBehindLedger(tmp_path / "x.db", write_behind=bad)  # type: ignore[arg-type]
    for url in ("?write_behind=2", "?write_behind=abc", "?write_behind=-1"):
        with pytest.raises(ConfigurationError, match="write_behind"):
            open_ledger(f"sqlite:///{tmp_path / 'x.db'}{url}")
    plain = open_ledger(f"sqlite:///{tmp_path / 'x.db'}?write_behind=0")
    assert type(plain) is SQLiteLedger
    plain.close()
    behind = open_ledger(f"sqlite:///{tmp_path / 'x.db'}?write_behind=0.01")
    assert type(behind) is WriteBehindLedger
    assert behind.write_behind == 0.01
    behind.close()


# -- a write that fails --------------------------------------------------------------


KEY1 = "tokens:session=a"


def _holding_on_a_slice(path: Path, write_behind: float) -> WriteBehindLedger:
    """A ledger whose call ``r1`` holds on its slice of ``KEY1``; writes give up
    after 0.05 s of a lock held elsewhere."""
    ledger = WriteBehindLedger(path, write_behind=write_behind, busy_timeout=0.05)
    ledger.hold([(KEY1, 10, 1000)], "r0", LEASE)
    ledger.flush()
    assert ledger.hold([(KEY1, 10, 1000)], "r1", LEASE)
    return ledger


def test_a_failed_write_loses_nothing(tmp_path: Path) -> None:
    """Another connection holds the write lock: the write fails after
    busy_timeout, the charges stay in memory, and the next write has them."""
    path = tmp_path / "wb.db"
    ledger = _holding_on_a_slice(path, write_behind=1.0)
    key = KEY1
    # Locked before the charge: the writer thread's own write (every second)
    # cannot take it to the file first, so the flush below has it to write.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert ledger.settle("r1", {key: 4}, call_record("r1"))
        with pytest.raises(Exception, match="write behind failed"):
            ledger.flush()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert ledger.state([key])[key] == KeyState(spent=4, reserved=0)
    ledger.flush()
    plain = SQLiteLedger(path)
    try:
        assert plain.state([key])[key].spent == 4
        assert len(plain.calls()) == 1
    finally:
        plain.close()
        ledger.close()


def test_close_does_not_wait_out_the_writer_s_back_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After failed writes the thread backs off (2 s, 4 s, ... up to 30 s);
    close() woke it, but it slept through: close(), and the exit's flush,
    waited out the back-off though the file was writable again."""
    path = tmp_path / "wb.db"
    ledger = _holding_on_a_slice(path, write_behind=0.01)
    key = KEY1
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with caplog.at_level("WARNING", logger="allowance"):
        assert ledger.settle("r1", {key: 4}, call_record("r1"))
        deadline = time.monotonic() + 30
        while caplog.text.count("failed (kept in memory") < 2:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.01)
    ledger._kick()  # as a call does: the thread wakes into its 4 s back-off
    time.sleep(0.2)
    blocker.execute("ROLLBACK")
    blocker.close()
    started = time.monotonic()
    ledger.close()
    took = time.monotonic() - started
    assert took < 2, took  # not the 4 s back-off (a wide margin)
    plain = SQLiteLedger(path)
    try:
        assert plain.state([key])[key].spent == 4
    finally:
        plain.close()


def test_a_slice_that_cannot_be_renewed_stops_admitting(tmp_path: Path) -> None:
    now = [1000.0]
    ledger = WriteBehindLedger(
        tmp_path / "wb.db", write_behind=1.0, clock=lambda: now[0]
    )
    key = "tokens:session=a"
    try:
        ledger.hold([(key, 10, 1000)], "r0", LEASE)
        ledger.flush()
        assert ledger.hold([(key, 10, 1000)], "r1", LEASE)
        now[0] += _write_behind.SLICE_LEASE / 2  # no write renewed it since
        assert ledger.hold([(key, 10, 1000)], "r2", LEASE) is None
    finally:
        ledger.close()


# -- processes ---------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, time
    from allowance._ledger import open_ledger
    from allowance.typing import CallRecord, ReserveItem, Usage

    url, key, limit, amount, attempts, ending = sys.argv[1:7]
    limit, amount, attempts = int(limit), int(amount), int(attempts)
    ledger = open_ledger(url)
    # Ask for a slice (a hold it cannot cover), and take it now.
    assert ledger.hold([(key, amount, limit)], "probe", 600.0) is None
    ledger.flush()
    time.sleep(0.2)  # the thread's own write, if any, is over
    admitted = 0
    for n in range(attempts):
        rid = f"{n}-{time.monotonic_ns()}"
        if ledger.hold([(key, amount, limit)], rid, 600.0) is None:
            plan = [[ReserveItem(key, amount, limit)]]
            if not ledger.reserve(plan, reservation_id=rid, lease_seconds=600.0).admitted:
                continue
        admitted += 1
        record = CallRecord(rid, time.time(), {}, "p", "m", "m", Usage(1, 1), 1, (), "ok")
        if not ledger.settle(rid, {key: amount}, record):
            ledger.commit(rid, {key: amount}, record=record)
    print(admitted, flush=True)
    if ending == "kill":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    if ending == "close":
        ledger.close()
    # "exit": no close; atexit writes what is held in memory
    """
)


def _workers(url: str, count: int, *args: object) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, *map(str, args)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]


FORKER = textwrap.dedent(
    """
    import os, sys, time, warnings
    from allowance._ledger import open_ledger
    from allowance.typing import CallRecord, ReserveItem, Usage

    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
    url, key = sys.argv[1:3]
    ledger = open_ledger(url)

    def call(rid):
        if ledger.hold([(key, 3, 300)], rid, 600.0) is None:
            plan = [[ReserveItem(key, 3, 300)]]
            assert ledger.reserve(plan, reservation_id=rid, lease_seconds=600.0).admitted
        record = CallRecord(rid, time.time(), {}, "p", "m", "m", Usage(1, 1), 3, (), "ok")
        if not ledger.settle(rid, {key: 3}, record):
            ledger.commit(rid, {key: 3}, record=record)

    assert ledger.hold([(key, 3, 300)], "probe", 600.0) is None
    ledger.flush()  # the parent's slice
    for n in range(10):
        call(f"parent-{n}")  # charged in memory: written within 1 s, or at close
    pid = os.fork()
    if pid == 0:
        # The child starts empty: no slice, none of the parent's charges.
        fresh = not ledger._rows and not ledger._records and not ledger._holds
        for n in range(10):
            call(f"child-{n}")
        ledger.close()
        os._exit(0 if fresh else 3)
    _, status = os.waitpid(pid, 0)
    ledger.close()
    print(os.waitstatus_to_exitcode(status), flush=True)
    """
)


def test_a_forked_child_starts_empty_and_neither_process_loses_a_charge(
    tmp_path: Path,
) -> None:
    """A child forked with the parent's slice and unwritten charges in memory
    starts with neither: each process writes its own 10 charges, once."""
    url = f"sqlite:///{tmp_path / 'fork.db'}?write_behind=1.0"
    key = "tenant:acme"
    done = subprocess.run(
        [sys.executable, "-c", FORKER, url, key],
        capture_output=True,
        text=True,
        timeout=30,  # a child that inherited the parent's locks hangs
        check=True,
    )
    assert done.stdout.strip() == "0", done.stderr  # the child's exit code
    plain = SQLiteLedger(tmp_path / "fork.db")
    try:
        assert plain.state([key])[key] == KeyState(60, 0)
        ids = sorted(record.call_id for record in plain.calls())
        assert ids == sorted(
            [f"parent-{n}" for n in range(10)] + [f"child-{n}" for n in range(10)]
        )
    finally:
        plain.close()


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["close", "exit"])
def test_processes_never_overspend(tmp_path: Path, ending: str) -> None:
    """4 processes x 60 calls of 3 under 300, each on its own slices: exactly
    100 admitted and 300 spent, whether they close or simply exit."""
    url = f"sqlite:///{tmp_path / 'shared.db'}?write_behind=0.002"
    open_ledger(url).close()
    workers = _workers(url, 4, "tenant:acme", 300, 3, 60, ending)
    admitted = 0
    for worker in workers:
        out, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0
        admitted += int(out)
    assert admitted == 100
    plain = SQLiteLedger(tmp_path / "shared.db")
    try:
        assert plain.state(["tenant:acme"])["tenant:acme"] == KeyState(300, 0)
        assert len(plain.calls()) == 100
    finally:
        plain.close()


@pytest.mark.slow
def test_a_killed_process_loses_only_what_it_had_not_written(
    tmp_path: Path,
) -> None:
    """SIGKILL before the thread writes (write_behind=1 s): its charges are lost,
    its slice holds budget until the slice's lease ends, then nothing."""
    url = f"sqlite:///{tmp_path / 'shared.db'}?write_behind=1"
    now = [time.time()]
    (worker,) = _workers(url, 1, "k", 10_000, 10, 5, "kill")
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == -9
    admitted = int(out)
    assert admitted == 5
    plain = SQLiteLedger(tmp_path / "shared.db", clock=lambda: now[0])
    try:
        # The 5 calls were charged in memory and never written: the price of
        # write-behind. The slice stays held until its lease ends.
        slice_amount = 10 * _write_behind.SLICE_CALLS
        assert plain.state(["k"])["k"] == KeyState(0, slice_amount)
        now[0] += _write_behind.SLICE_LEASE + 1
        plain.reserve([], reservation_id="tick", lease_seconds=1.0)  # reaps
        assert plain.state(["k"])["k"] == KeyState(0, 0)
    finally:
        plain.close()


def test_threads_share_one_slice_without_overspending(tmp_path: Path) -> None:
    """8 threads x 50 calls of 2 under 500: exactly 250 admitted."""
    ledger = WriteBehindLedger(tmp_path / "wb.db", write_behind=0.001)
    key = "tokens:session=a"
    counts: list[int] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        start.wait()
        admitted = 0
        for n in range(50):
            rid = f"{t}-{n}"
            if _admit(ledger, [(key, 2, 500)], rid):
                admitted += 1
                _charge(ledger, rid, {key: 2})
        counts.append(admitted)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sum(counts) == 250
        assert ledger.state([key])[key] == KeyState(500, 0)
    finally:
        ledger.close()
    plain = SQLiteLedger(tmp_path / "wb.db")
    try:
        assert plain.state([key])[key] == KeyState(500, 0)
        assert len(plain.calls()) == 250
    finally:
        plain.close()


def test_a_slice_running_low_is_topped_up_before_it_runs_out(tmp_path: Path) -> None:
    ledger = WriteBehindLedger(tmp_path / "wb.db", write_behind=1.0)
    key = "tokens:session=a"
    try:
        ledger.hold([(key, 10, 10_000)], "r0", LEASE)
        ledger.flush()  # a slice of 16 calls
        # Until fewer than _LOW_WATER calls' worth is left.
        calls = _write_behind.SLICE_CALLS - _write_behind._LOW_WATER + 1
        for n in range(1, calls + 1):
            assert ledger.hold([(key, 10, 10_000)], f"r{n}", LEASE)
            assert ledger.settle(f"r{n}", {key: 10}, call_record(f"r{n}"))
        # 3 calls' worth left: the top-up was asked for, and comes with the
        # next write, before any call misses.
        ledger.flush()
        for n in range(calls + 1, calls + 10):
            assert ledger.hold([(key, 10, 10_000)], f"r{n}", LEASE)
            assert ledger.settle(f"r{n}", {key: 10}, call_record(f"r{n}"))
    finally:
        ledger.close()


def test_an_idle_process_gives_its_slice_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_write_behind, "IDLE", 0.05)
    ledger = WriteBehindLedger(tmp_path / "wb.db", write_behind=0.001)
    key = "tokens:session=a"
    other = SQLiteLedger(tmp_path / "wb.db")
    try:
        ledger.hold([(key, 10, 10_000)], "r0", LEASE)
        ledger.flush()
        assert ledger.hold([(key, 10, 10_000)], "r1", LEASE)
        assert ledger.settle("r1", {key: 6}, call_record("r1"))
        deadline = time.monotonic() + 10
        while other.state([key])[key].reserved and time.monotonic() < deadline:
            time.sleep(0.02)
        assert other.state([key])[key] == KeyState(spent=6, reserved=0)
    finally:
        other.close()
        ledger.close()


def test_a_charge_through_the_file_beyond_the_limit_stops_the_slice(ledger) -> None:
    """A call reserved on the file (not the slice) charges more than it held
    and takes the key over its limit: the slice admits nothing more."""
    key = "tokens:session=a"
    assert _admit(ledger, [(key, 10, 100)], "r0")  # on the file: no slice yet
    ledger.flush()  # a slice of 45 (half of the 90 left)
    assert ledger.hold([(key, 10, 100)], "r1", LEASE) == {key: 10}
    ledger.commit("r0", {key: 95})  # estimate missed: 95 spent of 100
    ledger.release("r1")
    assert ledger.state([key])[key] == KeyState(95, 0)
    # The slice still holds 45 in the file, but the key has 5 left.
    assert ledger.hold([(key, 10, 100)], "r2", LEASE) is None
    assert not _admit(ledger, [(key, 10, 100)], "r3")
    assert _admit(ledger, [(key, 5, 100)], "r4")


def test_a_charge_in_memory_beyond_the_slice_is_written_before_a_decision(
    tmp_path: Path,
) -> None:
    """A call held on the slice charges more than the whole slice: a call
    decided on the file is decided with that charge, written first."""
    ledger = WriteBehindLedger(tmp_path / "wb.db", write_behind=1.0)  # writes wait
    key = "tokens:session=a"
    try:
        ledger.hold([(key, 10, 1000)], "r0", LEASE)
        ledger.flush()  # a slice of 160
        time.sleep(0.2)  # the thread's own write, if any, is over
        assert ledger.hold([(key, 10, 1000)], "r1", LEASE) == {key: 10}
        assert ledger.settle("r1", {key: 900}, call_record("r1"))  # far beyond

        def reserve(amount: int, rid: str) -> bool:  # a call not for the lane
            plan = [[ReserveItem(key, amount, 1000)]]
            return ledger.reserve(
                plan, reservation_id=rid, lease_seconds=LEASE
            ).admitted

        assert reserve(100, "r2")  # 900 + 100 = 1000
        assert not reserve(1, "r3")
        assert ledger.state([key])[key] == KeyState(900, 100)
    finally:
        ledger.close()


MP_CHILD = textwrap.dedent(
    """
    import multiprocessing, sys, warnings
    import allowance
    from allowance import Estimate, Usage

    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads

    def child(url):
        guard = allowance.Guard(budget=100_000, per="tenant", ledger=url)
        with allowance.scope(tenant="fork"):
            for _ in range(5):
                guard.begin(Estimate("openai", "gpt-4o-mini", 5, 5)).commit(
                    Usage(5, 5)
                )
        # returns without close(): multiprocessing ends the child with os._exit

    if __name__ == "__main__":
        process = multiprocessing.get_context("fork").Process(
            target=child, args=(sys.argv[1],)
        )
        process.start()
        process.join(60)
        print(process.exitcode, flush=True)
    """
)


def test_a_multiprocessing_fork_child_writes_its_charges_at_exit(
    tmp_path: Path,
) -> None:
    """multiprocessing's fork children end with ``os._exit``, past ``atexit``:
    its own exit hook writes what the child's write-behind ledger holds.

    If this fails with fewer than 50 spent and a slice still held: the
    ledgers' exit hook is not registered where multiprocessing runs it.
    """
    script = tmp_path / "mp_child.py"
    script.write_text(MP_CHILD)
    url = f"sqlite:///{tmp_path / 'mp.db'}?write_behind=1"
    done = subprocess.run(
        [sys.executable, str(script), url],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    assert done.stdout.strip() == "0", done.stderr
    plain = SQLiteLedger(tmp_path / "mp.db")
    try:
        key = "tokens:tenant=fork"
        assert plain.state([key])[key] == KeyState(50, 0)
        assert len(plain.calls()) == 5
    finally:
        plain.close()
