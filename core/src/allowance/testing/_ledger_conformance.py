# ruff: noqa: S101, PLR2004 - a test suite: asserts and literal expectations
"""The ledger conformance suite: the behaviour every ledger backend must show.

Subclass ``LedgerConformance`` in a test module and say how to build a fresh,
empty ledger; every test then runs against it::

    from allowance.testing.conformance import LedgerConformance

    class TestMyLedger(LedgerConformance):
        def make_ledger(self):
            return MyLedger(...)

        def make_ledger_with_clock(self, clock):
            return MyLedger(..., clock=clock)

``self.tmp_path`` is a fresh directory for each test. Overriding a test to
skip it fails ``test_no_overrides_DO_NOT_OVERRIDE``: mark the override
``@pytest.mark.xfail(reason="...")`` instead, saying why.

The async tests drive the ``a*`` twins with ``asyncio.run``, so the suite
needs no pytest plugin beyond pytest itself.

For ledgers shared by processes, ``run_reserve_commit_loop`` and
``hold_until_killed`` are the bodies of child processes (started with
multiprocessing's ``spawn``), as ``tests/ledger/test_sqlite_processes.py`` shows.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import pytest

from allowance import AllowanceError, ConfigurationError
from allowance.testing._suite import unmarked_overrides
from allowance.typing import CallRecord, KeyState, Ledger, ReserveItem, Usage

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

__all__ = [
    "LedgerConformance",
    "ManualClock",
    "hold_until_killed",
    "run_reserve_commit_loop",
]

_BIG = 10**15
_ZERO = KeyState()


class ManualClock:
    """A clock that only moves when told: inject it to test leases.

    Example:
        >>> clock = ManualClock()
        >>> clock.advance(30)
        >>> clock() - ManualClock.START
        30.0
    """

    START: ClassVar[float] = 1_800_000_000.0
    """Where a new clock starts (January 2027): a realistic Unix time."""

    def __init__(self, now: float = START) -> None:
        """Start the clock at ``now``."""
        self.now = float(now)

    def __call__(self) -> float:
        """Return the current time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


class _Settable(Protocol):
    def set(self) -> None: ...


class _Waitable(Protocol):
    def wait(self, timeout: float | None = None) -> object: ...


class _Putable(Protocol):
    def put(self, item: Any) -> None: ...


def run_reserve_commit_loop(
    url: str,
    *,
    key: str,
    limit: int,
    amount: int,
    attempts: int,
    start: _Waitable | None = None,
    results: _Putable | None = None,
) -> int:
    """Try ``attempts`` reserve+commit pairs of ``amount`` on ``key``.

    The body of a child process in multi-process tests: it opens the ledger
    at ``url`` itself, waits on ``start`` (an event or a barrier, so that all
    processes contend at once) and commits exactly what it reserved.

    Returns:
        How many reserves were admitted; also put on ``results`` if given.
    """
    from allowance._ledger import open_ledger  # noqa: PLC0415 - in the child only

    ledger = open_ledger(url)
    try:
        if start is not None:
            start.wait(60)
        admitted = 0
        plan = [[ReserveItem(key, amount, limit)]]
        for _ in range(attempts):
            reservation_id = uuid.uuid4().hex
            result = ledger.reserve(
                plan, reservation_id=reservation_id, lease_seconds=60
            )
            if result.admitted:
                admitted += 1
                ledger.commit(reservation_id, {key: amount})
        if results is not None:
            results.put(admitted)
        return admitted
    finally:
        ledger.close()


def hold_until_killed(
    url: str,
    *,
    key: str,
    spend: int,
    hold: int,
    lease_seconds: float,
    ready: _Settable,
) -> None:
    """Commit ``spend`` on ``key``, hold ``hold`` more, signal ``ready``, then hang.

    The body of a child process that a test kills while it holds a
    reservation.
    """
    from allowance._ledger import open_ledger  # noqa: PLC0415 - in the child only

    ledger = open_ledger(url)
    first = uuid.uuid4().hex
    ledger.reserve(
        [[ReserveItem(key, spend, _BIG)]], reservation_id=first, lease_seconds=60
    )
    ledger.commit(first, {key: spend})
    ledger.reserve(
        [[ReserveItem(key, hold, _BIG)]],
        reservation_id=uuid.uuid4().hex,
        lease_seconds=lease_seconds,
    )
    ready.set()
    while True:
        time.sleep(60)


def _rid() -> str:
    return uuid.uuid4().hex


def _plan(
    *items: tuple[str, int, int] | tuple[str, int, int, int],
) -> list[ReserveItem]:
    return [ReserveItem(*item) for item in items]


