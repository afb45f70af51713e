"""The in-process ledger behind ``memory://``: dicts under one lock.

It keeps exactly the semantics of the SQLite ledger (the property tests run
both side by side), which makes it the reference for reading them: every
public method takes the lock, does a few dict operations and returns. The lock
is held for microseconds, so the async twins call the sync methods directly
instead of hopping to a thread.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from allowance._ledger._admission import (
    check_amounts,
    check_lease,
    check_plans,
    choose_plan,
    fold_amounts,
    known_id,
    plan_keys,
)
from allowance.typing import KeyState, ReserveResult

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from allowance.typing import CallRecord, ReserveItem

__all__ = ["MemoryLedger", "copy_record"]

HELD: Final = "held"
COMMITTED: Final = "committed"
RELEASED: Final = "released"
EXPIRED: Final = "expired"

PURGE_AFTER_SECONDS: Final = 86_400.0
"""Settled reservations are forgotten after a day (a later commit charges again)."""
MAX_CALLS: Final = 100_000
"""The memory ledger's call log keeps the newest calls only."""
MAX_SETTLED: Final = 1_000_000
"""At most this many settled reservations are remembered (the newest), so a
long-running process at thousands of calls a second does not keep a day of them."""

_ZERO = KeyState()
_new: Final = object.__new__


class _Reservation:
    """One reservation, held or expired.

    Only ``MemoryLedger._hold`` builds one, with slot stores: no ``__init__``,
    as a class call costs more on the fast lane's cold path.
    """

    __slots__ = ("expires_at", "items", "settled_at", "status")

    expires_at: float
    status: str
    items: dict[str, int]
    settled_at: float | None


