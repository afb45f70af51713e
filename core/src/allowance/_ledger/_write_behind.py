"""The SQLite ledger with write-behind: ``sqlite:///<path>?write_behind=SECONDS``.

``SQLiteLedger`` writes two transactions per call (the hold, the charge),
~100 µs each between real calls. This ledger writes none on most calls:

- **Slices.** A process holds part of a budget in the file: one reservation
  row (id ``slice:...``) whose items are what it holds on each key, taken in
  one transaction for about ``SLICE_CALLS`` calls at once (at most half of
  what is left). It admits calls against its slice in memory (``hold``) and
  charges them in memory (``settle``), as the memory ledger does.
- **Write-behind.** A background thread writes, in one transaction every
  ``write_behind`` seconds: the charges (spend moves from the slice to
  ``spent``), the call log, the slices' top-ups before they run out, the
  renewal of the slice's lease, and what an idle process gives back.

What stays as with ``SQLiteLedger``:

- **Strict.** A process admits a call in memory only against what its slice
  holds in the file, and a slice is granted only where the file's
  ``spent + reserved`` leaves room: processes together never hold more than
  a limit. A slice whose lease could end (the thread cannot write) admits
  nothing.
- **The same decisions in one process.** A call the slice cannot cover goes
  to ``SQLiteLedger.reserve``, decided as if this process held no slice: a
  refusal is decided again once the process gave back what its slice holds
  unused on the call's keys (and wrote any charge beyond it). A gated call
  (``hold``'s ceilings: a threshold the guard must not miss) is held on the
  slice only when what its keys hold is within its gates, counted as
  ``state`` counts it: what the file holds beyond the slice (read at each
  write, and set by each ``reserve`` and ``commit`` through the file, which
  hold ``_sync_lock``) plus this process's calls since. A ``reserve`` with
  gates (a degrade threshold's plans) is decided the same way in memory
  when memory knows what its keys hold: plans their gates refuse are passed
  over, and the next is held on the slice if the slice covers it (else the
  file decides): a degraded call writes nothing either.
- **The protocol.** ``reserve``, ``commit`` and ``release`` of ids this ledger
  did not hold in memory are ``SQLiteLedger``'s. ``state`` and ``keys`` show
  this process's unwritten charges and leave its unused slice out.

What changes, and is the price of the speed:

- **A killed process loses its last ``write_behind`` seconds**: the charges
  and call log it had not written (a clean exit, ``close`` and
  ``atexit`` write them). Its slice holds budget until the slice's lease
  (``SLICE_LEASE``) ends.
- **Other processes see this one's charges up to ``write_behind`` late**, and
  see its slices as reserved: near a limit, a call that would fit can be
  refused in another process while this one holds slice unused (until it
  gives it back, after ``IDLE`` seconds without calls).
- **A gate another process's spend crossed** applies here from this
  process's next write, at most ``write_behind`` after its last call (whose
  charge is written then): until then its slice admits gated calls as of
  the last write. The limits stay strict.
- **An estimate missed in another process** (a charge beyond its hold that
  takes a key over its limit) does not stop this process's slice: it admits
  what its slice still holds, as that process's hold was admitted before.
  (In this process such a charge stops the slice at once.)
- **If the file cannot be written**, charges stay in memory and are retried
  (never dropped); the slice stops admitting before its lease could end, and
  calls go to ``reserve``, where the guard's ``fail`` policy decides.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Final, Protocol

from allowance._errors import ConfigurationError, LedgerError
from allowance._exit import at_exit
from allowance._ledger import _sqlite_schema as sql
from allowance._ledger._admission import (
    check_amounts,
    check_plans,
    fold_plan,
    known_id,
)
from allowance._ledger._memory import MemoryLedger, copy_record
from allowance._ledger._sqlite import (
    SQLiteLedger,
    _abort,
    _begin,
    _chunks,
    _finish,
    _flat,
)
from allowance.typing import KeyState, ReserveItem, ReserveResult

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from allowance.typing import CallRecord

__all__ = ["HOLDING", "Holding", "WriteBehindLedger"]

logger = logging.getLogger(__name__)

SLICE_CALLS: Final = 16
"""A top-up asks for this many calls' worth of the call that asked for it."""

_LOW_WATER: Final = 4
"""A slice that can admit fewer than this many more such calls asks for a top-up."""

_GATED_KEPT: Final = 1024
"""Keys the thread reads for gated calls at most (then forgotten, asked again)."""

SLICE_LEASE: Final = 30.0
"""Seconds a slice holds budget after the last write that renewed it."""

