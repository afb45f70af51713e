"""The memory ledger's fast lane (``hold``/``settle``, used by the guard) changes
the ledger exactly as ``reserve``/``commit`` do."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import event, given, settings

from allowance import UsageError
from allowance._ledger._memory import MemoryLedger
from allowance.typing import KeyState, ReserveItem

from .conftest import KEYS, call_record

# One step: hold keys (distinct) with amounts and limits, or settle an earlier id.
holds = st.tuples(
    st.just("hold"),
    st.lists(
        st.tuples(
            st.sampled_from(KEYS),
            st.integers(0, 50),
            st.integers(0, 120),
        ),
        min_size=1,
        max_size=3,
        unique_by=lambda item: item[0],
    ),
    st.sampled_from([1.0, 4.0, 60.0]),  # leases that end within the steps, or not
)
# A degraded call: the fallback's items (half the amounts), held past the
# gates of the call asked for (one per item, None: no gate).
degrades = st.tuples(
    st.just("degrade"),
    holds.map(lambda hold: hold[1]),
    st.sampled_from([1.0, 60.0]),
    st.lists(st.none() | st.integers(0, 120), min_size=3, max_size=3),
)
settles = st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 60))
resets = st.tuples(st.just("reset"), st.sampled_from(["usd:", "tokens:", "x"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(holds, degrades, settles, resets), max_size=40))
def test_fast_lane_matches_reserve_and_commit(steps: list[tuple[object, ...]]) -> None:
    now = [1000.0]  # half a second a step, the same for both ledgers

    def clock() -> float:
        return now[0]

    fast, reference = MemoryLedger(clock=clock), MemoryLedger(clock=clock)
    ids: list[tuple[str, list[str]]] = []
    for n, step in enumerate(steps):
        now[0] += 0.5
        if step[0] == "hold":
            _, items, lease = step
            assert isinstance(items, list)
            assert isinstance(lease, float)
            rid = f"r{n}"
            got = fast.hold(items, rid, lease)
            want = reference.reserve(
                [[ReserveItem(k, a, limit) for k, a, limit in items]],
                reservation_id=rid,
                lease_seconds=lease,
            )
            assert (got is not None) == (want.plan is not None)
            if got is not None:
                assert got == {k: a for k, a, _ in items}
                ids.append((rid, [k for k, _, _ in items]))
        elif step[0] == "degrade":
            _, items, lease, gates = step
            assert isinstance(items, list)
            assert isinstance(lease, float)
            assert isinstance(gates, list)
            if _degrade(fast, reference, f"r{n}", items, lease, gates[: len(items)]):
                ids.append((f"r{n}", [k for k, _, _ in items]))
        elif step[0] == "settle":
            _, index, amount = step
            assert isinstance(index, int)
            assert isinstance(amount, int)
            if not ids:
                continue
            rid, keys = ids[index % len(ids)]
            amounts = dict.fromkeys(keys, amount)
            if not fast.settle(rid, amounts, call_record(rid)):
                fast.commit(rid, amounts, record=call_record(rid))
            reference.commit(rid, amounts, record=call_record(rid))
        else:
            prefix = step[1]
            assert isinstance(prefix, str)
            fast.reset(prefix)
            reference.reset(prefix)
        assert fast.keys() == reference.keys()
        assert len(fast.calls()) == len(reference.calls())


def _degrade(  # noqa: PLR0917 - one step's parts
    fast: MemoryLedger,
    reference: MemoryLedger,
    rid: str,
    items: list[tuple[str, int, int]],
    lease: float,
    gates: list[int | None],
) -> bool:
    """The lane's degraded call on ``fast`` (the fallback's ``hold`` past the
    gates, else ``reserve``), two plans' ``reserve`` on ``reference``."""
    fallback = [(k, a // 2, limit) for k, a, limit in items]
    plans = [
        [
            ReserveItem(k, a, limit, gate)
            for (k, a, limit), gate in zip(items, gates, strict=True)
        ],
        [ReserveItem(*item) for item in fallback],
    ]
    got = fast.hold(fallback, rid, lease, None, gates)
    want = reference.reserve(plans, reservation_id=rid, lease_seconds=lease)
    gated = any(
        gate is not None and want.before[k].used > gate
        for (k, _, _), gate in zip(items, gates, strict=True)
    )
    # Held exactly when the call asked for is gated out and its fallback
    # fits: otherwise ``reserve`` decides, as the guard does.
    assert (got is not None) == (gated and want.plan == 1)
    event(f"degraded: {'held' if got is not None else f'plan {want.plan}'}")
    if got is None:
        result = fast.reserve(plans, reservation_id=rid, lease_seconds=lease)
        assert (result.plan, result.before) == (want.plan, want.before)
    return want.plan is not None


def test_settle_only_takes_held_reservations() -> None:
    ledger = MemoryLedger()
    assert ledger.hold([("tokens:s=a", 5, 10)], "r1", 60.0) == {"tokens:s=a": 5}
    assert ledger.hold([("tokens:s=a", 6, 10)], "r2", 60.0) is None  # 5 + 6 > 10
    assert ledger.settle("r1", {"tokens:s=a": 3}, call_record("r1"))
    assert not ledger.settle("r1", {"tokens:s=a": 3}, call_record("r1"))  # once
    assert not ledger.settle("unknown", {"tokens:s=a": 3}, call_record("unknown"))
    assert ledger.state(["tokens:s=a"])["tokens:s=a"].spent == 3
    with pytest.raises(UsageError, match="r1"):
        ledger.hold([("tokens:s=a", 1, 10)], "r1", 60.0)  # ids are never reused


def test_leases_end_in_any_order() -> None:
    """Holds with different leases expire when theirs ends, whatever the order."""
    now = [1000.0]
    ledger = MemoryLedger(clock=lambda: now[0])
    key = "tokens:s=a"
    assert ledger.hold([(key, 1, 100)], "short", 10.0)
    assert ledger.hold([(key, 2, 100)], "long", 30.0)
    assert ledger.hold([(key, 4, 100)], "middle", 20.0)
    assert ledger.settle("short", {key: 1}, call_record("short"))
    now[0] = 1015.0  # past the settled one's lease only: nothing expires
    assert ledger.hold([(key, 8, 100)], "later", 60.0)
    assert ledger.state([key])[key].reserved == 2 + 4 + 8
    now[0] = 1025.0  # "middle" ends
    assert ledger.state([key])[key].reserved == 2 + 4 + 8  # reads reap nothing
    assert ledger.hold([(key, 16, 100)], "last", 60.0)
    assert ledger.state([key])[key].reserved == 2 + 8 + 16
    assert not ledger.settle("middle", {key: 3}, call_record("middle"))
    ledger.commit("middle", {key: 3}, record=call_record("middle"))  # late: charged
    now[0] = 1031.0  # "long" ends
    ledger.reserve([], reservation_id="tick", lease_seconds=1.0)
    assert ledger.state([key])[key] == KeyState(spent=1 + 3, reserved=8 + 16)
