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
on the file.

Schema (``PRAGMA user_version`` = ``SCHEMA_VERSION``): ``counters`` (spent
and reserved per key), ``reservations`` with their ``reservation_items`` (the
items of settled reservations are deleted when they settle), ``markers`` and
``calls`` (the call log).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from allowance._errors import (
    ConfigurationError,
    LedgerError,
    LedgerUnavailableError,
    UsageError,
)
from allowance._ledger._admission import (
    check_amounts,
    check_lease,
    check_plans,
    choose_plan,
    fold_amounts,
    plan_keys,
)
from allowance.typing import CallRecord, KeyState, ReserveResult, Usage

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from allowance.typing import ReserveItem

__all__ = ["SCHEMA_VERSION", "SQLiteLedger"]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
"""Stored in ``PRAGMA user_version``; a newer file is refused, not guessed at."""

PURGE_AFTER_SECONDS: Final = 86_400.0
"""Settled reservations older than this are deleted (a later commit charges)."""

_PURGE_EVERY: Final = 512
"""Reserves per ledger object between two purge steps."""

_PURGE_WINDOW: Final = 1024
"""Reservation rows one purge step looks at: it sweeps the table in id order,
twice as fast as reserves add rows, so old rows never pile up."""

_PAGE_SIZE: Final = 1024
"""Page size of a new file: each write touches a few small rows in a few
b-trees, and 1 KiB pages make every WAL frame, and so every transaction,
cheaper than the 4 KiB default (a reserve+commit pair ~25% faster here)."""

_MAX_BUSY_TIMEOUT: Final = 86_400.0

