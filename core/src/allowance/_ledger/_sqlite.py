"""The SQLite ledger behind ``sqlite:///<path>``: one file shared by processes.

Safety comes from SQLite itself: WAL journal, and every write is one
``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction (a deferred ``BEGIN`` can fail
with SQLITE_BUSY when it upgrades to a write lock, whatever the timeout).
Other processes wait up to ``busy_timeout`` for the write lock; threads of
this process queue on a Python lock first, which hands over much faster than
SQLite's sleeping busy handler.

Each thread gets its own connection (``threading.local``), and a forked child
opens fresh ones: a connection never crosses a ``fork``. The async twins run
the sync method on one dedicated worker thread, so the event loop never waits
on the file. The schema is described in ``_sqlite_schema``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from allowance._errors import (
    ConfigurationError,
    LedgerError,
    LedgerUnavailableError,
)
from allowance._ledger import _sqlite_schema as sql
from allowance._ledger._admission import (
    check_amounts,
    check_lease,
    check_plans,
    choose_plan,
    fold_amounts,
    known_id,
    plan_keys,
)
from allowance._ledger._worker import Worker
from allowance.typing import KeyState, ReserveResult

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from allowance.typing import CallRecord, ReserveItem

__all__ = ["SQLiteLedger", "is_foreign_database"]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

PURGE_AFTER_SECONDS: Final = 86_400.0
"""Settled reservations older than this are deleted (a later commit charges)."""

_PURGE_EVERY: Final = 512
"""Reserves by one ledger object between two purge steps."""

_PURGE_WINDOW: Final = 1024
"""Reservation rows one purge step looks at. It sweeps the table in id order,
twice as fast as reserves add rows, so settled rows never pile up."""

_MAX_BUSY_TIMEOUT: Final = 86_400.0

_CHECKPOINT_PAGES: Final = 4096
"""WAL pages between automatic checkpoints: 4 MiB with 1 KiB pages, SQLite's
default in bytes; fewer checkpoints made writes ~10% cheaper here."""

_ROWS_PER_STATEMENT: Final = 300
"""Keys per statement: at most 3 variables each, under the 999 variables that
SQLite allowed before 3.32."""

_ZERO = KeyState()
_INF = float("inf")
_REAP_AND_READ_ONE: Final = sql.reap_and_read(1)


# -- fork safety ---------------------------------------------------------------

_pid = os.getpid()
_inherited: list[sqlite3.Connection] = []
"""Connections a forked child inherited: kept open (never used, never closed),
since closing a parent's connection in the child can disturb the parent."""


def _after_fork_in_child() -> None:
    global _pid  # noqa: PLW0603 - process-wide by nature
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Connection:
    """One thread's connection, closed when the thread (or ledger) lets go."""

    __slots__ = ("__weakref__", "conn", "cursor", "generation", "pid")

    def __init__(self, conn: sqlite3.Connection, generation: int) -> None:
        self.conn = conn
        # The hot paths run their statements on one cursor: no cursor object
        # per statement. Only code that reads every row before its next
        # statement uses it.
        self.cursor = conn.cursor()
        self.pid = _pid
        self.generation = generation

    def close(self) -> None:
        if self.pid == _pid:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        else:
            _inherited.append(self.conn)

    def __del__(self) -> None:
        # Runs when the owning thread ends, possibly during interpreter
        # shutdown: an error here has nowhere useful to go.
        with contextlib.suppress(Exception):
            self.close()


_file_locks: dict[str, threading.Lock] = {}
_file_locks_guard = threading.Lock()


def _file_lock(path: str) -> threading.Lock:
    """Return this process's write lock for one database file."""
    with _file_locks_guard:
        lock = _file_locks.get(path)
        if lock is None:
            lock = _file_locks[path] = threading.Lock()
        return lock


def _forget_file_locks() -> None:
    # A lock held by another thread at fork time would stay held forever.
    global _file_locks_guard  # noqa: PLW0603 - reset after fork, as above
    _file_locks_guard = threading.Lock()
    _file_locks.clear()


os.register_at_fork(after_in_child=_forget_file_locks)