RENEW_EVERY: Final = 5.0
"""The thread renews a slice at least this often, calls or not."""

IDLE: Final = 1.0
"""Seconds without a call after which a process gives back its unused slice."""

MAX_WRITE_BEHIND: Final = 1.0
"""The longest delay ``write_behind`` may set, in seconds."""

_MAX_DONE: Final = 100_000
"""Settled in-memory ids remembered, so a second commit of one changes nothing."""

# A key's row: [slice, held, spent, give, limit]: what the slice holds in the
# file, what calls in flight hold of it, the charges not yet written, what is
# being given back, and the limit it was granted under.
# ``slice - held - spent - give`` is what can still be admitted.
_SPENT_OUT: Final = sys.maxsize
"""A row's limit once a commit beyond its hold took the key over its limit:
every call's limit is below it, so the slice admits nothing."""


class Holding(Protocol):
    """A ledger with the guard's fast lane: ``hold`` and ``settle`` in memory."""

    def hold(
        self,
        items: Sequence[tuple[str, int, int]],
        reservation_id: str,
        lease: float,
        ceilings: Sequence[int] | None = None,
        gates: Sequence[int | None] | None = None,
    ) -> dict[str, int] | None:
        """Hold every item in memory, or return None (``reserve`` decides)."""
        ...

    def settle(
        self, reservation_id: str, amounts: dict[str, int], record: CallRecord
    ) -> bool:
        """Charge a held reservation in memory; False: ``commit`` it."""
        ...


