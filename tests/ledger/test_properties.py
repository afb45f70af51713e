"""Ledger invariants under random operations; SQLite and Redis == memory step by step."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from itertools import count
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from allowance._ledger import MemoryLedger, SQLiteLedger, open_ledger
from allowance._ledger._admission import choose_plan, fold_amounts
from allowance.testing.conformance import ManualClock
from allowance.typing import KeyState, ReserveItem

KEYS = ("a", "b", "c")

states = st.builds(KeyState, st.integers(0, 60), st.integers(0, 60))
items = st.builds(
    ReserveItem,
    key=st.sampled_from(KEYS),
    amount=st.integers(0, 40),
    limit=st.integers(0, 100),
    gate=st.none() | st.integers(0, 100),
)
plans = st.lists(st.lists(items, max_size=4), max_size=3)


def _fits_by_definition(plan, state) -> bool:
    """The rule written out independently of ``_admission``."""
    for key in {item.key for item in plan}:
        mine = [item for item in plan if item.key == key]
        used = state.get(key, KeyState()).used
        if used + sum(item.amount for item in mine) > min(i.limit for i in mine):
            return False
        gates = [item.gate for item in mine if item.gate is not None]
        if gates and used > min(gates):
            return False
    return True


@given(plans=plans, state=st.dictionaries(st.sampled_from(KEYS), states))
def test_choose_plan_matches_the_definition(plans, state) -> None:
    expected = next(
        (i for i, plan in enumerate(plans) if _fits_by_definition(plan, state)), None
    )
    assert choose_plan(plans, state) == expected


class LedgerMachine(RuleBasedStateMachine):
    """Drive a memory and a SQLite ledger with the same steps and a model.

    The model tracks live holds (reservation -> (holds, expires_at)); a hold
    leaves when it settles or when a reserve reaps it after its lease.
    """

    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.directory = tempfile.mkdtemp(prefix="allowance-ledger-")
        self.memory = MemoryLedger(self.clock)
        self.sqlite = SQLiteLedger(Path(self.directory) / "l.db", clock=self.clock)
        self.ids = count()
        self.live: dict[str, tuple[dict[str, int], float]] = {}
        self.settled: set[str] = set()
        self.spent = dict.fromkeys(KEYS, 0)
        self.limits = dict.fromkeys(KEYS, 0)
        # True once a commit charged more than a live hold covered: from then
        # on spend may pass a limit by design (never drop a charge).
        self.overcharged = False

    @initialize(limits=st.tuples(*(st.integers(0, 120) for _ in KEYS)))
    def set_limits(self, limits) -> None:
        self.limits = dict(zip(KEYS, limits, strict=True))

    def _ledgers(self):
        return (self.memory, self.sqlite)

    def _reap(self) -> None:
        now = self.clock()
        for reservation_id, (_, expires_at) in list(self.live.items()):
            if expires_at <= now:
                del self.live[reservation_id]

    def _model_state(self) -> dict[str, KeyState]:
        reserved = dict.fromkeys(KEYS, 0)
        for holds, _ in self.live.values():
            for key, amount in holds.items():
                reserved[key] += amount
        return {key: KeyState(self.spent[key], reserved[key]) for key in KEYS}

    @rule(
        target=held,
        data=st.data(),
        lease=st.sampled_from([1.0, 3.0, 30.0]),
    )
    def reserve(self, data, lease):
        plan_items = st.builds(
            lambda key, amount, slack, gate: ReserveItem(
                key, amount, self.limits[key] - slack, gate
            ),
            key=st.sampled_from(KEYS),
            amount=st.integers(0, 50),
            slack=st.integers(0, 10),
            gate=st.none() | st.integers(0, 120),
        )
        chosen = data.draw(st.lists(st.lists(plan_items, max_size=3), max_size=3))
        reservation_id = f"r{next(self.ids)}"
        results = [
            ledger.reserve(chosen, reservation_id=reservation_id, lease_seconds=lease)
            for ledger in self._ledgers()
        ]
        assert results[0] == results[1]
        self._reap()
        model = self._model_state()
        plan_keys = {item.key for plan in chosen for item in plan}
        assert dict(results[0].before) == {key: model[key] for key in plan_keys}
        assert results[0].plan == choose_plan(chosen, model)
        if results[0].plan is None:
            return multiple()
        holds = fold_amounts(chosen[results[0].plan])
        self.live[reservation_id] = (holds, self.clock() + lease)
        return reservation_id

    @rule(reservation_id=held, data=st.data())
    def commit(self, reservation_id, data):
        settled = reservation_id in self.settled
        self.settled.add(reservation_id)
        live = self.live.pop(reservation_id, None)
        holds = live[0] if live is not None else {}
        amounts = {
            key: data.draw(st.integers(0, amount), label=f"charge {key}")
            for key, amount in holds.items()
            if data.draw(st.booleans(), label=f"charge {key}?")
        }
        if data.draw(st.booleans(), label="overcharge?"):
            extra = data.draw(st.sampled_from(KEYS), label="extra key")
            amounts[extra] = amounts.get(extra, 0) + data.draw(st.integers(1, 30))
        if not settled:  # a repeat changes nothing
            for key, amount in amounts.items():
                if amount > holds.get(key, 0):
                    self.overcharged = True
                self.spent[key] += amount
        for ledger in self._ledgers():
            ledger.commit(reservation_id, amounts)

    @rule(reservation_id=held)
    def release(self, reservation_id):
        self.settled.add(reservation_id)
        self.live.pop(reservation_id, None)
        for ledger in self._ledgers():
            ledger.release(reservation_id)
            ledger.release(reservation_id)

    @rule(key=st.sampled_from(KEYS), amount=st.integers(0, 20))
    def commit_unknown(self, key, amount):
        reservation_id = f"unknown{next(self.ids)}"
        self.spent[key] += amount
        self.overcharged = self.overcharged or amount > 0
        for ledger in self._ledgers():
            ledger.commit(reservation_id, {key: amount})

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 30.0]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @precondition(lambda self: self.live)
    @rule()
    def advance_to_the_next_lease_end(self):
        """Land exactly on an end of lease, where ``expires_at <= now`` bites."""
        self.clock.advance(
            max(0.0, min(end for _, end in self.live.values()) - self.clock())
        )

    @rule()
    def reap(self):
        reservation_id = f"reap{next(self.ids)}"
        for ledger in self._ledgers():
            assert not ledger.reserve(
                [], reservation_id=reservation_id, lease_seconds=1
            ).admitted
        self._reap()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def settle_an_expired_one(self, data):
        """Commit a hold whose lease ended but that nothing reaped yet."""
        reservation_id = data.draw(st.sampled_from(sorted(self.live)))
        holds, expires_at = self.live.pop(reservation_id)
        self.settled.add(reservation_id)
        if expires_at > self.clock():
            self.clock.advance(expires_at - self.clock())
        for key, amount in holds.items():
            self.spent[key] += amount
        for ledger in self._ledgers():
            ledger.commit(reservation_id, holds)

    @rule(prefix=st.sampled_from(["", "a", "b"]))
    def reset(self, prefix):
        for key in KEYS:
            if key.startswith(prefix):
                self.spent[key] = 0
        for reservation_id, (holds, expires_at) in list(self.live.items()):
            kept = {k: v for k, v in holds.items() if not k.startswith(prefix)}
            self.live[reservation_id] = (kept, expires_at)
        for ledger in self._ledgers():
            ledger.reset(prefix)

    @invariant()
    def backends_agree(self):
        assert self.memory.keys() == self.sqlite.keys()

    @invariant()
    def reserved_is_the_sum_of_live_holds(self):
        model = self._model_state()
        for ledger in self._ledgers():
            assert ledger.state(KEYS) == model

    @invariant()
    def spent_stays_within_limits(self):
        if self.overcharged:
            return
        for key, state in self.memory.state(KEYS).items():
            assert state.spent <= self.limits[key]

    def teardown(self):
        try:
            for reservation_id in list(self.live):
                for ledger in self._ledgers():
                    ledger.release(reservation_id)
            self.live.clear()
            for ledger in self._ledgers():
                assert all(s.reserved == 0 for s in ledger.state(KEYS).values())
                assert {k: s.spent for k, s in ledger.state(KEYS).items()} == self.spent
        finally:
            self.sqlite.close()
            shutil.rmtree(self.directory, ignore_errors=True)


LedgerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerMachine = LedgerMachine.TestCase


# -- the same steps on Redis --------------------------------------------------------

_redis: dict[str, str] = {}


@pytest.fixture
def _redis_for_the_machine(redis_server):
    _redis["url"] = redis_server.url
    yield
    _redis.clear()


class RedisLedgerMachine(LedgerMachine):
    """Memory, SQLite and Redis (on the test's redis-server) driven step by step."""

    def __init__(self) -> None:
        super().__init__()
        url = f"{_redis['url']}?prefix=p-{uuid.uuid4().hex}"
        self.redis = open_ledger(url, clock=self.clock)

    def _ledgers(self):
        return (self.memory, self.sqlite, self.redis)

    @invariant()
    def redis_agrees(self):
        assert self.redis.keys() == self.memory.keys()

    def teardown(self):
        try:
            super().teardown()
        finally:
            self.redis.reset()
            self.redis.close()


RedisLedgerMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRedisLedgerMachine = pytest.mark.usefixtures("_redis_for_the_machine")(
    RedisLedgerMachine.TestCase
)