class _Write:
    """One write transaction: this process's file lock, then ``BEGIN IMMEDIATE``.

    Leaving the block commits; an exception rolls back, and a SQLite error
    comes out as ``LedgerError`` naming the file and the operation. The hot
    paths (``reserve``, ``commit``) call ``_begin``/``_finish``/``_abort``
    themselves, which is what this does.
    """

    __slots__ = ("conn", "ledger", "lock", "operation")

    def __init__(
        self, ledger: SQLiteLedger, conn: sqlite3.Connection, operation: str
    ) -> None:
        self.ledger = ledger
        self.conn = conn
        self.operation = operation
        self.lock = ledger._write_lock  # noqa: SLF001 - the ledger's own helper

    def __enter__(self) -> sqlite3.Connection:
        _begin(self.ledger, self.conn, self.lock, self.operation)
        return self.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: object,
    ) -> None:
        if exc is None:
            _finish(self.ledger, self.conn, self.conn, self.lock, self.operation)
        else:
            _abort(self.ledger, self.conn, self.lock, exc, self.operation)


def _begin(
    ledger: SQLiteLedger,
    cursor: sqlite3.Connection | sqlite3.Cursor,
    lock: threading.Lock,
    operation: str,
) -> None:
    """Take the process's lock for the file, then the file's write lock."""
    lock.acquire()
    try:
        cursor.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as err:
        lock.release()
        raise _ledger_error(ledger, err, operation) from err
    except BaseException:
        lock.release()
        raise


def _finish(
    ledger: SQLiteLedger,
    conn: sqlite3.Connection,
    cursor: sqlite3.Connection | sqlite3.Cursor,
    lock: threading.Lock,
    operation: str,
) -> None:
    """Commit the transaction ``_begin`` opened and let go of the lock."""
    try:
        cursor.execute("COMMIT")
    except sqlite3.Error as err:
        _rollback(conn)
        raise _ledger_error(ledger, err, operation) from err
    finally:
        lock.release()