class WriteBehindLedger(SQLiteLedger):
    """``SQLiteLedger`` admitting and charging most calls in memory; see the module.

    Args:
        path: The database file (as ``SQLiteLedger``).
        write_behind: Seconds between the writes of the background thread:
            what a killed process can lose (more than 0, at most 1).
        busy_timeout: As ``SQLiteLedger``.
        clock: As ``SQLiteLedger``; slice leases are measured with it.
        url: The URL the ledger was opened with, kept for messages.

    Raises:
        ConfigurationError: ``write_behind`` is not a number of seconds in
            (0, 1], or as ``SQLiteLedger``.
        LedgerUnavailableError: As ``SQLiteLedger``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        write_behind: float = 0.05,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        url: str | None = None,
    ) -> None:
        """Open the file as ``SQLiteLedger`` does; the thread starts on first use."""
        number = isinstance(write_behind, int | float)
        if not number or not 0 < write_behind <= MAX_WRITE_BEHIND:
            what, expected = "write_behind", "a number of seconds, > 0 and <= 1"
            raise ConfigurationError(what, write_behind, expected)
        super().__init__(path, busy_timeout=busy_timeout, clock=clock, url=url)
        self.write_behind = float(write_behind)
        self._start_fresh()
        _live.add(self)

    def _start_fresh(self) -> None:
        """Empty in-memory state: at creation, and in a forked child."""
        self._lock = threading.Lock()  # the in-memory state
        self._sync_lock = threading.Lock()  # one write of it at a time
        self._rows: dict[str, list[int]] = {}
        self._holds: dict[str, dict[str, int]] = {}
        self._done: dict[str, None] = {}
        self._records: list[CallRecord] = []
        self._wants: dict[str, tuple[int, int]] = {}
        # Gated calls (``hold``'s ceilings) need what a key holds beyond this
        # process's slice: the file's ``spent + reserved`` less the slice, read
        # at each write for the keys such calls asked about, and set by
        # ``reserve``. Every change to the file in this process holds
        # ``_sync_lock``: one that does not say what it changed forgets them.
        self._gated: dict[str, None] = {}
        # key -> (spent, reserved) in the file, less this process's slice.
        self._bases: dict[str, tuple[int, int]] = {}
        self._bases_wanted = False
        self._slice_id: str | None = None
        self._valid_until = -math.inf
        self._renew_at = math.inf
        self._last_use = -math.inf
        self._dirty = False
        self._dirty_since = 0.0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def __repr__(self) -> str:
        """Show the path and the delay."""
        return (
            f"WriteBehindLedger(path={str(self.path)!r},"
            f" write_behind={self.write_behind!r})"
        )

    # -- the guard's fast lane: memory only -------------------------------------

    def hold(
        self,
        items: Sequence[tuple[str, int, int]],
        reservation_id: str,
        lease: float,  # noqa: ARG002 - the slice's lease covers the holds
        ceilings: Sequence[int] | None = None,
        gates: Sequence[int | None] | None = None,
    ) -> dict[str, int] | None:
        """Hold every ``(key, amount, limit)`` on this process's slice, or None.

        None is not a refusal: the slice does not cover the call (and a top-up
        is asked for), so ``reserve`` decides on the file. ``ceilings``, one
        per item, are gates (``ReserveItem.gate``): what each key may hold
        before the call, counted as ``state`` shows it: the file beyond this
        slice as of the last write, and this process's calls since. ``gates``,
        as ``MemoryLedger.hold``'s, counted the same way: None too when what a
        gated key holds is not known.

        Raises:
            UsageError: ``reservation_id`` is held in memory already.
        """
        with self._lock:
            return self._hold(items, reservation_id, ceilings, gates)

    def _hold(  # noqa: C901 - the hot path, in one function
        self,
        items: Sequence[tuple[str, int, int]],
        reservation_id: str,
        ceilings: Sequence[int] | None = None,
        gates: Sequence[int | None] | None = None,
    ) -> dict[str, int] | None:
        """``hold``, with ``_lock`` held."""
        if gates is not None and not self._past(items, gates):
            return None
        now = self._clock()
        rows = self._rows
        if now < self._valid_until:
            # ``_free`` written out: this runs on every call.
            for key, amount, limit in items:
                row = rows.get(key)
                if (
                    row is None
                    or row[0] - row[1] - row[2] - row[3] < amount
                    or limit < row[4]
                ):
                    break
            else:
                if ceilings is not None and not self._under(items, ceilings):
                    return None
                if reservation_id in self._holds or reservation_id in self._done:
                    raise known_id(reservation_id, self.url)
                holds: dict[str, int] = {}
                low = False
                for key, amount, _ in items:
                    row = rows[key]
                    row[1] += amount
                    holds[key] = amount
                    if row[0] - row[1] - row[2] - row[3] < amount * _LOW_WATER:
                        low = True  # a few more such calls: top up now
                self._holds[reservation_id] = holds
                self._last_use = now
                if low:
                    self._want(items)
                return holds
        self._want(items)
        if ceilings is not None:  # read at the write that tops the slice up
            self._gate([key for key, _, _ in items])
        return None

    def _under(
        self, items: Sequence[tuple[str, int, int]], ceilings: Sequence[int]
    ) -> bool:
        """True when no key holds more than its ceiling (``_lock`` held).

        False too when what a key holds beyond the slice is not known since
        this process last changed the file: the next write reads it.
        """
        return self._over(items, ceilings) is False

    def _past(
        self, items: Sequence[tuple[str, int, int]], gates: Sequence[int | None]
    ) -> bool:
        """True when a key holds more than its gate, as ``_under`` counts (``_lock``).

        False when none is known to: what a gated key holds beyond the slice
        may not be known since this process last changed the file (the next
        write reads it).
        """
        return self._over(items, gates) is True

    def _over(
        self,
        items: Sequence[tuple[str, int, int]],
        bounds: Sequence[int | None],
        *,
        ask: bool = True,
    ) -> bool | None:
        """Whether a key holds more than its bound, as ``state`` counts (``_lock``).

        True when one is known to, False when none does, None when none is
        known to but what some key holds beyond the slice is not (with
        ``ask``, read at the next write, asked for now). A bound of None: no
        bound on that key.
        """
        known = True
        for (key, _, _), bound in zip(items, bounds, strict=True):
            if bound is not None:
                used = self._used(key)
                if used is None:
                    known = False
                elif used > bound:
                    return True
        if known:
            return False
        if not ask:
            return None
        self._gate([key for key, _, _ in items])
        self._bases_wanted = True
        self._kick()
        return None

    def _gate(self, keys: Iterable[str]) -> None:
        """Read what ``keys`` hold beyond the slice at each write from now."""
        gated = self._gated
        if len(gated) >= _GATED_KEPT:  # keys of windows past, scopes gone
            gated.clear()
        for key in keys:
            gated[key] = None

    def settle(
        self, reservation_id: str, amounts: dict[str, int], record: CallRecord
    ) -> bool:
        """Charge a call held in memory; False (nothing done) when it is not.

        The guard's fast lane: ``amounts`` are ints >= 0 and ``record`` is
        read-only. The charge and the record are written within
        ``write_behind`` seconds.
        """
        with self._lock:
            holds = self._holds.pop(reservation_id, None)
            if holds is None:
                return False
            self._charge_held(holds, amounts)
            self._records.append(record)
            self._settled(reservation_id)
            return True

    # -- the protocol -----------------------------------------------------------

    def reserve(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        *,
        reservation_id: str,
        lease_seconds: float,
    ) -> ReserveResult:
        """``SQLiteLedger.reserve``, decided as if this process held no slice.

        Each plan is tried alone, in order, with the unused slice counted as
        used (its gates raised by it): what fits that way fits without the
        slice, and is the plan the full decision would choose when the plans
        before it were refused by their gates alone (which the slice does not
        change). Otherwise the unused slice on the call's keys is given back,
        and every plan decided again (only if something was given back, for a
        single plan). The states returned are those ``state`` would show.
        """
        check_plans(plans)
        keys = {item.key for plan in plans for item in plan}
        with self._lock:  # as ``hold``: no wait for a write in progress
            held = self._hold_plan(plans, keys, reservation_id)
        if held is not None:
            return held
        decide = functools.partial(
            super().reserve, reservation_id=reservation_id, lease_seconds=lease_seconds
        )
        # Under the write lock of this ledger: a top-up the thread is writing
        # lands before the decision, or after it.
        with self._sync_lock:
            with self._lock:
                overdrawn = any(_free(row) < 0 for row in self._rows_of(keys))
            if overdrawn:
                self._sync(top_up=False)  # charges beyond the slice first
            result = None
            for index, plan in enumerate(plans):
                with self._lock:
                    if self._gated_out_here(plan):
                        continue  # no need to ask the file
                    raised = [self._counting_slice(item) for item in plan]
                result = decide([raised])
                if result.admitted:
                    return self._reserved(plans, ReserveResult(index, result.before))
                if not _gated_out(raised, result.before):
                    break  # a limit refused it: without the slice it may fit
            gave = self._give_back(keys)
            if gave:
                self._sync(top_up=False)
            if result is None or gave or len(plans) > 1:
                result = decide(plans)
            return self._reserved(plans, result)

    def _hold_plan(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        keys: Iterable[str],
        reservation_id: str,
    ) -> ReserveResult | None:
        """A gated ``reserve`` on the slice, in memory; None: the file decides.

        When memory knows what every key of ``plans`` holds beyond the slice
        (as ``hold``'s ceilings need it), the plans refused by their gates are
        passed over as the file would, and the first plan that is not is
        ``hold``-ed: a degraded call, whose first plan a gate refuses, is
        admitted without a write. Plans without gates go to the file, as
        before (``_lock`` held).
        """
        if all(item.gate is None for plan in plans for item in plan):
            return None
        before = self._states(keys)
        if before is None:
            self._gate(keys)  # read at the next write: the next such call is held
            return None
        for index, plan in enumerate(plans):
            if _gated_out(plan, before):
                continue
            items = [(k, a, lim) for k, (a, lim, _) in fold_plan(plan).items()]
            held = self._hold(items, reservation_id)
            return None if held is None else ReserveResult(index, before)
        return None  # every plan gated out: the file says where each key stands

    def _states(self, keys: Iterable[str]) -> dict[str, KeyState] | None:
        """What ``state`` would show on ``keys``; None: not known (``_lock`` held)."""
        bases, rows = self._bases, self._rows
        states: dict[str, KeyState] = {}
        for key in keys:
            base = bases.get(key)
            if base is None:
                return None
            row = rows.get(key)
            states[key] = (
                KeyState(*base)
                if row is None
                else KeyState(base[0] + row[2], max(base[1] + row[1], 0))
            )
        return states

    def _gated_out_here(self, plan: Sequence[ReserveItem]) -> bool:
        """True when a gate refuses ``plan`` by what memory knows (``_lock`` held).

        What a key holds beyond the slice is known since the last write, or
        since this process's last change to the file (``_sync_lock`` held).
        """
        items = [(item.key, item.amount, item.limit) for item in plan]
        return self._over(items, [item.gate for item in plan], ask=False) is True

    def _used(self, key: str) -> int | None:
        """What ``key`` holds as ``state`` counts it; None: not known (``_lock``).

        What the file holds beyond the slice (``_bases``), and this process's
        calls in flight and charges not yet written.
        """
        base = self._bases.get(key)
        if base is None:
            return None
        row = self._rows.get(key)
        used = base[0] + base[1]
        return used if row is None else used + row[1] + row[2]

    def _set_base(self, key: str, spent: int, reserved: int) -> None:
        """Note what the file holds on ``key``, its slice included in ``reserved``."""
        row = self._rows.get(key)
        self._bases[key] = (spent, reserved - (0 if row is None else row[0]))

    def _counting_slice(self, item: ReserveItem) -> ReserveItem:
        """``item`` with its gate raised by the unused slice (``_lock`` held).

        The file counts the slice as reserved: a gate on what the key holds
        must not (``state`` does not).
        """
        row = self._rows.get(item.key)
        if item.gate is None or row is None:
            return item
        unused = row[0] - row[1] - row[2]  # in the file, not used by calls
        return ReserveItem(item.key, item.amount, item.limit, item.gate + unused)

    def _reserved(
        self, plans: Sequence[Sequence[ReserveItem]], result: ReserveResult
    ) -> ReserveResult:
        """Note what a reservation changed in the file; the result ``state``'s way.

        ``_sync_lock`` held: the slice in the file is the one in memory.
        """
        with self._lock:
            if result.plan is not None:
                for item in plans[result.plan]:
                    state = result.before[item.key]
                    self._set_base(item.key, state.spent, state.reserved + item.amount)
        return self._adjusted_result(result)

    def commit(
        self,
        reservation_id: str,
        amounts: Mapping[str, int],
        *,
        record: CallRecord | None = None,
    ) -> None:
        """Charge ``amounts``; in memory when the call was held in memory."""
        check_amounts(amounts)
        if self._settle_in_memory(reservation_id, amounts, record):
            return
        with self._sync_lock:  # no write between the commit and what follows
            super().commit(reservation_id, amounts, record=record)
            self._after_commit(amounts)

    def _settle_in_memory(
        self, reservation_id: str, amounts: Mapping[str, int], record: CallRecord | None
    ) -> bool:
        """``commit``/``release`` of a call held in memory; False: not one."""
        with self._lock:
            holds = self._holds.pop(reservation_id, None)
            if holds is None:
                return reservation_id in self._done  # settled already: no change
            self._charge_held(holds, amounts)
            if record is not None:
                self._records.append(copy_record(record))
            self._settled(reservation_id)
            return True

    def _forget_bases(self) -> None:
        """Forget what keys hold beyond the slice (``_sync_lock`` held)."""
        with self._lock:
            self._bases = {}

    def _after_commit(self, amounts: Mapping[str, int]) -> None:
        """Read what a commit through the file left on its keys (``_sync_lock``).

        - What gated keys hold beyond the slice, for ``hold``'s ceilings (the
          others are forgotten: the commit may have released holds on them).
        - The slice on keys the commit pushed over their limit is given back:
          a slice admits only while the file's ``spent + reserved`` is within
          the limit it was granted under, and a commit beyond its reservation
          (an estimate missed) can end that.
        """
        rows, gated = self._rows, self._gated
        with self._lock:
            self._bases = {}
            keys = [key for key in amounts if key in rows or key in gated]
        if not keys:
            return
        states = super().state(keys)
        with self._lock:
            over = []
            for key in keys:
                state = states[key]
                if key in gated:
                    self._set_base(key, state.spent, state.reserved)
                row = rows.get(key)
                if row is not None and state.used > row[4]:
                    row[4] = _SPENT_OUT  # admits nothing until granted again
                    over.append(key)
        if over and self._give_back(over):
            self._sync(top_up=False)

    def release(self, reservation_id: str, *, record: CallRecord | None = None) -> None:
        """Drop the hold; in memory when the call was held in memory."""
        if not self._settle_in_memory(reservation_id, {}, record):
            with self._sync_lock:
                super().release(reservation_id, record=record)
                self._forget_bases()

    def reset(self, prefix: str = "") -> None:
        """``SQLiteLedger.reset``, after writing this process's charges."""
        with self._sync_lock:
            self._sync()
            super().reset(prefix)  # drops the keys from the slice's row too
            self._forget_bases()
            with self._lock:
                rows = self._rows
                for key, row in rows.items():
                    if key.startswith(prefix):
                        row[0] = row[1] = 0
                        self._wants.pop(key, None)
                # Calls in flight keep their holds on other keys only.
                for reservation_id, holds in self._holds.items():
                    self._holds[reservation_id] = {
                        k: v for k, v in holds.items() if not k.startswith(prefix)
                    }

    def flush(self) -> None:
        """Write the charges and call log held in memory now.

        Raises:
            LedgerError: The write failed; nothing is lost, a later write
                retries it.
        """
        with self._sync_lock:
            self._sync()

    def state(self, keys: Iterable[str]) -> dict[str, KeyState]:
        """The file's state with this process's unwritten charges, without its slice."""
        with self._sync_lock:
            states = super().state(keys)
            with self._lock:
                return {
                    key: self._adjusted(key, state) for key, state in states.items()
                }

    def keys(self, prefix: str = "") -> dict[str, KeyState]:
        """As ``state``, for every counter whose key starts with ``prefix``."""
        with self._sync_lock:
            states = super().keys(prefix)
            with self._lock:
                for key, row in self._rows.items():
                    if (
                        key.startswith(prefix)
                        and key not in states
                        and (row[1] or row[2])
                    ):
                        states[key] = KeyState()
                return {key: self._adjusted(key, states[key]) for key in sorted(states)}

    def calls(
        self, *, since: float | None = None, until: float | None = None
    ) -> list[CallRecord]:
        """``SQLiteLedger.calls``, after writing the call log held in memory."""
        self.flush()
        return super().calls(since=since, until=until)

    def close(self) -> None:
        """Stop the thread, write everything, give the slices back, close.

        Raises:
            LedgerError: The last write failed: the charges held in memory are
                kept, and written by a later use of the ledger.
        """
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopping = thread is not None
        if thread is not None:
            self._wake.set()
            thread.join()
        with self._lock:
            self._stopping = False
            self._wants.clear()  # no top-up: the slice is being given back
        with self._sync_lock:
            try:
                self._sync(give_all=True)
            finally:
                super().close()

    # -- in memory (with ``_lock`` held) ----------------------------------------

    def _charge_held(
        self, holds: Mapping[str, int], amounts: Mapping[str, int]
    ) -> None:
        rows = self._rows
        for key, amount in holds.items():
            if amount:  # a hold of 0 may outlive its row
                rows[key][1] -= amount
        for key, amount in amounts.items():
            row = rows.get(key)
            if row is None:
                row = rows[key] = [0, 0, 0, 0, 0]
            row[2] += amount

    def _settled(self, reservation_id: str) -> None:
        done = self._done
        done[reservation_id] = None
        if len(done) > _MAX_DONE:
            del done[next(iter(done))]
        if not self._dirty:
            self._dirty = True
            self._dirty_since = time.monotonic()
            self._kick()

    def _want(self, items: Sequence[tuple[str, int, int]]) -> None:
        wants = self._wants
        for key, amount, limit in items:
            seen = wants.get(key)
            if seen is None or amount > seen[0] or limit != seen[1]:
                wants[key] = (amount, limit)
        self._kick()

    def _kick(self) -> None:
        if self._thread is None and not self._stopping:
            thread = threading.Thread(
                target=self._run, name=f"allowance-write-behind:{self.path.name}"
            )
            thread.daemon = True
            self._thread = thread
            thread.start()
        self._wake.set()

    def _give_back(self, keys: Iterable[str] | None = None) -> bool:
        """Give back the unused slice on ``keys`` (None: all); True: write first.

        The file is exact on ``keys`` only once written: before, it counts
        ``free`` more than is used on a key (the unused slice) or, after a
        charge beyond its hold, less (``free`` < 0).
        """
        with self._lock:
            stale = False
            for row in self._rows.values() if keys is None else self._rows_of(keys):
                free = _free(row)
                if free > 0:
                    row[3] += free
                stale = stale or free != 0
            return stale

    def _rows_of(self, keys: Iterable[str]) -> list[list[int]]:
        """The rows of those ``keys`` this process has (``_lock`` held)."""
        rows = self._rows
        return [row for key in keys if (row := rows.get(key)) is not None]

    def _adjusted_result(self, result: ReserveResult) -> ReserveResult:
        """``result`` with the states ``state`` would show (``_sync_lock`` held)."""
        with self._lock:
            before = {key: self._adjusted(key, s) for key, s in result.before.items()}
        return ReserveResult(result.plan, before)

    def _adjusted(self, key: str, state: KeyState) -> KeyState:
        row = self._rows.get(key)
        if row is None:
            return state
        # The file counts the whole slice as reserved; only calls in flight are.
        return KeyState(state.spent + row[2], max(state.reserved - row[0] + row[1], 0))

    # -- the background thread ----------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            self._wake.wait(IDLE)
            if self._stopping:
                return
            self._wake.clear()
            if failures:
                if not self._back_off(min(2**failures, 30)):
                    return
            else:
                # A charge waits ``write_behind`` from the first unwritten one,
                # to be written with the next; a top-up (or a read of what keys
                # hold) asked for meanwhile (``_kick``) is written at once.
                while (
                    self._dirty
                    and not (self._wants or self._bases_wanted)
                    and (
                        left := self._dirty_since + self.write_behind - time.monotonic()
                    )
                    > 0
                ):
                    self._wake.wait(left)
                    self._wake.clear()
            with self._sync_lock:
                try:
                    idle = self._clock() - self._last_use >= IDLE
                    self._sync(give_all=idle)
                except LedgerError as err:
                    failures += 1
                    logger.warning(
                        "%r: writing %d calls failed (kept in memory, retried): %s",
                        self,
                        len(self._records),
                        err,
                    )
                    continue
                except Exception:  # pragma: no cover - a bug: say so, keep going
                    failures += 1
                    logger.exception("%r: write-behind failed", self)
                    continue
                failures = 0
            with self._lock:
                if self._thread is not threading.current_thread():  # closed
                    return
                if self._idle():
                    self._thread = None  # started again by the next call
                    return

    def _back_off(self, seconds: float) -> bool:
        """Wait ``seconds`` after a failed write; False: close() stops the thread.

        Calls meanwhile wake the thread (``_kick``): it waits on. ``close()``
        wakes it to stop at once, and writes everything itself.
        """
        until = time.monotonic() + seconds
        while not self._stopping and (left := until - time.monotonic()) > 0:
            self._wake.wait(left)
            self._wake.clear()
        return not self._stopping

    def _idle(self) -> bool:
        """Nothing to write or renew (``_lock`` held)."""
        return not (
            self._dirty
            or self._wants
            or self._bases_wanted
            or self._holds
            or self._slice_id
        )

    def _sync(self, *, give_all: bool = False, top_up: bool = True) -> None:
        """Write what memory holds in one transaction (``_sync_lock`` held).

        ``give_all``: give back every unused slice; ``top_up``: grant the
        top-ups asked for (else they wait for the next write).
        """
        rows = self._rows
        if give_all:
            self._give_back()
        with self._lock:
            spent = {key: row[2] for key, row in rows.items() if row[2]}
            give = {key: row[3] for key, row in rows.items() if row[3]}
            held = {key: row[1] for key, row in rows.items() if row[1]}
            records, self._records = self._records, []
            if top_up:
                wants, self._wants = self._wants, {}
            else:
                wants = {}
            self._dirty = False
            slice_id = self._slice_id
            now = self._clock()
            renew = slice_id is not None and now >= self._renew_at
            gated = list(self._gated)
            bases_wanted, self._bases_wanted = self._bases_wanted, False
        if not (spent or give or records or wants or renew or bases_wanted):
            return
        try:
            items, granted, slice_id, expires, used = self._write(
                slice_id, (spent, give, held), records, wants, gated
            )
        except BaseException:
            with self._lock:
                self._records[:0] = records
                for key, want in wants.items():
                    self._wants.setdefault(key, want)
                self._dirty = True
                self._bases_wanted |= bases_wanted
            raise
        with self._lock:
            self._written(spent, give, items, granted)
            self._bases = {}  # read again for the gated keys the slice holds
            for key, state in used.items():
                self._set_base(key, state.spent, state.reserved)
            if granted:  # asked for by a call: not idle
                self._last_use = max(self._last_use, now)
            self._slice_id = slice_id
            self._valid_until = expires - SLICE_LEASE / 2 if slice_id else -math.inf
            self._renew_at = now + RENEW_EVERY

    def _written(
        self,
        spent: dict[str, int],
        give: dict[str, int],
        items: dict[str, int],
        granted: dict[str, int],
    ) -> None:
        """Bring memory in step with a write (``_lock`` held)."""
        rows = self._rows
        for key, amount in spent.items():
            rows[key][2] -= amount
        for key, amount in give.items():
            rows[key][3] -= amount
        for key, row in rows.items():
            row[0] = items.get(key, 0)
        for key, limit in granted.items():
            known = rows.get(key)
            if known is None:
                rows[key] = [items[key], 0, 0, 0, limit]
            else:
                known[4] = limit
        # Rows that hold nothing more are forgotten.
        for key in [key for key, row in rows.items() if not any(row[:4])]:
            del rows[key]

    def _write(
        self,
        slice_id: str | None,
        moves: tuple[dict[str, int], dict[str, int], dict[str, int]],
        records: list[CallRecord],
        wants: dict[str, tuple[int, int]],
        gated: list[str],
    ) -> tuple[dict[str, int], dict[str, int], str | None, float, dict[str, KeyState]]:
        """One transaction: the slice's items, grants' limits, id, lease's end.

        And, for the ``gated`` keys the slice holds, what the file holds on them
        (the slice in ``reserved``). ``moves``: per key, the
        charges to write, what to give back, and what calls in flight hold
        (which the slice keeps holding).
        """
        handle = self._connection()
        conn, cursor = handle.conn, handle.cursor
        lock = self._write_lock
        _begin(self, cursor, lock, "write behind")
        try:
            now = self._clock()
            # Expired leases first, this process's slice among them if it ended.
            self._reap_and_read(conn, [], now)
            items: dict[str, int] = {}
            held = False
            if slice_id is not None:
                found = cursor.execute(sql.STATUS, (slice_id,)).fetchall()
                if found and found[0][0] == "held":
                    items = dict(self._items(found[0][1]))
                    held = True
            _spend(cursor, items, *moves)
            granted = (
                self._top_up(conn, cursor, items, wants, moves[0]) if wants else {}
            )
            items = {key: amount for key, amount in items.items() if amount > 0}
            expires = now + SLICE_LEASE
            if items and held:
                cursor.execute(
                    sql.SET_SLICE, (sql.encode_items(items), expires, slice_id)
                )
            elif items:
                slice_id = f"slice:{uuid.uuid4().hex}"
                cursor.execute(
                    sql.INSERT_RESERVATION, (slice_id, expires, sql.encode_items(items))
                )
            else:
                if held:
                    cursor.execute(sql.SETTLE, ("released", now, slice_id))
                slice_id = None
            if records:
                cursor.executemany(sql.INSERT_CALL, [sql.call_row(r) for r in records])
            gated = [key for key in gated if key in items]
            states = self._read_states(conn, gated) if gated else {}
        except BaseException as exc:
            _abort(self, conn, lock, exc, "write behind")
            raise
        _finish(self, conn, cursor, lock, "write behind")
        return items, granted, slice_id, expires, states

    def _top_up(
        self,
        conn: sqlite3.Connection,
        cursor: sqlite3.Cursor,
        items: dict[str, int],
        wants: dict[str, tuple[int, int]],
        spent: dict[str, int],
    ) -> dict[str, int]:
        """Grow the slice where the file leaves room; return the grants' limits.

        A top-up covers ``SLICE_CALLS`` calls like the one that asked, or twice
        what was spent since the last write if more (a busy key asks less
        often), and at most half of the room left.
        """
        states = self._read_states(conn, sorted(wants))
        grants: list[tuple[str, int]] = []
        granted: dict[str, int] = {}
        for key, (amount, limit) in wants.items():
            state = states[key]
            room = limit - state.spent - state.reserved
            if room >= amount > 0:
                want = max(amount * SLICE_CALLS, 2 * spent.get(key, 0))
                grant = min(want, max(room // 2, amount))
                grants.append((key, grant))
                items[key] = items.get(key, 0) + grant
                granted[key] = limit
        for chunk in _chunks(grants):
            cursor.execute(sql.hold(len(chunk)), _flat(chunk))
        return granted


def _gated_out(plan: Sequence[ReserveItem], before: Mapping[str, KeyState]) -> bool:
    """True when a gate refuses ``plan``, whatever the limits leave room for."""
    return any(
        item.gate is not None and before[item.key].used > item.gate for item in plan
    )


def _free(row: list[int]) -> int:
    """What a key's row can still admit: its slice less held, spent, given."""
    return row[0] - row[1] - row[2] - row[3]


def _spend(
    cursor: sqlite3.Cursor,
    items: dict[str, int],
    spent: dict[str, int],
    give: dict[str, int],
    held: dict[str, int],
) -> None:
    """Move charges from the slice to ``spent``, and drop what is given back.

    The slice keeps what calls in flight hold: a charge beyond its own hold
    (an estimate missed) is spent, never taken from another call's hold.
    """
    charges: list[tuple[str, int, int]] = []
    for key in spent.keys() | give.keys():
        charge = spent.get(key, 0)
        have = items.get(key, 0)
        unhold = min(charge + give.get(key, 0), max(have - held.get(key, 0), 0))
        if have:
            items[key] = have - unhold
        charges.append((key, charge, -unhold))
    for chunk in _chunks(sorted(charges)):
        cursor.execute(sql.charge(len(chunk)), _flat(chunk))


HOLDING: Final = frozenset({MemoryLedger, WriteBehindLedger})
"""The ledger types with ``hold`` and ``settle`` (``Holding``): the guard's fast
lane tests ``type(ledger) in HOLDING``."""

_live: weakref.WeakSet[WriteBehindLedger] = weakref.WeakSet()


def _close_all() -> None:
    """Write what every live ledger holds in memory before the process ends."""
    for ledger in list(_live):
        try:
            ledger.close()
        except Exception:  # at exit: say it, and go on to the next
            logger.exception("%r: the last write failed; its calls are lost", ledger)


def _forget_in_child() -> None:
    # The parent's slices and threads are the parent's: a child starts empty.
    for ledger in list(_live):
        ledger._start_fresh()  # noqa: SLF001 - the class's own fork hook


at_exit(_close_all, priority=0)
os.register_at_fork(after_in_child=_forget_in_child)