_MAX_VARIABLES: Final = 500
"""Keys per ``IN (...)`` query, well under SQLite's oldest variable limit."""

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS counters (
        key TEXT PRIMARY KEY,
        spent INTEGER NOT NULL DEFAULT 0,
        reserved INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS reservations (
        id TEXT PRIMARY KEY,
        expires_at REAL NOT NULL,
        status TEXT NOT NULL,
        settled_at REAL
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS reservations_held
        ON reservations (expires_at) WHERE status = 'held'""",
    """CREATE TABLE IF NOT EXISTS reservation_items (
        id TEXT NOT NULL,
        key TEXT NOT NULL,
        amount INTEGER NOT NULL,
        PRIMARY KEY (id, key)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS markers (
        marker TEXT PRIMARY KEY,
        ts REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS calls (
        seq INTEGER PRIMARY KEY,
        call_id TEXT NOT NULL,
        ts REAL NOT NULL,
        scope TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        requested_model TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cache_read_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cost_micros INTEGER,
        adapters TEXT NOT NULL,
        outcome TEXT NOT NULL,
        estimate_tokens INTEGER NOT NULL,
        estimate_micros INTEGER,
        latency_ms REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts)",
)

# The hot path: identical SQL text, so sqlite3's statement cache prepares once.
_REAP_SELECT = "SELECT id FROM reservations WHERE status = 'held' AND expires_at <= ?"
_STATE_ONE = "SELECT key, spent, reserved FROM counters WHERE key = ?"
_INSERT_RESERVATION = (
    "INSERT OR IGNORE INTO reservations (id, expires_at, status) VALUES (?, ?, 'held')"
)
_INSERT_ITEM = "INSERT INTO reservation_items (id, key, amount) VALUES (?, ?, ?)"
_HOLD = (
    "INSERT INTO counters (key, spent, reserved) VALUES (?, 0, ?)"
    " ON CONFLICT (key) DO UPDATE SET reserved = reserved + excluded.reserved"
)
_STATUS = "SELECT status FROM reservations WHERE id = ?"
_ITEMS = "SELECT key, amount FROM reservation_items WHERE id = ?"
_SETTLE = "UPDATE reservations SET status = ?, settled_at = ? WHERE id = ?"
_INSERT_SETTLED = (
    "INSERT INTO reservations (id, expires_at, status, settled_at)"
    " VALUES (?, ?, 'committed', ?)"
)
_CHARGE = (
    "INSERT INTO counters (key, spent, reserved) VALUES (?1, ?2, 0)"
    " ON CONFLICT (key) DO UPDATE"
    " SET spent = spent + ?2, reserved = max(reserved - ?3, 0)"
)
_UNHOLD = "UPDATE counters SET reserved = max(reserved - ?, 0) WHERE key = ?"
_INSERT_CALL = (
    "INSERT INTO calls (call_id, ts, scope, provider, model, requested_model,"
    " input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,"
    " reasoning_tokens, cost_micros, adapters, outcome, estimate_tokens,"
    " estimate_micros, latency_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_CALLS = (
    "SELECT call_id, ts, scope, provider, model, requested_model, input_tokens,"
    " output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens,"
    " cost_micros, adapters, outcome, estimate_tokens, estimate_micros, latency_ms"
    " FROM calls WHERE ts >= ? AND ts < ? ORDER BY ts, seq"
)
_SWEEP_END = (
    "SELECT max(id) FROM (SELECT id FROM reservations WHERE id > ? ORDER BY id LIMIT ?)"
)
_PURGE_ITEMS = (
    "DELETE FROM reservation_items WHERE id > ?1 AND id <= ?2 AND id IN"
    " (SELECT id FROM reservations WHERE id > ?1 AND id <= ?2"
    " AND status != 'held' AND settled_at < ?3)"
)
_PURGE_RESERVATIONS = (
    "DELETE FROM reservations WHERE id > ?1 AND id <= ?2"
    " AND status != 'held' AND settled_at < ?3"
)
_CLAIM = "INSERT OR IGNORE INTO markers (marker, ts) VALUES (?, ?)"
_RESET_COUNTERS = "DELETE FROM counters WHERE substr(key, 1, length(?1)) = ?1"
_RESET_ITEMS = (
    "DELETE FROM reservation_items WHERE substr(key, 1, length(?1)) = ?1"
    " AND id IN (SELECT id FROM reservations WHERE status = 'held')"
)
_RESET_MARKERS = "DELETE FROM markers WHERE substr(marker, 1, length(?1)) = ?1"
_KEYS = (
    "SELECT key, spent, reserved FROM counters"
    " WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key"
)

_ZERO = KeyState()


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

    __slots__ = ("__weakref__", "conn", "generation", "pid")

    def __init__(self, conn: sqlite3.Connection, generation: int) -> None:
        self.conn = conn
        self.pid = _pid
        self.generation = generation

    def close(self) -> None:
        if self.pid == _pid:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        else:
            _inherited.append(self.conn)

    def __del__(self) -> None:
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
    comes out as ``LedgerError`` naming the file and the operation.
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
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            self.lock.release()
            raise _ledger_error(self.ledger, err, self.operation) from err
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: object,
    ) -> None:
        conn = self.conn
        try:
            if exc is None:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as err:
                    _rollback(conn)
                    raise _ledger_error(self.ledger, err, self.operation) from err
                return
            _rollback(conn)
            if isinstance(exc, sqlite3.Error):
                raise _ledger_error(self.ledger, exc, self.operation) from exc
        finally:
            self.lock.release()


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
        ConfigurationError: ``path`` is a directory or ``busy_timeout`` is
            negative.
        LedgerUnavailableError: The file cannot be created, opened, or is not
            a SQLite database of a schema this version understands.

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
        self._executor: ThreadPoolExecutor | None = None
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
        check_plans(plans)
        check_lease(lease_seconds)
        keys = plan_keys(plans)
        handle = self._connection()
        known = False
        with _Write(self, handle.conn, "reserve") as conn:
            now = self._clock()
            expired = conn.execute(_REAP_SELECT, (now,)).fetchall()
            if expired:
                self._expire(conn, [row[0] for row in expired], now)
            before = self._read_states(conn, keys)
            index = choose_plan(plans, before)
            if index is not None:
                inserted = conn.execute(
                    _INSERT_RESERVATION, (reservation_id, now + lease_seconds)
                ).rowcount
                if inserted:
                    holds = fold_amounts(plans[index])
                    if len(holds) == 1:
                        ((key, amount),) = holds.items()
                        conn.execute(_INSERT_ITEM, (reservation_id, key, amount))
                        conn.execute(_HOLD, (key, amount))
                    elif holds:
                        conn.executemany(
                            _INSERT_ITEM,
                            [(reservation_id, k, a) for k, a in holds.items()],
                        )
                        conn.executemany(_HOLD, holds.items())
                else:
                    known = True
            self._reserves += 1
            if self._reserves % _PURGE_EVERY == 0:
                self._purge_step(conn, now)
        if known:
            msg = (
                f"reservation_id={reservation_id!r} is already known to the"
                f" ledger {self.url}: every reservation needs a fresh id"
            )
            raise UsageError(msg, value=reservation_id, expected="a fresh id")
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
            LedgerError: The write failed; nothing was charged.
        """
        check_amounts(amounts)
        call = None if record is None else _call_row(record)
        with _Write(self, self._connection().conn, "commit") as conn:
            now = self._clock()
            row = conn.execute(_STATUS, (reservation_id,)).fetchone()
            held: dict[str, int]
            if row is None:
                # Unknown (purged, or never reserved here): charge anyway.
                conn.execute(_INSERT_SETTLED, (reservation_id, now, now))
                held = {}
            elif row[0] == "held":
                # Items of settled reservations stay until purged: deleting
                # them here would cost a page write on every commit.
                held = dict(conn.execute(_ITEMS, (reservation_id,)).fetchall())
                conn.execute(_SETTLE, ("committed", now, reservation_id))
            elif row[0] == "expired":
                held = {}
                conn.execute(_SETTLE, ("committed", now, reservation_id))
            else:
                return  # already settled: a repeat changes nothing
            if len(held) == 1 and (not amounts or amounts.keys() == held.keys()):
                ((key, amount),) = held.items()
                conn.execute(_CHARGE, (key, amounts.get(key, 0), amount))
            elif held or amounts:
                conn.executemany(
                    _CHARGE,
                    [
                        (key, amounts.get(key, 0), held.get(key, 0))
                        for key in dict.fromkeys([*held, *amounts])
                    ],
                )
            if call is not None:
                conn.execute(_INSERT_CALL, call)

    def release(self, reservation_id: str, *, record: CallRecord | None = None) -> None:
        """Drop the hold, charging nothing; idempotent; see ``Ledger``.

        Releasing an id the ledger does not know changes nothing and logs
        nothing (use ``record`` for calls that were never reserved).

        Raises:
            LedgerError: The write failed.
        """
        call = None if record is None else _call_row(record)
        with _Write(self, self._connection().conn, "release") as conn:
            row = conn.execute(_STATUS, (reservation_id,)).fetchone()
            if row is None or row[0] not in ("held", "expired"):
                return
            if row[0] == "held":
                held = conn.execute(_ITEMS, (reservation_id,)).fetchall()
                conn.executemany(_UNHOLD, [(a, k) for k, a in held])
            conn.execute(_SETTLE, ("released", self._clock(), reservation_id))
            if call is not None:
                conn.execute(_INSERT_CALL, call)

    def claim(self, marker: str) -> bool:
        """Set a once-only marker; True when this call set it.

        Raises:
            LedgerError: The write failed.
        """
        with _Write(self, self._connection().conn, "claim") as conn:
            cursor = conn.execute(_CLAIM, (marker, self._clock()))
            return cursor.rowcount == 1

    def record(self, record: CallRecord) -> None:
        """Append a call to the log without touching any counter.

        Raises:
            LedgerError: The write failed.
        """
        call = _call_row(record)
        with _Write(self, self._connection().conn, "record") as conn:
            conn.execute(_INSERT_CALL, call)

    def reset(self, prefix: str = "") -> None:
        """Delete counters, holds and markers whose key starts with ``prefix``.

        A reservation still held keeps its holds on other keys; a later commit
        charges whatever it is given, reset keys included. The call log stays.

        Raises:
            LedgerError: The write failed.
        """
        with _Write(self, self._connection().conn, "reset") as conn:
            conn.execute(_RESET_COUNTERS, (prefix,))
            conn.execute(_RESET_ITEMS, (prefix,))
            conn.execute(_RESET_MARKERS, (prefix,))

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
            rows = conn.execute(_KEYS, (prefix,)).fetchall()
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
            rows = conn.execute(_SELECT_CALLS, (low, high)).fetchall()
        except sqlite3.Error as err:
            raise _ledger_error(self, err, "read the call log") from err
        try:
            return [_call_from_row(row) for row in rows]
        except (ValueError, TypeError) as err:
            msg = f"SQLite ledger at {self.path}: a call log row is malformed: {err}"
            raise LedgerError(msg) from err

    def close(self) -> None:
        """Close this ledger's connections and its worker thread.

        A later call opens fresh connections, so closing twice, or using the
        ledger after closing, is safe.
        """
        with self._guard:
            executor, self._executor = self._executor, None
            self._generation += 1
            handles = list(self._connections)
            self._connections.clear()
        if executor is not None:
            executor.shutdown(wait=True)
        for handle in handles:
            handle.close()
        self._local = threading.local()

    # -- async twins: one worker thread, so the event loop never waits --------

    async def areserve(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        *,
        reservation_id: str,
        lease_seconds: float,
    ) -> ReserveResult:
        """Async twin of ``reserve``, run on the ledger's worker thread.

        If the awaiting task is cancelled while the worker holds the plan, the
        hold is released as soon as the reserve finishes: a cancelled call
        never keeps budget until its lease ends.
        """
        future = self._submit(
            functools.partial(
                self.reserve,
                plans,
                reservation_id=reservation_id,
                lease_seconds=lease_seconds,
            )
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(
                functools.partial(self._release_if_admitted, reservation_id)
            )
            raise

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
        """Async twin of ``release``."""
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
        await asyncio.to_thread(self.close)

    # -- internals ------------------------------------------------------------

    def _submit(self, call: Callable[[], _T]) -> asyncio.Future[_T]:
        executor = self._executor
        if executor is None or self._pid != _pid:
            executor = self._new_executor()
        return asyncio.get_running_loop().run_in_executor(executor, call)

    def _new_executor(self) -> ThreadPoolExecutor:
        with self._guard:
            if self._pid != _pid:
                self._after_fork()
            if self._executor is None:
                # One worker: SQLite serialises writes anyway, and one thread
                # never contends with itself for the write lock.
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="allowance-sqlite"
                )
            return self._executor

    def _release_if_admitted(
        self, reservation_id: str, future: asyncio.Future[ReserveResult]
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        if future.result().admitted:
            executor = self._executor
            if executor is not None:
                executor.submit(self._release_quietly, reservation_id)

    def _release_quietly(self, reservation_id: str) -> None:
        try:
            self.release(reservation_id)
        except LedgerError:
            logger.warning(
                "could not release cancelled reservation %r; its lease will",
                reservation_id,
                exc_info=True,
            )

    def _after_fork(self) -> None:
        """Drop what the parent process owned: connections, locks, worker."""
        self._pid = _pid
        self._executor = None  # its thread does not exist in the child
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
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning(
                    "SQLite ledger at %s: journal mode is %s, not WAL", path, mode
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            if not self._schema_ready:
                self._ensure_schema(conn)
                self._schema_ready = True
        except sqlite3.Error as err:
            if conn is not None:
                conn.close()
            what = _describe(err, self.busy_timeout)
            msg = f"SQLite ledger at {path}: cannot open the database: {what}"
            raise LedgerUnavailableError(msg) from err
        except LedgerUnavailableError:
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
        if version == SCHEMA_VERSION:
            return
        self._check_version(version)
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have created it while we waited.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                self._check_version(version)
                if version == 0:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    def _check_version(self, version: int) -> None:
        if version not in (0, SCHEMA_VERSION):
            msg = (
                f"SQLite ledger at {self.path}: schema version {version} is not"
                f" {SCHEMA_VERSION}, the one this version of allowance writes"
                " (a newer allowance created it?)"
            )
            raise LedgerUnavailableError(msg)

    def _read_states(
        self, conn: sqlite3.Connection, keys: list[str]
    ) -> dict[str, KeyState]:
        states = dict.fromkeys(keys, _ZERO)
        if len(keys) == 1:
            row = conn.execute(_STATE_ONE, keys).fetchone()
            if row is not None:
                states[row[0]] = KeyState(row[1], row[2])
            return states
        for start in range(0, len(keys), _MAX_VARIABLES):
            chunk = keys[start : start + _MAX_VARIABLES]
            rows = conn.execute(_state_many(len(chunk)), chunk).fetchall()
            for key, spent, reserved in rows:
                states[key] = KeyState(spent, reserved)
        return states

    def _purge_step(self, conn: sqlite3.Connection, now: float) -> None:
        """Delete settled reservations older than a day in the next id window."""
        end = conn.execute(_SWEEP_END, (self._sweep_after, _PURGE_WINDOW)).fetchone()[0]
        if end is None:  # past the last id: start over
            self._sweep_after = ""
            return
        bounds = (self._sweep_after, end, now - PURGE_AFTER_SECONDS)
        conn.execute(_PURGE_ITEMS, bounds)
        conn.execute(_PURGE_RESERVATIONS, bounds)
        self._sweep_after = end

    def _expire(
        self, conn: sqlite3.Connection, reservation_ids: list[str], now: float
    ) -> None:
        released: dict[str, int] = {}
        for reservation_id in reservation_ids:
            for key, amount in conn.execute(_ITEMS, (reservation_id,)).fetchall():
                released[key] = released.get(key, 0) + amount
        conn.executemany(
            _SETTLE,
            [("expired", now, reservation_id) for reservation_id in reservation_ids],
        )
        conn.executemany(_UNHOLD, [(amount, key) for key, amount in released.items()])


@functools.cache
def _state_many(count: int) -> str:
    marks = ", ".join("?" * count)
    return f"SELECT key, spent, reserved FROM counters WHERE key IN ({marks})"  # noqa: S608 - placeholders only


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


def _call_row(record: CallRecord) -> tuple[Any, ...]:
    usage = record.usage
    return (
        record.call_id,
        record.ts,
        json.dumps(dict(record.scope), separators=(",", ":"), ensure_ascii=False),
        record.provider,
        record.model,
        record.requested_model,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
        record.cost_micros,
        json.dumps(list(record.adapters), separators=(",", ":"), ensure_ascii=False),
        record.outcome,
        record.estimate_tokens,
        record.estimate_micros,
        record.latency_ms,
    )


def _call_from_row(row: tuple[Any, ...]) -> CallRecord:
    scope = json.loads(row[2])
    adapters = json.loads(row[12])
    if not isinstance(scope, dict) or not isinstance(adapters, list):
        msg = f"call {row[0]!r}: scope or adapters is not JSON of the right shape"
        raise TypeError(msg)
    return CallRecord(
        call_id=row[0],
        ts=row[1],
        scope={str(k): str(v) for k, v in scope.items()},
        provider=row[3],
        model=row[4],
        requested_model=row[5],
        usage=Usage(
            input_tokens=row[6],
            output_tokens=row[7],
            cache_read_tokens=row[8],
            cache_write_tokens=row[9],
            reasoning_tokens=row[10],
        ),
        cost_micros=row[11],
        adapters=tuple(str(a) for a in adapters),
        outcome=row[13],
        estimate_tokens=row[14],
        estimate_micros=row[15],
        latency_ms=row[16],
    )
