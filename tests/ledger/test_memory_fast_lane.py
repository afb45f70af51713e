"""The memory ledger's fast lane (``hold``/``settle``, used by the guard) changes
the ledger exactly as ``reserve``/``commit`` do."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from allowance import UsageError
from allowance._ledger._memory import MemoryLedger
from allowance.typing import CallRecord, ReserveItem, Usage

KEYS = ("tokens:session=a", "usd:session=a", "usd:tenant=t")


def _record(call_id: str) -> CallRecord:
    return CallRecord(
        call_id=call_id,
        ts=0.0,
        scope={"session": "a"},
        provider="openai",
        model="m",
        requested_model="m",
        usage=Usage(1, 1),
        cost_micros=1,
        adapters=(),
        outcome="ok",
    )


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
)
settles = st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 60))
resets = st.tuples(st.just("reset"), st.sampled_from(["usd:", "tokens:", "x"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(holds, settles, resets), max_size=40))
def test_fast_lane_matches_reserve_and_commit(steps: list[tuple[object, ...]]) -> None:
    clock = itertools.count(1000.0, 0.5).__next__
    fast, reference = MemoryLedger(clock=clock), MemoryLedger(clock=clock)
    ids: list[tuple[str, list[str]]] = []
    for n, step in enumerate(steps):
        if step[0] == "hold":
            items = step[1]
            assert isinstance(items, list)
            rid = f"r{n}"
            got = fast.hold(items, rid, 60.0)
            want = reference.reserve(
                [[ReserveItem(k, a, limit) for k, a, limit in items]],
                reservation_id=rid,
                lease_seconds=60.0,
            )
            assert (got is not None) == (want.plan is not None)
            if got is not None:
                assert got == {k: a for k, a, _ in items}
                ids.append((rid, [k for k, _, _ in items]))
        elif step[0] == "settle":
            _, index, amount = step
            assert isinstance(index, int)
            assert isinstance(amount, int)
            if not ids:
                continue
            rid, keys = ids[index % len(ids)]
            amounts = dict.fromkeys(keys, amount)
            if not fast.settle(rid, amounts, _record(rid)):
                fast.commit(rid, amounts, record=_record(rid))
            reference.commit(rid, amounts, record=_record(rid))
        else:
            prefix = step[1]
            assert isinstance(prefix, str)
            fast.reset(prefix)
            reference.reset(prefix)
        assert fast.keys() == reference.keys()
        assert len(fast.calls()) == len(reference.calls())


def test_settle_only_takes_held_reservations() -> None:
    ledger = MemoryLedger()
    assert ledger.hold([("tokens:s=a", 5, 10)], "r1", 60.0) == {"tokens:s=a": 5}
    assert ledger.hold([("tokens:s=a", 6, 10)], "r2", 60.0) is None  # 5 + 6 > 10
    assert ledger.settle("r1", {"tokens:s=a": 3}, _record("r1"))
    assert not ledger.settle("r1", {"tokens:s=a": 3}, _record("r1"))  # once
    assert not ledger.settle("unknown", {"tokens:s=a": 3}, _record("unknown"))
    assert ledger.state(["tokens:s=a"])["tokens:s=a"].spent == 3
    with pytest.raises(UsageError, match="r1"):
        ledger.hold([("tokens:s=a", 1, 10)], "r1", 60.0)  # ids are never reused