def _abort(
    ledger: SQLiteLedger,
    conn: sqlite3.Connection,
    lock: threading.Lock,
    exc: BaseException,
    operation: str,
) -> None:
    """Roll back after ``exc``; a SQLite error is raised as ``LedgerError``.

    The caller re-raises ``exc`` itself when this returns.
    """
    try:
        _rollback(conn)
    finally:
        lock.release()
    if isinstance(exc, sqlite3.Error):
        raise _ledger_error(ledger, exc, operation) from exc


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class SQLiteLedger:
    """A ledger in one SQLite file, shared safely by threads and processes.

    Args:
        path: The database file; its directory is created if missing.
        busy_timeout: Seconds to wait for another process's write lock before
            a write fails with ``LedgerError``.
        clock: Returns the current Unix time; leases are measured with it
            (processes sharing a file must share a clock: the wall clock).
        url: The URL the ledger was opened with, kept for messages.

    Raises:
        ConfigurationError: ``path`` is a directory or ``busy_timeout`` is not
            a number of seconds >= 0.
        LedgerUnavailableError: The file cannot be created or opened, is not
            a SQLite database, or has a schema of another version.

    Example:
        >>> ledger = SQLiteLedger("allowance.db")  # doctest: +SKIP
        >>> ledger.state(["tenant:acme"])["tenant:acme"].used  # doctest: +SKIP
        0
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        url: str | None = None,
    ) -> None:
        """Open (creating if needed) the database file and its schema."""
        # Callers are typed; this catches a str from a config file, and NaN.
        number = isinstance(busy_timeout, int | float)
        if not number or not 0 <= busy_timeout <= _MAX_BUSY_TIMEOUT:
            what, expected = "busy_timeout", "a number of seconds >= 0"
            raise ConfigurationError(what, busy_timeout, expected)
        self.path = Path(path)
        self.url = url if url is not None else f"sqlite:///{self.path}"
        self.busy_timeout = float(busy_timeout)
        self._clock = clock
        self._generation = 0
        self._pid = _pid
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._guard = threading.Lock()
        self._worker: Worker | None = None
        self._schema_ready = False
        self._reserves = 0
        self._sweep_after = ""
        if self.path.is_dir():
            what, expected = "sqlite path", "a file path, not a directory"
            raise ConfigurationError(what, str(self.path), expected)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            msg = (
                f"SQLite ledger at {self.path}: cannot create its directory"
                f" {self.path.parent}: {err.strerror or err}"
            )
            raise LedgerUnavailableError(msg) from err
        self._key = os.path.realpath(self.path)
        self._write_lock = _file_lock(self._key)
        self._connection()  # fail now, not on the first call, if unusable

    def __repr__(self) -> str:
        """Show the path."""
        return f"SQLiteLedger(path={str(self.path)!r})"

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
            LedgerError: The write failed (locked longer than
                ``busy_timeout``, disk full, ...); nothing was reserved.
        """
        if len(plans) == 1 and len(plans[0]) == 1 and _plain(plans[0][0]):
            # The guard's common case: one plan of one key.
            return self._reserve_one(plans[0][0], reservation_id, lease_seconds)
        check_plans(plans)
        check_lease(lease_seconds)
        keys = plan_keys(plans)
        known = False
        with _Write(self, self._connection().conn, "reserve") as conn:
            now = self._clock()
            before = self._reap_and_read(conn, keys, now)
            index = choose_plan(plans, before)
            if index is not None:
                holds = fold_amounts(plans[index])
                inserted = conn.execute(
                    sql.INSERT_RESERVATION,
                    (reservation_id, now + lease_seconds, sql.encode_items(holds)),
                ).rowcount
                if not inserted:
                    known = True
                elif len(holds) == 1:
                    conn.execute(sql.HOLD_ONE, next(iter(holds.items())))
                elif holds:
                    for chunk in _chunks(list(holds.items())):
                        conn.execute(sql.hold(len(chunk)), _flat(chunk))
            self._reserves += 1
            if self._reserves % _PURGE_EVERY == 0:
                self._purge_step(conn, now)
        if known:
            raise known_id(reservation_id, self.url)
        return ReserveResult(index, before)

    def _reserve_one(
        self, item: ReserveItem, reservation_id: str, lease_seconds: float
    ) -> ReserveResult:
        """``reserve`` of one plan holding one key: fewer objects, same rule."""
        if not (type(lease_seconds) is float and 0.0 < lease_seconds < _INF):
            check_lease(lease_seconds)
        key, amount, limit, gate = item.key, item.amount, item.limit, item.gate
        handle = self._connection()
        conn, cursor = handle.conn, handle.cursor
        lock = self._write_lock
        _begin(self, cursor, lock, "reserve")
        try:
            now = self._clock()
            rows = cursor.execute(_REAP_AND_READ_ONE, (now, key)).fetchall()
            if not rows:  # a key never used, nothing expired
                state = _ZERO
            elif len(rows) == 1 and rows[0][0] == 1:  # the usual case
                state = KeyState(rows[0][2], rows[0][3])
            else:  # some lease ended: reap (reads again)
                state = self._reap_and_read(conn, [key], now)[key]
            used = state.spent + state.reserved
            known = False
            if used + amount <= limit and (gate is None or used <= gate):
                index: int | None = 0
                if cursor.execute(
                    sql.INSERT_RESERVATION,
                    (reservation_id, now + lease_seconds, sql.encode_one(key, amount)),
                ).rowcount:
                    cursor.execute(sql.HOLD_ONE, (key, amount))
                else:
                    known = True
            else:
                index = None
            self._reserves += 1
            if self._reserves % _PURGE_EVERY == 0:
                self._purge_step(conn, now)
        except BaseException as exc:
            _abort(self, conn, lock, exc, "reserve")
            raise
        _finish(self, conn, cursor, lock, "reserve")
        if known:
            raise known_id(reservation_id, self.url)
        return ReserveResult(index, {key: state})

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
            LedgerError: The write failed; nothing was charged.
        """
        check_amounts(amounts)
        call = None if record is None else sql.call_row(record)
        handle = self._connection()
        conn, cursor = handle.conn, handle.cursor
        lock = self._write_lock
        _begin(self, cursor, lock, "commit")
        try:
            now = self._clock()
            rows = cursor.execute(sql.STATUS, (reservation_id,)).fetchall()
            if not rows:
                # Unknown (purged, or never reserved here): charge anyway.
                cursor.execute(sql.INSERT_SETTLED, (reservation_id, now, now))
                self._charge(cursor, {}, amounts)
            elif rows[0][0] == "held" or rows[0][0] == "expired":
                held = self._items(rows[0][1])
                cursor.execute(sql.SETTLE, ("committed", now, reservation_id))
                self._charge(cursor, held, amounts)
            else:  # already settled: a repeat changes nothing
                call = None
            if call is not None:
                cursor.execute(sql.INSERT_CALL, call)
        except BaseException as exc:
            _abort(self, conn, lock, exc, "commit")
            raise
        _finish(self, conn, cursor, lock, "commit")

    @staticmethod
    def _charge(
        cursor: sqlite3.Cursor, held: dict[str, int], amounts: Mapping[str, int]
    ) -> None:
        """Charge ``amounts`` and give back the holds ``held``."""
        if len(held) == 1 and len(amounts) <= 1:
            ((key, amount),) = held.items()
            if not amounts or key in amounts:
                cursor.execute(sql.CHARGE_ONE, (key, amounts.get(key, 0), -amount))
                return
        if not held and not amounts:
            return
        # Rows of key, charge, minus the hold it gives back.
        if amounts.keys() == held.keys():  # the guard charges what it held
            merged = [(key, amounts[key], -amount) for key, amount in held.items()]
        else:
            rows = [(key, 0, -amount) for key, amount in held.items()]
            rows += [(key, amount, 0) for key, amount in amounts.items()]
            by_key: dict[str, tuple[str, int, int]] = {}
            for key, spent, unhold in rows:
                seen = by_key.get(key)
                by_key[key] = (
                    (key, spent, unhold)
                    if seen is None
                    else (key, seen[1] + spent, seen[2] + unhold)
                )
            merged = list(by_key.values())
        if len(merged) <= _ROWS_PER_STATEMENT:
            cursor.execute(sql.charge(len(merged)), _flat(merged))
            return
        for chunk in _chunks(merged):
            cursor.execute(sql.charge(len(chunk)), _flat(chunk))

    def release(self, reservation_id: str, *, record: CallRecord | None = None) -> None:
        """Drop the hold, charging nothing; idempotent; see ``Ledger``.

        Releasing an id the ledger does not know changes nothing and logs
        nothing (use ``record`` for calls that were never reserved).

        Raises:
            LedgerError: The write failed.
        """
        call = None if record is None else sql.call_row(record)
        with _Write(self, self._connection().conn, "release") as conn:
            row = conn.execute(sql.STATUS, (reservation_id,)).fetchone()
            if row is None or row[0] not in ("held", "expired"):
                return
            held = self._items(row[1])
            if held:
                conn.executemany(sql.UNHOLD, [(a, k) for k, a in held.items()])
            conn.execute(sql.SETTLE, ("released", self._clock(), reservation_id))
            if call is not None:
                conn.execute(sql.INSERT_CALL, call)

    def claim(self, marker: str) -> bool:
        """Set a once-only marker; True when this call set it.

        Raises:
            LedgerError: The write failed.
        """
        with _Write(self, self._connection().conn, "claim") as conn:
            cursor = conn.execute(sql.CLAIM, (marker, self._clock()))
            return cursor.rowcount == 1

    def record(self, record: CallRecord) -> None:
        """Append a call to the log without touching any counter.

        Raises:
            LedgerError: The write failed.
        """
        call = sql.call_row(record)
        with _Write(self, self._connection().conn, "record") as conn:
            conn.execute(sql.INSERT_CALL, call)

    def reset(self, prefix: str = "") -> None:
        """Delete counters, holds and markers whose key starts with ``prefix``.

        A reservation still held keeps its holds on other keys; a later commit
        charges whatever it is given, reset keys included. The call log stays.

        Raises:
            LedgerError: The write failed.
        """
        with _Write(self, self._connection().conn, "reset") as conn:
            conn.execute(sql.RESET_COUNTERS, (prefix,))
            conn.execute(sql.RESET_MARKERS, (prefix,))
            changed = []
            for reservation_id, text in conn.execute(sql.SELECT_HELD).fetchall():
                items = self._items(text)
                kept = {k: v for k, v in items.items() if not k.startswith(prefix)}
                if kept != items:
                    changed.append((sql.encode_items(kept), reservation_id))
            conn.executemany(sql.SET_ITEMS, changed)

    # -- reads ----------------------------------------------------------------

    def state(self, keys: Iterable[str]) -> dict[str, KeyState]:
        """Return the state of each key (zeros for keys never used).

        Raises:
            LedgerError: The read failed.
        """
        conn = self._connection().conn
        try:
            return self._read_states(conn, list(dict.fromkeys(keys)))
        except sqlite3.Error as err:
            raise _ledger_error(self, err, "read counters") from err

    def keys(self, prefix: str = "") -> dict[str, KeyState]:
        """Return every counter whose key starts with ``prefix``, sorted by key.

        Raises:
            LedgerError: The read failed.
        """
        conn = self._connection().conn
        try:
            rows = conn.execute(sql.KEYS, (prefix,)).fetchall()
        except sqlite3.Error as err:
            raise _ledger_error(self, err, "read counters") from err
        return {key: KeyState(spent, reserved) for key, spent, reserved in rows}

    def calls(
        self, *, since: float | None = None, until: float | None = None
    ) -> list[CallRecord]:
        """Return logged calls with ``since <= ts < until``, oldest first.

        Raises:
            LedgerError: The read failed, or a row is not a valid call.
        """
        conn = self._connection().conn
        low = float("-inf") if since is None else since
        high = float("inf") if until is None else until
        try:
            rows = conn.execute(sql.SELECT_CALLS, (low, high)).fetchall()
        except sqlite3.Error as err:
            raise _ledger_error(self, err, "read the call log") from err
        try:
            return [sql.call_from_row(row) for row in rows]
        except ValueError as err:
            msg = f"SQLite ledger at {self.path}: a call log row is malformed: {err}"
            raise LedgerError(msg) from err

    def close(self) -> None:
        """Close this ledger's connections and its worker thread.

        A later call opens fresh connections, so closing twice, or using the
        ledger after closing, is safe.
        """
        with self._guard:
            worker, self._worker = self._worker, None
            self._generation += 1
            handles = list(self._connections)
            self._connections.clear()
        if worker is not None:
            worker.stop()
        for handle in handles:
            handle.close()

    # -- async twins: one worker thread, so the event loop never waits --------

    async def areserve(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        *,
        reservation_id: str,
        lease_seconds: float,
    ) -> ReserveResult:
        """Async twin of ``reserve``, run on the ledger's worker thread.

        If the awaiting task is cancelled while the worker reserves, a plan it
        admitted is released as soon as the reserve ends: a cancelled call
        never keeps budget until its lease ends.
        """
        call = functools.partial(
            self.reserve,
            plans,
            reservation_id=reservation_id,
            lease_seconds=lease_seconds,
        )
        orphan = functools.partial(self._release_orphan, reservation_id)
        future = self._submit(call, orphan)
        try:
            result: ReserveResult = await future
        except BaseException:
            # Cancelled after the worker delivered, before the task resumed:
            # the future kept its result, so the worker saw no orphan.
            if future.done() and not future.cancelled() and future.exception() is None:
                orphan(future.result())
            raise
        return result

    async def acommit(
        self,
        reservation_id: str,
        amounts: Mapping[str, int],
        *,
        record: CallRecord | None = None,
    ) -> None:
        """Async twin of ``commit`` (a cancelled await still commits)."""
        await self._submit(
            functools.partial(self.commit, reservation_id, amounts, record=record)
        )

    async def arelease(
        self, reservation_id: str, *, record: CallRecord | None = None
    ) -> None:
        """Async twin of ``release`` (a cancelled await still releases)."""
        await self._submit(
            functools.partial(self.release, reservation_id, record=record)
        )

    async def astate(self, keys: Iterable[str]) -> dict[str, KeyState]:
        """Async twin of ``state``."""
        return await self._submit(functools.partial(self.state, list(keys)))

    async def aclaim(self, marker: str) -> bool:
        """Async twin of ``claim``."""
        return await self._submit(functools.partial(self.claim, marker))

    async def arecord(self, record: CallRecord) -> None:
        """Async twin of ``record``."""
        await self._submit(functools.partial(self.record, record))

    async def aclose(self) -> None:
        """Async twin of ``close`` (waits for queued work off the event loop)."""
        import asyncio  # noqa: PLC0415 - not imported with allowance (import time)

        await asyncio.to_thread(self.close)

    # -- internals ------------------------------------------------------------

    def _submit(
        self, call: Callable[[], _T], orphan: Callable[[_T], None] | None = None
    ) -> asyncio.Future[_T]:
        worker = self._worker
        if worker is None or self._pid != _pid:
            worker = self._start_worker()
        future = worker.submit(call, orphan)
        while future is None:  # closed meanwhile: a later call opens afresh
            future = self._start_worker().submit(call, orphan)
        return future

    def _start_worker(self) -> Worker:
        with self._guard:
            if self._pid != _pid:
                self._after_fork()
            if self._worker is None or self._worker.stopped:
                worker = Worker(f"allowance-sqlite:{self.path.name}")
                # A ledger dropped without close() must not leave its thread.
                weakref.finalize(self, worker.stop, wait=False)
                self._worker = worker
            return self._worker

    def _release_orphan(self, reservation_id: str, result: ReserveResult) -> None:
        """Release what a reserve admitted for a task that was cancelled."""
        if result.admitted:
            release = functools.partial(self.release, reservation_id)
            while not self._start_worker().run_soon(release):
                pass  # closed meanwhile: a fresh worker

    def _after_fork(self) -> None:
        """Drop what the parent process owned: connections, lock, worker."""
        self._pid = _pid
        self._worker = None  # its thread does not exist in the child
        self._generation += 1
        self._connections = weakref.WeakSet()
        self._write_lock = _file_lock(self._key)

    def _connection(self) -> _Connection:
        handle: _Connection | None = getattr(self._local, "handle", None)
        if (
            handle is not None
            and handle.generation == self._generation
            and self._pid == _pid
        ):
            return handle
        return self._open()

    def _open(self) -> _Connection:
        with self._guard:
            if self._pid != _pid:
                self._after_fork()
            generation = self._generation
        path = str(self.path)
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,  # close() may run on another thread
                cached_statements=256,
            )
            # Only takes effect on a new, empty file (before WAL is set).
            conn.execute(f"PRAGMA page_size = {sql.PAGE_SIZE}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning(
                    "SQLite ledger at %s: journal mode is %s, not WAL", path, mode
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_CHECKPOINT_PAGES}")
            if not self._schema_ready:
                self._ensure_schema(conn)
                self._schema_ready = True
        except sqlite3.Error as err:
            if conn is not None:
                conn.close()
            what = _describe(err, self.busy_timeout)
            msg = f"SQLite ledger at {path}: cannot open the database: {what}"
            raise LedgerUnavailableError(msg) from err
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        handle = _Connection(conn, generation)
        with self._guard:
            self._connections.add(handle)
        self._local.handle = handle
        return handle

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == sql.SCHEMA_VERSION:
            return
        self._check_version(version)
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have created it while we waited.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                self._check_version(version)
                if version == 0:
                    for statement in sql.SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    def _check_version(self, version: int) -> None:
        if version not in (0, sql.SCHEMA_VERSION):
            msg = (
                f"SQLite ledger at {self.path}: schema version {version} is not"
                f" {sql.SCHEMA_VERSION}, the one this version of allowance"
                " reads and writes"
            )
            raise LedgerUnavailableError(msg)

    def _items(self, text: str | None) -> dict[str, int]:
        try:
            return sql.decode_items(text)
        except ValueError as err:
            msg = f"SQLite ledger at {self.path}: a reservation row is malformed"
            raise LedgerError(f"{msg}: {err}") from err

    def _reap_and_read(
        self, conn: sqlite3.Connection, keys: list[str], now: float
    ) -> dict[str, KeyState]:
        """Expire the holds whose lease ended; return the keys' states after."""
        if len(keys) < _ROWS_PER_STATEMENT:
            # One statement for both: tag 0 rows are expired holds.
            rows = conn.execute(sql.reap_and_read(len(keys)), (now, *keys)).fetchall()
            expired = [row[1] for row in rows if row[0] == 0]
            if not expired:  # the usual case
                states = dict.fromkeys(keys, _ZERO)
                for _, key, spent, reserved in rows:
                    states[key] = KeyState(spent, reserved)
                return states
        else:
            expired = [row[0] for row in conn.execute(sql.REAP_SELECT, (now,))]
        if expired:
            released: dict[str, int] = {}
            for text in expired:
                for key, amount in self._items(text).items():
                    released[key] = released.get(key, 0) + amount
            conn.execute(sql.EXPIRE, (now,))
            conn.executemany(sql.UNHOLD, [(a, k) for k, a in released.items()])
        return self._read_states(conn, keys)

    def _read_states(
        self, conn: sqlite3.Connection, keys: list[str]
    ) -> dict[str, KeyState]:
        states = dict.fromkeys(keys, _ZERO)
        if len(keys) == 1:
            row = conn.execute(sql.STATE_ONE, keys).fetchone()
            if row is not None:
                states[row[0]] = KeyState(row[1], row[2])
            return states
        for chunk in _chunks(keys):
            for key, spent, reserved in conn.execute(
                sql.state_many(len(chunk)), chunk
            ).fetchall():
                states[key] = KeyState(spent, reserved)
        return states

    def _purge_step(self, conn: sqlite3.Connection, now: float) -> None:
        """Delete settled reservations older than a day in the next id window."""
        after = self._sweep_after
        end = conn.execute(sql.SWEEP_END, (after, _PURGE_WINDOW)).fetchone()[0]
        if end is None and after:  # past the last id: start over
            after = ""
            end = conn.execute(sql.SWEEP_END, (after, _PURGE_WINDOW)).fetchone()[0]
        if end is None:  # no reservations at all
            self._sweep_after = ""
            return
        conn.execute(sql.PURGE, (after, end, now - PURGE_AFTER_SECONDS))
        self._sweep_after = end