def _record(call_id: str, ts: float, **changes: Any) -> CallRecord:
    fields: dict[str, Any] = {
        "call_id": call_id,
        "ts": ts,
        "scope": {"tenant": "acme", "run": "r-17"},
        "provider": "openai",
        "model": "gpt-4o-mini",
        "requested_model": "gpt-4o",
        "usage": Usage(
            input_tokens=1200,
            output_tokens=300,
            cache_read_tokens=1000,
            cache_write_tokens=0,
            reasoning_tokens=64,
        ),
        "cost_micros": 1234,
        "adapters": ("langchain", "openai"),
        "outcome": "degraded",
        "estimate_tokens": 2000,
        "estimate_micros": 2500,
        "latency_ms": 812.5,
    }
    fields.update(changes)
    return CallRecord(**fields)


class LedgerConformance:
    """The behaviour every ``allowance.typing.Ledger`` must show.

    Subclasses implement ``make_ledger`` and ``make_ledger_with_clock``. Each
    test builds its own ledger, which must start empty.
    """

    tmp_path: Path
    """A fresh directory for the current test (set before each test runs)."""

    # -- what subclasses provide ----------------------------------------------

    def make_ledger(self) -> Ledger:
        """Return a new, empty ledger. Subclasses must override this."""
        msg = f"{type(self).__name__} must implement make_ledger()"
        raise NotImplementedError(msg)

    def make_ledger_with_clock(self, clock: Callable[[], float]) -> Ledger:
        """Return a new, empty ledger that reads the time from ``clock``.

        The lease tests need it. A backend that cannot take a clock (one that
        uses its server's time) marks those tests
        ``pytest.mark.xfail(reason=...)`` and relies on
        ``test_lease_expires_in_real_time``.
        """
        msg = f"{type(self).__name__} must implement make_ledger_with_clock(clock)"
        raise NotImplementedError(msg)

    # -- fixtures -------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _conformance_tmp_path(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    @pytest.fixture
    def ledger(self) -> Iterator[Ledger]:
        """A fresh ledger from ``make_ledger``, closed after the test."""
        ledger = self.make_ledger()
        try:
            yield ledger
        finally:
            ledger.close()

    @pytest.fixture
    def clock(self) -> ManualClock:
        """A manual clock for ``clocked``."""
        return ManualClock()

    @pytest.fixture
    def clocked(self, clock: ManualClock) -> Iterator[Ledger]:
        """A fresh ledger from ``make_ledger_with_clock(clock)``."""
        ledger = self.make_ledger_with_clock(clock)
        try:
            yield ledger
        finally:
            ledger.close()

    # -- the guard ------------------------------------------------------------

    def test_no_overrides_DO_NOT_OVERRIDE(self) -> None:  # noqa: N802 - a warning sign
        """No conformance test is overridden or deleted without ``xfail(reason=...)``.

        If this fails: remove the override, or mark it
        ``@pytest.mark.xfail(reason="...")`` saying why the backend differs.
        """
        problems = unmarked_overrides(LedgerConformance, type(self))
        assert not problems, "; ".join(problems)

    # -- the protocol ---------------------------------------------------------

    def test_is_a_ledger(self, ledger: Ledger) -> None:
        """The ledger satisfies ``allowance.typing.Ledger`` and has a str ``url``.

        If this fails: a method of the protocol is missing or misnamed.
        """
        assert isinstance(ledger, Ledger)
        assert isinstance(ledger.url, str)
        assert ledger.url

    def test_close_twice_is_harmless(self, ledger: Ledger) -> None:
        """``close`` may be called more than once.

        If this fails: ``close`` must tolerate an already closed ledger.
        """
        ledger.close()
        ledger.close()

    # -- reserve --------------------------------------------------------------

    def test_reserve_admits_within_limit(self, ledger: Ledger) -> None:
        """A plan that fits is admitted and its amount counts as reserved.

        If this fails: admission must check ``spent + reserved + amount <= limit``
        and hold the amount on success.
        """
        result = ledger.reserve(
            [_plan(("k", 40, 100))], reservation_id=_rid(), lease_seconds=60
        )
        assert result.admitted
        assert result.plan == 0
        assert ledger.state(["k"])["k"] == KeyState(spent=0, reserved=40)

    def test_reserve_limit_is_inclusive(self, ledger: Ledger) -> None:
        """Reaching the limit exactly is allowed; one more is refused.

        If this fails: compare with ``<=``, not ``<``.
        """
        first = ledger.reserve(
            [_plan(("k", 60, 100))], reservation_id=_rid(), lease_seconds=60
        )
        exact = ledger.reserve(
            [_plan(("k", 40, 100))], reservation_id=_rid(), lease_seconds=60
        )
        over = ledger.reserve(
            [_plan(("k", 1, 100))], reservation_id=_rid(), lease_seconds=60
        )
        assert first.admitted
        assert exact.admitted
        assert not over.admitted
        assert ledger.state(["k"])["k"].reserved == 100

    def test_reserve_denied_holds_nothing(self, ledger: Ledger) -> None:
        """A refused reserve changes no counter and reports ``plan=None``.

        If this fails: nothing may be written when no plan fits.
        """
        result = ledger.reserve(
            [_plan(("k", 101, 100))], reservation_id=_rid(), lease_seconds=60
        )
        assert result.plan is None
        assert not result.admitted
        assert ledger.state(["k"])["k"] == _ZERO

    def test_reserve_is_all_or_nothing_across_keys(self, ledger: Ledger) -> None:
        """If one key of a plan does not fit, no key of it is held.

        If this fails: check every item before holding any of them, atomically.
        """
        result = ledger.reserve(
            [_plan(("a", 10, 100), ("b", 10, 100), ("c", 10, 5))],
            reservation_id=_rid(),
            lease_seconds=60,
        )
        assert not result.admitted
        assert ledger.state(["a", "b", "c"]) == {"a": _ZERO, "b": _ZERO, "c": _ZERO}

    def test_reserve_counts_spent_and_reserved(self, ledger: Ledger) -> None:
        """Admission checks committed spend plus what other reservations hold.

        If this fails: the check must use ``spent + reserved``, not one of them.
        """
        spent = _rid()
        ledger.reserve([_plan(("k", 50, 100))], reservation_id=spent, lease_seconds=60)
        ledger.commit(spent, {"k": 50})
        ledger.reserve([_plan(("k", 30, 100))], reservation_id=_rid(), lease_seconds=60)
        refused = ledger.reserve(
            [_plan(("k", 21, 100))], reservation_id=_rid(), lease_seconds=60
        )
        fits = ledger.reserve(
            [_plan(("k", 20, 100))], reservation_id=_rid(), lease_seconds=60
        )
        assert not refused.admitted
        assert fits.admitted
        assert ledger.state(["k"])["k"] == KeyState(spent=50, reserved=50)

    def test_reserve_picks_first_plan_that_fits(self, ledger: Ledger) -> None:
        """Plans are tried in order; the first that fits is held, and only it.

        If this fails: return the index of the first fitting plan and hold
        nothing of the others.
        """
        result = ledger.reserve(
            [_plan(("k", 200, 100)), _plan(("k", 50, 100)), _plan(("k", 10, 100))],
            reservation_id=_rid(),
            lease_seconds=60,
        )
        assert result.plan == 1
        assert ledger.state(["k"])["k"].reserved == 50

    def test_reserve_gate(self, ledger: Ledger) -> None:
        """A plan with a gate applies only while ``spent + reserved <= gate``.

        If this fails: skip a plan when a key's current use exceeds its gate
        (equal to the gate still passes).
        """
        ledger.reserve([_plan(("k", 80, 100))], reservation_id=_rid(), lease_seconds=60)
        gated = [_plan(("k", 5, 100, 79)), _plan(("k", 1, 100))]
        assert ledger.reserve(gated, reservation_id=_rid(), lease_seconds=60).plan == 1
        at_gate = [_plan(("k", 5, 100, 81)), _plan(("k", 1, 100))]
        assert (
            ledger.reserve(at_gate, reservation_id=_rid(), lease_seconds=60).plan == 0
        )
        assert ledger.state(["k"])["k"].reserved == 86

    def test_reserve_same_key_twice_in_a_plan(self, ledger: Ledger) -> None:
        """A key named twice in one plan holds the sum, under the smaller limit.

        If this fails: fold a plan's items per key before checking (amounts
        add, the smallest limit and gate apply).
        """
        too_much = _plan(("k", 30, 100), ("k", 30, 50))
        result = ledger.reserve([too_much], reservation_id=_rid(), lease_seconds=60)
        assert not result.admitted
        fits = _plan(("k", 20, 100), ("k", 30, 50))
        result = ledger.reserve([fits], reservation_id=_rid(), lease_seconds=60)
        assert result.admitted
        assert ledger.state(["k"])["k"].reserved == 50

    def test_reserve_before_has_every_key(self, ledger: Ledger) -> None:
        """``before`` holds the state of every key of every plan, before the hold.

        If this fails: read all the plans' keys (zeros for new ones) before
        holding anything, and return them whether or not a plan was admitted.
        """
        ledger.reserve([_plan(("a", 7, 100))], reservation_id=_rid(), lease_seconds=60)
        result = ledger.reserve(
            [_plan(("a", 500, 100), ("b", 1, 100)), _plan(("a", 3, 100), ("c", 1, 9))],
            reservation_id=_rid(),
            lease_seconds=60,
        )
        assert result.plan == 1
        assert dict(result.before) == {
            "a": KeyState(0, 7),
            "b": _ZERO,
            "c": _ZERO,
        }

    def test_reserve_empty_plan_always_fits(self, ledger: Ledger) -> None:
        """A plan with no items fits; an empty list of plans admits nothing.

        If this fails: a plan fits when all of its (zero) items fit.
        """
        assert ledger.reserve([[]], reservation_id=_rid(), lease_seconds=60).plan == 0
        assert ledger.reserve([], reservation_id=_rid(), lease_seconds=60).plan is None

    def test_reserve_rejects_negative_amounts(self, ledger: Ledger) -> None:
        """A negative amount raises ``ConfigurationError`` and holds nothing.

        If this fails: validate amounts before writing.
        """
        with pytest.raises(ConfigurationError, match="-5"):
            ledger.reserve(
                [_plan(("a", 5, 100), ("b", -5, 100))],
                reservation_id=_rid(),
                lease_seconds=60,
            )
        assert ledger.state(["a", "b"]) == {"a": _ZERO, "b": _ZERO}

    def test_reserve_rejects_bad_leases(self, ledger: Ledger) -> None:
        """A lease that is not a finite number of seconds > 0 is refused.

        If this fails: validate ``lease_seconds`` (0, negative, NaN, infinity).
        """
        for lease in (0, -1.0, math.nan, math.inf):
            with pytest.raises(ConfigurationError, match="lease_seconds"):
                ledger.reserve(
                    [_plan(("k", 1, 100))], reservation_id=_rid(), lease_seconds=lease
                )
        assert ledger.state(["k"])["k"] == _ZERO

    def test_reserve_rejects_a_reused_id(self, ledger: Ledger) -> None:
        """Reserving again under a known id raises and leaves the first hold alone.

        If this fails: an admitted reserve must not merge into, or replace, an
        existing reservation; raise an ``AllowanceError`` (``UsageError``).
        """
        reservation_id = _rid()
        ledger.reserve(
            [_plan(("k", 5, 100))], reservation_id=reservation_id, lease_seconds=60
        )
        with pytest.raises(AllowanceError, match=reservation_id):
            ledger.reserve(
                [_plan(("k", 7, 100))], reservation_id=reservation_id, lease_seconds=60
            )
        assert ledger.state(["k"])["k"].reserved == 5
        ledger.commit(reservation_id, {"k": 5})
        assert ledger.state(["k"])["k"] == KeyState(spent=5, reserved=0)

    # -- commit and release ---------------------------------------------------

    def test_commit_moves_the_hold_to_spent(self, ledger: Ledger) -> None:
        """Commit charges ``amounts`` and gives back the whole hold.

        If this fails: ``reserved -= hold`` and ``spent += amount``, per key,
        in one step.
        """
        reservation_id = _rid()
        ledger.reserve(
            [_plan(("a", 50, 100), ("b", 10, 100))],
            reservation_id=reservation_id,
            lease_seconds=60,
        )
        ledger.commit(reservation_id, {"a": 30, "b": 10})
        assert ledger.state(["a", "b"]) == {"a": KeyState(30, 0), "b": KeyState(10, 0)}

    def test_commit_above_the_hold_is_charged_in_full(self, ledger: Ledger) -> None:
        """Actual use above the reservation is charged in full, past the limit.

        If this fails: never cap a charge at the hold or the limit.
        """
        reservation_id = _rid()
        ledger.reserve(
            [_plan(("k", 10, 100))], reservation_id=reservation_id, lease_seconds=60
        )
        ledger.commit(reservation_id, {"k": 150})
        assert ledger.state(["k"])["k"] == KeyState(spent=150, reserved=0)

    def test_commit_charges_zero_for_absent_keys(self, ledger: Ledger) -> None:
        """A held key missing from ``amounts`` is charged 0 and its hold returned.

        If this fails: give back the hold of every key of the reservation.
        """
        reservation_id = _rid()
        ledger.reserve(
            [_plan(("a", 10, 100), ("b", 10, 100))],
            reservation_id=reservation_id,
            lease_seconds=60,
        )
        ledger.commit(reservation_id, {"a": 4})
        assert ledger.state(["a", "b"]) == {"a": KeyState(4, 0), "b": _ZERO}

    def test_commit_charges_keys_it_did_not_hold(self, ledger: Ledger) -> None:
        """A key in ``amounts`` that the reservation did not hold is charged.

        If this fails: never drop a charge, even on a key with no hold.
        """
        reservation_id = _rid()
        ledger.reserve(
            [_plan(("a", 10, 100))], reservation_id=reservation_id, lease_seconds=60
        )
        ledger.commit(reservation_id, {"a": 10, "extra": 7})
        assert ledger.state(["a", "extra"]) == {
            "a": KeyState(10, 0),
            "extra": KeyState(7, 0),
        }

    def test_commit_is_idempotent(self, ledger: Ledger) -> None:
        """A second commit of the same id changes nothing.

        If this fails: record that the reservation settled, and check it first.
        """
        reservation_id = _rid()
        ledger.reserve(
            [_plan(("k", 10, 100))], reservation_id=reservation_id, lease_seconds=60
        )
        ledger.commit(reservation_id, {"k": 8})
        ledger.commit(reservation_id, {"k": 8})
        ledger.commit(reservation_id, {"k": 99, "other": 1})
        assert ledger.state(["k", "other"]) == {"k": KeyState(8, 0), "other": _ZERO}

    def test_commit_of_an_unknown_id_charges(self, ledger: Ledger) -> None:
        """Committing an id the ledger never saw charges ``amounts``, once.

        If this fails: a commit from a fresh process, or for a purged row,
        must not lose its charge; and a repeat must not charge twice.
        """
        reservation_id = _rid()
        ledger.commit(reservation_id, {"k": 12})
        ledger.commit(reservation_id, {"k": 12})
        assert ledger.state(["k"])["k"] == KeyState(spent=12, reserved=0)

    def test_release_drops_the_hold(self, ledger: Ledger) -> None:
        """Release gives back the hold and charges nothing; a repeat is a no-op.

        If this fails: ``reserved -= hold`` per key, and mark it settled.
        """
        reservation_id = _rid()
        ledger.reserve(
            [_plan(("a", 10, 100), ("b", 5, 100))],
            reservation_id=reservation_id,
            lease_seconds=60,
        )
        ledger.release(reservation_id)
        ledger.release(reservation_id)
        assert ledger.state(["a", "b"]) == {"a": _ZERO, "b": _ZERO}

    def test_release_of_an_unknown_id_is_a_no_op(self, ledger: Ledger) -> None:
        """Releasing an unknown id changes nothing; a later commit still charges.

        If this fails: do not record a release for an unknown id.
        """
        reservation_id = _rid()
        ledger.release(reservation_id)
        assert ledger.keys() == {}
        ledger.commit(reservation_id, {"k": 3})
        assert ledger.state(["k"])["k"] == KeyState(spent=3, reserved=0)

    def test_settled_reservations_stay_settled(self, ledger: Ledger) -> None:
        """After a release, a commit changes nothing; after a commit, a release.

        If this fails: the first of commit/release wins; later ones are no-ops.
        """
        released, committed = _rid(), _rid()
        for reservation_id in (released, committed):
            ledger.reserve(
                [_plan(("k", 10, 100))],
                reservation_id=reservation_id,
                lease_seconds=60,
            )
        ledger.release(released)
        ledger.commit(released, {"k": 10})
        ledger.commit(committed, {"k": 6})
        ledger.release(committed)
        assert ledger.state(["k"])["k"] == KeyState(spent=6, reserved=0)

    def test_commit_rejects_negative_amounts(self, ledger: Ledger) -> None:
        """A negative commit amount raises ``ConfigurationError``; nothing changes.

        If this fails: validate amounts before writing.
        """
        reservation_id = _rid()
        ledger.reserve(
            [_plan(("k", 10, 100))], reservation_id=reservation_id, lease_seconds=60
        )
        with pytest.raises(ConfigurationError, match="-1"):
            ledger.commit(reservation_id, {"k": -1})
        assert ledger.state(["k"])["k"] == KeyState(spent=0, reserved=10)
        ledger.commit(reservation_id, {"k": 1})
        assert ledger.state(["k"])["k"] == KeyState(spent=1, reserved=0)

    # -- the call log ---------------------------------------------------------

    def test_record_round_trips(self, ledger: Ledger) -> None:
        """A logged call reads back equal, field for field.

        If this fails: store every ``CallRecord`` field, ``None`` included.
        """
        full = _record("c-1", 1_000.5)
        sparse = _record(
            "c-2",
            1_001.0,
            scope={"user": "zoë ✓"},
            cost_micros=None,
            estimate_micros=None,
            adapters=(),
            usage=Usage(),
            outcome="error",
        )
        ledger.record(full)
        ledger.record(sparse)
        assert ledger.calls() == [full, sparse]
        assert ledger.keys() == {}

    def test_calls_window_and_order(self, ledger: Ledger) -> None:
        """``calls`` returns ``since <= ts < until``, oldest first.

        If this fails: sort by ``ts`` (then by insertion); ``since`` is
        inclusive and ``until`` exclusive.
        """
        for call_id, ts in (("c", 30.0), ("a", 10.0), ("d", 40.0), ("b", 20.0)):
            ledger.record(_record(call_id, ts))
        assert [c.call_id for c in ledger.calls()] == ["a", "b", "c", "d"]
        window = ledger.calls(since=20.0, until=40.0)
        assert [c.call_id for c in window] == ["b", "c"]
        assert [c.call_id for c in ledger.calls(since=35.0)] == ["d"]
        assert [c.call_id for c in ledger.calls(until=10.0)] == []

    def test_commit_and_release_log_their_record(self, ledger: Ledger) -> None:
        """``record=`` is logged with the commit or release, once.

        If this fails: write the record in the same step as the counters, and
        not again on a repeated (no-op) commit or release.
        """
        committed, released = _rid(), _rid()
        for reservation_id in (committed, released):
            ledger.reserve(
                [_plan(("k", 10, 100))],
                reservation_id=reservation_id,
                lease_seconds=60,
            )
        first = _record(committed, 1.0)
        second = _record(released, 2.0, outcome="error")
        ledger.commit(committed, {"k": 10}, record=first)
        ledger.commit(committed, {"k": 10}, record=first)
        ledger.release(released, record=second)
        ledger.release(released, record=second)
        assert ledger.calls() == [first, second]

    # -- markers, state, keys, reset ------------------------------------------

    def test_claim_is_true_once(self, ledger: Ledger) -> None:
        """``claim`` is True for the first caller of a marker only.

        If this fails: set the marker atomically and report whether it was new.
        """
        assert ledger.claim("threshold:0.8:tenant=acme")
        assert not ledger.claim("threshold:0.8:tenant=acme")
        assert ledger.claim("threshold:0.9:tenant=acme")

    def test_state_of_unknown_keys_is_zero(self, ledger: Ledger) -> None:
        """``state`` returns every key asked for, zeros for unknown ones.

        If this fails: fill in ``KeyState()`` for keys with no counter.
        """
        assert ledger.state(["x", "y"]) == {"x": _ZERO, "y": _ZERO}
        assert ledger.state([]) == {}

    def test_keys_by_prefix(self, ledger: Ledger) -> None:
        """``keys(prefix)`` returns the counters whose key starts with it.

        If this fails: match a literal prefix (no wildcards), all keys for "".
        """
        for key in ("usd:tenant=a", "usd:tenant=b", "tokens:tenant=a", "usd_%"):
            reservation_id = _rid()
            ledger.reserve(
                [_plan((key, 1, 100))], reservation_id=reservation_id, lease_seconds=60
            )
            ledger.commit(reservation_id, {key: 1})
        assert set(ledger.keys("usd:")) == {"usd:tenant=a", "usd:tenant=b"}
        assert set(ledger.keys("usd_")) == {"usd_%"}
        assert ledger.keys("tokens:")["tokens:tenant=a"] == KeyState(1, 0)
        assert len(ledger.keys()) == 4
        assert ledger.keys("nothing") == {}

    def test_reset_by_prefix(self, ledger: Ledger) -> None:
        """``reset(prefix)`` deletes those counters, holds and markers only.

        If this fails: drop the matching counters and markers, and the holds
        of live reservations on those keys (so that settling them later leaves
        ``reserved`` at zero, not negative), and keep everything else.
        """
        held = _rid()
        ledger.reserve(
            [_plan(("run:1", 10, 100), ("tenant:a", 10, 100))],
            reservation_id=held,
            lease_seconds=60,
        )
        ledger.claim("run:1:warned")
        ledger.claim("tenant:a:warned")
        ledger.reset("run:")
        assert ledger.keys() == {"tenant:a": KeyState(0, 10)}
        assert ledger.claim("run:1:warned")
        assert not ledger.claim("tenant:a:warned")
        ledger.release(held)
        assert ledger.state(["run:1", "tenant:a"]) == {
            "run:1": _ZERO,
            "tenant:a": _ZERO,
        }
        ledger.commit(held, {"run:1": 5})  # settled already: no change
        assert ledger.keys() == {"tenant:a": _ZERO}

    def test_reset_everything(self, ledger: Ledger) -> None:
        """``reset()`` empties the counters and markers but keeps the call log.

        If this fails: an empty prefix matches every key.
        """
        reservation_id = _rid()
        ledger.reserve(
            [_plan(("k", 10, 100))], reservation_id=reservation_id, lease_seconds=60
        )
        ledger.claim("m")
        ledger.record(_record("c", 1.0))
        ledger.reset()
        assert ledger.keys() == {}
        assert ledger.claim("m")
        assert len(ledger.calls()) == 1
        ledger.commit(reservation_id, {"k": 4})  # still charges, never negative
        assert ledger.keys() == {"k": KeyState(4, 0)}

    # -- leases (with an injected clock) --------------------------------------

    def test_expired_lease_is_reaped_by_the_next_reserve(
        self, clocked: Ledger, clock: ManualClock
    ) -> None:
        """When ``expires_at <= now``, the next reserve drops the hold first.

        If this fails: reap expired holds at the start of every reserve, before
        reading ``before`` and checking admission; the lease ends exactly at
        ``reserve time + lease_seconds``.
        """
        clocked.reserve(
            [_plan(("k", 80, 100))], reservation_id=_rid(), lease_seconds=10
        )
        clock.advance(9.5)
        early = clocked.reserve(
            [_plan(("k", 30, 100))], reservation_id=_rid(), lease_seconds=10
        )
        assert not early.admitted
        assert early.before["k"] == KeyState(0, 80)
        clock.advance(0.5)  # exactly at the end of the lease: expired
        result = clocked.reserve(
            [_plan(("k", 30, 100))], reservation_id=_rid(), lease_seconds=10
        )
        assert result.admitted
        assert result.before["k"] == _ZERO
        assert clocked.state(["k"])["k"] == KeyState(0, 30)

    def test_commit_after_expiry_still_charges(
        self, clocked: Ledger, clock: ManualClock
    ) -> None:
        """A commit after the lease ended charges ``amounts``, reaped or not.

        If this fails: a late commit must charge the actual use, and give back
        the hold only if it was not reaped already.
        """
        first, second = _rid(), _rid()
        clocked.reserve([_plan(("k", 10, 100))], reservation_id=first, lease_seconds=5)
        clock.advance(5)
        clocked.reserve([_plan(("k", 1, 100))], reservation_id=_rid(), lease_seconds=60)
        assert clocked.state(["k"])["k"] == KeyState(0, 1)  # first was reaped
        clocked.commit(first, {"k": 7})
        clocked.commit(first, {"k": 7})
        assert clocked.state(["k"])["k"] == KeyState(spent=7, reserved=1)

        clocked.reserve([_plan(("j", 10, 100))], reservation_id=second, lease_seconds=5)
        clock.advance(5)  # over, but no reserve has reaped it yet
        clocked.commit(second, {"j": 4})
        assert clocked.state(["j"])["j"] == KeyState(spent=4, reserved=0)

    def test_release_after_expiry_settles(
        self, clocked: Ledger, clock: ManualClock
    ) -> None:
        """Releasing an expired reservation changes no counter and settles it.

        If this fails: an expired reservation released must not give its hold
        back twice, and a later commit of it must be a no-op.
        """
        reservation_id = _rid()
        clocked.reserve(
            [_plan(("k", 10, 100))], reservation_id=reservation_id, lease_seconds=5
        )
        clock.advance(6)
        clocked.reserve([_plan(("k", 2, 100))], reservation_id=_rid(), lease_seconds=60)
        clocked.release(reservation_id)
        clocked.commit(reservation_id, {"k": 10})
        assert clocked.state(["k"])["k"] == KeyState(spent=0, reserved=2)

    def test_lease_expires_in_real_time(self, ledger: Ledger) -> None:
        """A short lease ends on the wall clock too (the default clock).

        If this fails: leases must be measured with the clock the ledger
        really reads (``time.time`` or the server's time).
        """
        ledger.reserve(
            [_plan(("k", 90, 100))], reservation_id=_rid(), lease_seconds=0.05
        )
        time.sleep(0.2)
        result = ledger.reserve(
            [_plan(("k", 90, 100))], reservation_id=_rid(), lease_seconds=60
        )
        assert result.admitted
        assert ledger.state(["k"])["k"] == KeyState(0, 90)

    # -- concurrency ----------------------------------------------------------

    def test_threads_never_overspend(self, ledger: Ledger) -> None:
        """16 threads x 50 reserves of 3 under a limit of 100: 33 admitted.

        If this fails: reserve is not atomic across threads (a check-then-add
        race), or commit loses updates.
        """
        admitted: list[int] = []
        barrier = threading.Barrier(16)

        def work() -> None:
            barrier.wait()
            count = 0
            for _ in range(50):
                reservation_id = _rid()
                result = ledger.reserve(
                    [_plan(("k", 3, 100))],
                    reservation_id=reservation_id,
                    lease_seconds=60,
                )
                if result.admitted:
                    count += 1
                    ledger.commit(reservation_id, {"k": 3})
            admitted.append(count)

        threads = [threading.Thread(target=work) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(admitted) == 33
        assert ledger.state(["k"])["k"] == KeyState(spent=99, reserved=0)

    def test_gather_never_overspends(self, ledger: Ledger) -> None:
        """200 concurrent ``areserve``/``acommit`` pairs of 1 under 100: 100 admitted.

        If this fails: the async twins are not atomic, or lose updates.
        """

        async def one() -> bool:
            reservation_id = _rid()
            result = await ledger.areserve(
                [_plan(("k", 1, 100))], reservation_id=reservation_id, lease_seconds=60
            )
            if result.admitted:
                await ledger.acommit(reservation_id, {"k": 1})
            return result.admitted

        async def main() -> list[bool]:
            return await asyncio.gather(*(one() for _ in range(200)))

        assert sum(asyncio.run(main())) == 100
        assert ledger.state(["k"])["k"] == KeyState(spent=100, reserved=0)

    # -- async twins ----------------------------------------------------------

    def test_async_reserve_commit_release(self, ledger: Ledger) -> None:
        """``areserve``, ``acommit``, ``arelease`` and ``astate`` match the sync ones.

        If this fails: an async twin does not call through to the same logic.
        """

        async def main() -> None:
            kept, dropped = _rid(), _rid()
            plan = [_plan(("k", 40, 100))]
            first = await ledger.areserve(plan, reservation_id=kept, lease_seconds=60)
            second = await ledger.areserve(
                plan, reservation_id=dropped, lease_seconds=60
            )
            refused = await ledger.areserve(
                plan, reservation_id=_rid(), lease_seconds=60
            )
            assert (first.plan, second.plan, refused.plan) == (0, 0, None)
            assert refused.before["k"] == KeyState(0, 80)
            record = _record(kept, 5.0)
            await ledger.acommit(kept, {"k": 25}, record=record)
            await ledger.acommit(kept, {"k": 25}, record=record)
            await ledger.arelease(dropped)
            await ledger.arelease(dropped)
            assert await ledger.astate(["k", "x"]) == {"k": KeyState(25, 0), "x": _ZERO}
            assert ledger.calls() == [record]

        asyncio.run(main())

    def test_async_claim_record_close(self, ledger: Ledger) -> None:
        """``aclaim``, ``arecord`` and ``aclose`` match the sync ones.

        If this fails: an async twin does not call through to the same logic.
        """

        async def main() -> None:
            assert await ledger.aclaim("m")
            assert not await ledger.aclaim("m")
            record = _record("c", 3.0)
            await ledger.arecord(record)
            assert ledger.calls() == [record]
            await ledger.aclose()

        asyncio.run(main())

    def test_async_twins_from_several_event_loops(self, ledger: Ledger) -> None:
        """One ledger serves one ``asyncio.run`` after another, and loops in threads.

        If this fails: a connection (or client) was bound to the first event
        loop that used it; keep one per loop, or none.
        """
        errors: list[BaseException] = []

        async def pair() -> None:
            reservation_id = _rid()
            await ledger.areserve(
                [_plan(("k", 1, 100))], reservation_id=reservation_id, lease_seconds=60
            )
            await ledger.acommit(reservation_id, {"k": 1})

        def in_a_thread() -> None:
            try:
                asyncio.run(pair())
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        for _ in range(3):
            asyncio.run(pair())
        threads = [threading.Thread(target=in_a_thread) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert ledger.state(["k"])["k"] == KeyState(spent=7, reserved=0)

    def test_async_reserve_cancelled_keeps_nothing(self, ledger: Ledger) -> None:
        """A task cancelled while ``areserve`` runs leaves no hold behind.

        If this fails: when the awaiting task is cancelled, release what the
        reserve admitted once it finishes (or finish before yielding).
        """

        async def main() -> KeyState:
            task = asyncio.create_task(
                ledger.areserve(
                    [_plan(("k", 10, 100))], reservation_id=_rid(), lease_seconds=600
                )
            )
            await asyncio.sleep(0)
            task.cancel()
            try:
                result = await task
            except asyncio.CancelledError:
                expected = 0
            else:
                expected = 10 if result.admitted else 0  # finished before the cancel
            state = await ledger.astate(["k"])
            for _ in range(500):  # the release may still be on its way
                if state["k"].reserved == expected:
                    break
                await asyncio.sleep(0.01)
                state = await ledger.astate(["k"])
            assert state["k"] == KeyState(0, expected)
            return state["k"]

        asyncio.run(main())