class MemoryLedger:
    """A ledger kept in this process's memory, safe across threads and tasks.

    Nothing survives the process. Use it for tests and one-shot scripts; use
    ``sqlite:///<path>`` when several processes share a budget.

    Args:
        clock: Returns the current Unix time; leases are measured with it.
        url: The URL the ledger was opened with (``memory://`` or
            ``memory://NAME``), kept for messages and reports.

    Example:
        >>> ledger = MemoryLedger()
        >>> ledger.state(["tenant:acme"])["tenant:acme"].used
        0
    """

    nonblocking: Final = True
    """Its sync methods never wait on I/O: async callers may call them in place."""

    def __init__(
        self, clock: Callable[[], float] = time.time, *, url: str = "memory://"
    ) -> None:
        """Create an empty ledger."""
        self.url = url
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [spent, reserved]
        self._counters: dict[str, list[int]] = {}
        # The held reservations. No lease among them ends before
        # ``_next_expiry``: a hold is one dict entry, and the (few) held ones
        # are scanned only when a lease may have ended.
        self._holding: dict[str, _Reservation] = {}
        self._next_expiry = math.inf
        # Expired reservations, and settled ones as their final status alone
        # (a str: no object for the garbage collector to visit).
        self._reservations: dict[str, _Reservation | str] = {}
        self._settled: deque[tuple[float, str]] = deque()
        self._markers: dict[str, float] = {}
        # The newest calls only: a memory ledger must not grow without bound.
        self._calls: deque[CallRecord] = deque(maxlen=MAX_CALLS)

    def __repr__(self) -> str:
        """Show the URL."""
        return f"MemoryLedger(url={self.url!r})"

    # -- writes ---------------------------------------------------------------

    def reserve(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        *,
        reservation_id: str,
        lease_seconds: float,
    ) -> ReserveResult:
        """Hold the first plan that fits, all-or-nothing; see ``Ledger``.

        Raises:
            ConfigurationError: An amount is negative or the lease is not a
                positive number of seconds.
            UsageError: The plan fits but ``reservation_id`` is already known
                to the ledger (expired leases are still reaped).
        """
        check_plans(plans)
        check_lease(lease_seconds)
        with self._lock:
            now = self._clock()
            self._reap(now)
            counters = self._counters
            before: dict[str, KeyState] = {}
            if len(plans) == 1 and len(plans[0]) == 1:
                # The common case: one plan on one key, nothing to fold.
                item = plans[0][0]
                row = counters.get(item.key)
                state = before[item.key] = (
                    _ZERO if row is None else KeyState(row[0], row[1])
                )
                used = state.spent + state.reserved
                fits = used + item.amount <= item.limit and (
                    item.gate is None or used <= item.gate
                )
                index: int | None = 0 if fits else None
            else:
                for key in plan_keys(plans):
                    row = counters.get(key)
                    before[key] = _ZERO if row is None else KeyState(row[0], row[1])
                index = choose_plan(plans, before)
            if index is None:
                return ReserveResult(None, before)
            if reservation_id in self._reservations or reservation_id in self._holding:
                raise known_id(reservation_id, self.url)
            holds = fold_amounts(plans[index])
            for key, amount in holds.items():
                row = counters.get(key)
                if row is None:
                    counters[key] = [0, amount]
                else:
                    row[1] += amount
            self._hold(reservation_id, now + lease_seconds, holds)
            return ReserveResult(index, before)

    def commit(
        self,
        reservation_id: str,
        amounts: Mapping[str, int],
        *,
        record: CallRecord | None = None,
    ) -> None:
        """Charge ``amounts`` and drop the hold; idempotent; see ``Ledger``.

        Raises:
            ConfigurationError: An amount is negative or not an int.
        """
        check_amounts(amounts)
        with self._lock:
            now = self._clock()
            reservation = self._find(reservation_id)
            if reservation is None:
                # Unknown (another process's, or purged): charge, never drop it.
                self._reservations[reservation_id] = COMMITTED
                self._settled.append((now, reservation_id))
                held: dict[str, int] = {}
            elif isinstance(reservation, _Reservation):  # held or expired
                held = self._settle(reservation, COMMITTED, now, reservation_id)
            else:
                return
            counters = self._counters
            for key in held.keys() | amounts.keys():
                row = counters.get(key)
                if row is None:
                    counters[key] = [amounts.get(key, 0), 0]
                else:
                    row[0] += amounts.get(key, 0)
                    row[1] = max(row[1] - held.get(key, 0), 0)
            if record is not None:
                self._calls.append(copy_record(record))

    # -- the guard's fast lane ---------------------------------------------------
    # ``Guard`` calls these instead of ``reserve``/``commit`` in the common case:
    # the same state changes, without the protocol's value objects and checks
    # (the guard built the values: ints >= 0, distinct keys, a fresh id).

    def hold(
        self,
        items: Sequence[tuple[str, int, int]],
        reservation_id: str,
        lease: float,
        ceilings: Sequence[int] | None = None,
        gates: Sequence[int | None] | None = None,
    ) -> dict[str, int] | None:
        """Hold every ``(key, amount, limit)`` if all fit; return the holds, or None.

        ``reserve([[ReserveItem(key, amount, limit), ...]], ...)`` for one plan
        with distinct keys; the guard's own fast lane. ``ceilings``, one per
        item: the gates (``ReserveItem.gate``), the most each key may hold.
        ``gates``, one per item (None: no gate): hold only when a key holds
        more than its gate, which refuses the plan before this one (the model
        asked for, when this is its fallback): ``reserve([first, items])``
        where ``first`` is refused by its gates alone.

        Raises:
            UsageError: ``reservation_id`` is already known to the ledger.
        """
        with self._lock:
            now = self._clock()
            settled = self._settled
            if (
                now >= self._next_expiry
                or (settled and settled[0][0] < now - PURGE_AFTER_SECONDS)
                or len(settled) > MAX_SETTLED
            ):
                self._reap(now)
            counters = self._counters
            if gates is not None and not _over(counters, items, gates):
                return None
            for key, amount, limit in items:
                row = counters.get(key)
                if (amount if row is None else row[0] + row[1] + amount) > limit:
                    return None
            if ceilings is not None and _over(counters, items, ceilings):
                return None
            if reservation_id in self._reservations or reservation_id in self._holding:
                raise known_id(reservation_id, self.url)
            holds: dict[str, int] = {}
            for key, amount, _ in items:
                holds[key] = amount
                row = counters.get(key)
                if row is None:
                    counters[key] = [0, amount]
                else:
                    row[1] += amount
            self._hold(reservation_id, now + lease, holds)
            return holds

    def settle(
        self, reservation_id: str, amounts: dict[str, int], record: CallRecord
    ) -> bool:
        """``commit`` of a reservation still held; False (nothing done) otherwise.

        The guard's fast lane: ``amounts`` are ints >= 0 on the reservation's
        keys and ``record`` is read-only; any other case goes to ``commit``.
        """
        with self._lock:
            reservation = self._holding.pop(reservation_id, None)
            if reservation is None:
                return False
            now = self._clock()
            held = reservation.items
            self._reservations[reservation_id] = COMMITTED
            self._settled.append((now, reservation_id))
            counters = self._counters
            for key, amount in amounts.items():
                row = counters.get(key)
                if row is None:  # reset while held
                    counters[key] = [amount, 0]
                else:
                    row[0] += amount
                    # A conditional, not max(): cheaper from cold caches.
                    rest = row[1] - held.get(key, 0)
                    row[1] = rest if rest > 0 else 0  # noqa: FURB136
            for key, amount in held.items():
                if key not in amounts:  # pragma: no cover - the guard charges every key
                    row = counters[key]  # a held key keeps its counter (see reset)
                    row[1] = max(row[1] - amount, 0)
            self._calls.append(copy_record(record))
            return True

    def release(self, reservation_id: str, *, record: CallRecord | None = None) -> None:
        """Drop the hold, charging nothing; idempotent; see ``Ledger``.

        Releasing an id the ledger does not know changes nothing and logs
        nothing (use ``record`` for calls that were never reserved).
        """
        with self._lock:
            reservation = self._find(reservation_id)
            if reservation is None or isinstance(reservation, str):
                return
            now = self._clock()
            held = self._settle(reservation, RELEASED, now, reservation_id)
            counters = self._counters
            for key, amount in held.items():
                row = counters.get(key)
                if row is not None:
                    row[1] = max(row[1] - amount, 0)
            if record is not None:
                self._calls.append(copy_record(record))

    def claim(self, marker: str) -> bool:
        """Set a once-only marker; True when this call set it."""
        with self._lock:
            if marker in self._markers:
                return False
            self._markers[marker] = self._clock()
            return True

    def record(self, record: CallRecord) -> None:
        """Append a call to the log without touching any counter."""
        with self._lock:
            self._calls.append(copy_record(record))

    def reset(self, prefix: str = "") -> None:
        """Delete counters, holds and markers whose key starts with ``prefix``.

        A reservation still held keeps its holds on other keys; a later commit
        charges whatever it is given, reset keys included.
        """
        with self._lock:
            for key in [k for k in self._counters if k.startswith(prefix)]:
                del self._counters[key]
            for reservation in self._holding.values():
                if reservation.items:
                    reservation.items = {
                        k: v
                        for k, v in reservation.items.items()
                        if not k.startswith(prefix)
                    }
            for marker in [m for m in self._markers if m.startswith(prefix)]:
                del self._markers[marker]

    # -- reads ----------------------------------------------------------------

    def state(self, keys: Iterable[str]) -> dict[str, KeyState]:
        """Return the state of each key (zeros for keys never used)."""
        with self._lock:
            counters = self._counters
            result: dict[str, KeyState] = {}
            for key in keys:
                row = counters.get(key)
                result[key] = _ZERO if row is None else KeyState(row[0], row[1])
            return result

    def keys(self, prefix: str = "") -> dict[str, KeyState]:
        """Return every counter whose key starts with ``prefix``, sorted by key."""
        with self._lock:
            return {
                key: KeyState(row[0], row[1])
                for key, row in sorted(self._counters.items())
                if key.startswith(prefix)
            }

    def calls(
        self, *, since: float | None = None, until: float | None = None
    ) -> list[CallRecord]:
        """Return logged calls with ``since <= ts < until``, oldest first."""
        with self._lock:
            selected = [
                call
                for call in self._calls
                if (since is None or call.ts >= since)
                and (until is None or call.ts < until)
            ]
        selected.sort(key=lambda call: call.ts)
        return selected

    def close(self) -> None:
        """Do nothing: the ledger holds no connection or file (data is kept)."""

    # -- async twins: the lock is held for microseconds, so no thread hop -----

    async def areserve(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        *,
        reservation_id: str,
        lease_seconds: float,
    ) -> ReserveResult:
        """Async twin of ``reserve``."""
        return self.reserve(
            plans, reservation_id=reservation_id, lease_seconds=lease_seconds
        )

    async def acommit(
        self,
        reservation_id: str,
        amounts: Mapping[str, int],
        *,
        record: CallRecord | None = None,
    ) -> None:
        """Async twin of ``commit``."""
        self.commit(reservation_id, amounts, record=record)

    async def arelease(
        self, reservation_id: str, *, record: CallRecord | None = None
    ) -> None:
        """Async twin of ``release``."""
        self.release(reservation_id, record=record)

    async def astate(self, keys: Iterable[str]) -> dict[str, KeyState]:
        """Async twin of ``state``."""
        return self.state(keys)

    async def aclaim(self, marker: str) -> bool:
        """Async twin of ``claim``."""
        return self.claim(marker)

    async def arecord(self, record: CallRecord) -> None:
        """Async twin of ``record``."""
        self.record(record)

    async def aclose(self) -> None:
        """Async twin of ``close``."""

    # -- internals (called with the lock held) --------------------------------

    def _hold(
        self, reservation_id: str, expires_at: float, holds: dict[str, int]
    ) -> None:
        """Register a reservation whose holds are already on the counters."""
        # Compared without min(): the fast lane's hold runs this from cold caches.
        reservation: _Reservation = _new(_Reservation)
        reservation.expires_at = expires_at
        reservation.status = HELD
        reservation.items = holds
        reservation.settled_at = None
        self._holding[reservation_id] = reservation
        if expires_at < self._next_expiry:  # noqa: PLR1730
            self._next_expiry = expires_at

    def _find(self, reservation_id: str) -> _Reservation | str | None:
        """A held or expired reservation, a settled one's status, or None."""
        reservation = self._holding.get(reservation_id)
        if reservation is None:
            return self._reservations.get(reservation_id)
        return reservation

    def _settle(
        self, reservation: _Reservation, status: str, now: float, reservation_id: str
    ) -> dict[str, int]:
        """Mark a held or expired reservation settled; return what it still held."""
        held = reservation.items if reservation.status == HELD else {}
        if reservation.status == HELD:
            del self._holding[reservation_id]
        if status == EXPIRED:  # still committable: a late commit charges it
            reservation.status = status
            reservation.settled_at = now
            reservation.items = {}
            self._reservations[reservation_id] = reservation
        else:
            self._reservations[reservation_id] = status
        self._settled.append((now, reservation_id))
        return held

    def _reap(self, now: float) -> None:
        """Expire held reservations whose lease ended; forget old settled ones."""
        if now >= self._next_expiry:
            # One pass: the leases that ended, and the next end among the rest.
            ended: list[tuple[str, _Reservation]] = []
            next_expiry = math.inf
            for reservation_id, reservation in self._holding.items():
                if reservation.expires_at <= now:
                    ended.append((reservation_id, reservation))
                else:
                    next_expiry = min(next_expiry, reservation.expires_at)
            self._next_expiry = next_expiry
            counters = self._counters
            for reservation_id, reservation in ended:
                for key, amount in self._settle(
                    reservation, EXPIRED, now, reservation_id
                ).items():
                    row = counters.get(key)
                    if row is not None:
                        row[1] = max(row[1] - amount, 0)
        # Only settled and expired reservations are in ``_reservations``.
        reservations = self._reservations
        settled = self._settled
        horizon = now - PURGE_AFTER_SECONDS
        while settled and (settled[0][0] < horizon or len(settled) > MAX_SETTLED):
            _, reservation_id = settled.popleft()
            reservations.pop(reservation_id, None)


def _over(
    counters: Mapping[str, list[int]],
    items: Sequence[tuple[str, int, int]],
    bounds: Sequence[int | None],
) -> bool:
    """True when a key of ``items`` holds more than its bound (None: no bound).

    ``hold``'s ceilings (none may be over) and gates (one must be), with the
    lock held.
    """
    for (key, _, _), bound in zip(items, bounds, strict=True):
        if bound is not None:
            row = counters.get(key)
            if (0 if row is None else row[0] + row[1]) > bound:
                return True
    return False


def copy_record(record: CallRecord) -> CallRecord:
    """Detach the record from the caller's mutable scope mapping (if it is one)."""
    if type(record.scope) is MappingProxyType:  # read-only already (the guard's)
        return record
    return dataclasses.replace(record, scope=MappingProxyType(dict(record.scope)))