def is_foreign_database(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a SQLite database without a ledger's tables.

    An empty file is such a database. Read only: the file is not written
    (``SQLiteLedger`` would create the tables, and set WAL mode). False for a
    ledger, and for a file SQLite cannot read (opening it says why).
    """
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return False
    try:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return not {"counters", "calls"} <= {name for (name,) in tables}
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def _plain(item: ReserveItem) -> bool:
    """True when ``check_plans`` has nothing to say about the item."""
    gate = item.gate
    return (
        type(item.key) is str
        and type(item.amount) is int
        and item.amount >= 0
        and type(item.limit) is int
        and (gate is None or type(gate) is int)
    )


def _chunks(rows: list[_T]) -> Iterator[list[_T]]:
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        yield rows[start : start + _ROWS_PER_STATEMENT]


def _flat(rows: Iterable[tuple[Any, ...]]) -> list[Any]:
    return [value for row in rows for value in row]


def _ledger_error(
    ledger: SQLiteLedger, err: sqlite3.Error, operation: str
) -> LedgerError:
    what = _describe(err, ledger.busy_timeout)
    return LedgerError(f"SQLite ledger at {ledger.path}: {operation} failed: {what}")


def _describe(err: sqlite3.Error, busy_timeout: float) -> str:
    text = str(err)
    if "locked" in text or "busy" in text:
        return (
            f"{text} (another connection held the write lock longer than"
            f" busy_timeout={busy_timeout:g} s)"
        )
    if "not a database" in text:
        return f"{text} (the file exists but is not a SQLite database, or is corrupt)"
    return text
