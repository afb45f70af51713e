"""The SQLite ledger's schema, its SQL, and the call log's row format.

Tables (``PRAGMA user_version`` = ``SCHEMA_VERSION``):

- ``counters(key, spent, reserved)``: one row per ledger key.
- ``reservations(id, expires_at, status, settled_at, items)``: ``status`` is
  ``held``, ``committed``, ``released`` or ``expired``. ``items`` is what a
  held reservation holds, as a JSON object ``{key: amount}``, and NULL once
  it settled. Keeping the items in the row rather than in a table of their own
  saves a b-tree write per reserve: a reserve+commit pair over 3 keys costs
  ~30% less. A partial index over ``expires_at`` of held rows makes reaping a
  range scan. Settled rows stay a day (commits stay idempotent), then go.
- ``markers(marker, ts)``: once-only markers.
- ``calls``: the call log, one column per ``CallRecord`` field (usage
  flattened; scope and adapters as JSON), indexed by ``ts``.

Statements used on the hot path have constant text, so ``sqlite3``'s statement
cache prepares each once per connection; those over several keys are built
once per key count.
"""

from __future__ import annotations

import functools
import json
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from allowance.typing import CallRecord, Usage

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "CHARGE_ONE",
    "CLAIM",
    "EXPIRE",
    "HOLD_ONE",
    "INSERT_CALL",
    "INSERT_RESERVATION",
    "INSERT_SETTLED",
    "KEYS",
    "PAGE_SIZE",
    "PURGE",
    "REAP_SELECT",
    "RESET_COUNTERS",
    "RESET_MARKERS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SELECT_CALLS",
    "SELECT_HELD",
    "SETTLE",
    "SET_ITEMS",
    "SET_SLICE",
    "STATE_ONE",
    "STATUS",
    "SWEEP_END",
    "UNHOLD",
    "call_from_row",
    "call_row",
    "charge",
    "decode_items",
    "encode_items",
    "encode_one",
    "hold",
    "reap_and_read",
    "state_many",
]

SCHEMA_VERSION: Final = 1
"""Stored in ``PRAGMA user_version``; another version is refused, not guessed at."""

PAGE_SIZE: Final = 1024
"""Page size of a new file. Every write touches a few small rows, and 1 KiB
pages make each WAL frame, so each transaction, cheaper than 4 KiB ones."""

SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS counters (
        key TEXT PRIMARY KEY,
        spent INTEGER NOT NULL DEFAULT 0,
        reserved INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS reservations (
        id TEXT PRIMARY KEY,
        expires_at REAL NOT NULL,
        status TEXT NOT NULL,
        settled_at REAL,
        items TEXT
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS reservations_held
        ON reservations (expires_at) WHERE status = 'held'""",
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

# -- reservations ------------------------------------------------------------

INSERT_RESERVATION: Final = (
    "INSERT OR IGNORE INTO reservations (id, expires_at, status, items)"
    " VALUES (?, ?, 'held', ?)"
)
STATUS: Final = "SELECT status, items FROM reservations WHERE id = ?"
SETTLE: Final = (
    "UPDATE reservations SET status = ?, settled_at = ?, items = NULL WHERE id = ?"
)
INSERT_SETTLED: Final = (
    "INSERT INTO reservations (id, expires_at, status, settled_at)"
    " VALUES (?, ?, 'committed', ?)"
)
EXPIRE: Final = (
    "UPDATE reservations SET status = 'expired', settled_at = ?1, items = NULL"
    " WHERE status = 'held' AND expires_at <= ?1"
)
SELECT_HELD: Final = "SELECT id, items FROM reservations WHERE status = 'held'"
REAP_SELECT: Final = (
    "SELECT items FROM reservations WHERE status = 'held' AND expires_at <= ?"
)
SET_ITEMS: Final = "UPDATE reservations SET items = ? WHERE id = ?"
SET_SLICE: Final = "UPDATE reservations SET items = ?, expires_at = ? WHERE id = ?"
SWEEP_END: Final = (
    "SELECT max(id) FROM (SELECT id FROM reservations WHERE id > ? ORDER BY id LIMIT ?)"
)
PURGE: Final = (
    "DELETE FROM reservations WHERE id > ?1 AND id <= ?2"
    " AND status != 'held' AND settled_at < ?3"
)

# -- counters ----------------------------------------------------------------

STATE_ONE: Final = "SELECT key, spent, reserved FROM counters WHERE key = ?"
HOLD_ONE: Final = (
    "INSERT INTO counters (key, spent, reserved) VALUES (?, 0, ?)"
    " ON CONFLICT (key) DO UPDATE SET reserved = reserved + excluded.reserved"
)
CHARGE_ONE: Final = (
    "INSERT INTO counters (key, spent, reserved) VALUES (?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET spent = spent + excluded.spent,"
    " reserved = max(reserved + excluded.reserved, 0)"
)
UNHOLD: Final = "UPDATE counters SET reserved = max(reserved - ?, 0) WHERE key = ?"
KEYS: Final = (
    "SELECT key, spent, reserved FROM counters"
    " WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key"
)
RESET_COUNTERS: Final = "DELETE FROM counters WHERE substr(key, 1, length(?1)) = ?1"

# -- markers and calls ---------------------------------------------------------

CLAIM: Final = "INSERT OR IGNORE INTO markers (marker, ts) VALUES (?, ?)"
RESET_MARKERS: Final = "DELETE FROM markers WHERE substr(marker, 1, length(?1)) = ?1"
INSERT_CALL: Final = (
    "INSERT INTO calls (call_id, ts, scope, provider, model, requested_model,"
    " input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,"
    " reasoning_tokens, cost_micros, adapters, outcome, estimate_tokens,"
    " estimate_micros, latency_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_CALLS: Final = (
    "SELECT call_id, ts, scope, provider, model, requested_model, input_tokens,"
    " output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens,"
    " cost_micros, adapters, outcome, estimate_tokens, estimate_micros, latency_ms"
    " FROM calls WHERE ts >= ? AND ts < ? ORDER BY ts, seq"
)


# -- statements over several keys, built once per key count -------------------


@functools.cache
def reap_and_read(count: int) -> str:
    """Return one query for expired holds (tag 0) and ``count`` counters (tag 1).

    Parameters: the current time, then the keys.
    """
    marks = ", ".join("?" * count)
    return (
        "SELECT 0, items, NULL, NULL FROM reservations"  # noqa: S608 - placeholders only
        " WHERE status = 'held' AND expires_at <= ?"
        " UNION ALL SELECT 1, key, spent, reserved FROM counters"
        f" WHERE key IN ({marks})"
    )


@functools.cache
def state_many(count: int) -> str:
    """Return a query for the counters of ``count`` keys."""
    marks = ", ".join("?" * count)
    return f"SELECT key, spent, reserved FROM counters WHERE key IN ({marks})"  # noqa: S608 - placeholders only


@functools.cache
def hold(count: int) -> str:
    """Return an upsert adding holds to ``count`` keys: ``key, amount`` pairs."""
    if count == 1:
        return HOLD_ONE
    rows = ", ".join(["(?, 0, ?)"] * count)
    return (
        f"INSERT INTO counters (key, spent, reserved) VALUES {rows}"  # noqa: S608 - placeholders only
        " ON CONFLICT (key) DO UPDATE SET reserved = reserved + excluded.reserved"
    )


@functools.cache
def charge(count: int) -> str:
    """Return an upsert charging ``count`` keys: ``key, charge, -hold`` triples.

    A held key always has a counter (``reset`` drops the holds on the counters
    it deletes), so a negative third value only ever arrives as ``excluded``
    and is clamped; a key inserted fresh has nothing held, so it gets 0.
    """
    if count == 1:
        return CHARGE_ONE
    rows = ", ".join(["(?, ?, ?)"] * count)
    return (
        f"INSERT INTO counters (key, spent, reserved) VALUES {rows}"  # noqa: S608 - placeholders only
        " ON CONFLICT (key) DO UPDATE SET spent = spent + excluded.spent,"
        " reserved = max(reserved + excluded.reserved, 0)"
    )


# -- row formats -----------------------------------------------------------------


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_CACHE_MAX: Final = 4096
"""Entries of each text cache below; a full cache is emptied."""
_items_texts: dict[str, dict[str, int]] = {}
_encode_str: Callable[[str], str] = json.encoder.encode_basestring
_decode = json.JSONDecoder().decode


def encode_items(holds: Mapping[str, int]) -> str:
    """Encode a reservation's holds for the ``items`` column."""
    return _encode(holds)


def encode_one(key: str, amount: int) -> str:
    """Encode a hold on one key, as ``encode_items({key: amount})`` does."""
    return f"{{{_encode_str(key)}:{amount}}}"


def decode_items(text: str | None) -> dict[str, int]:
    """Decode the ``items`` column; NULL (a settled row) holds nothing.

    The guard holds the same amounts on the same keys again and again, so a
    text is decoded once: the dict returned may be shared, never change it.

    Raises:
        ValueError: The text is not a JSON object of integers.
    """
    if text is None:
        return {}
    items = _items_texts.get(text)
    if items is not None:
        return items
    items = _decode(text) if type(text) is str else json.loads(text)
    if type(items) is dict:
        for amount in items.values():
            if type(amount) is not int:
                break
        else:
            if type(text) is str:
                if len(_items_texts) >= _CACHE_MAX:
                    _items_texts.clear()
                _items_texts[text] = items
            return items
    msg = f"reservation items {text[:80]!r} are not a JSON object of integers"
    raise ValueError(msg)


# The guard logs the same few scopes and adapter lists over and over: each is
# encoded once. A scope is keyed by its items (a mapping may change or be
# freed; its items cannot).
_scope_texts: dict[tuple[tuple[str, str], ...], str] = {}
_adapter_texts: dict[tuple[str, ...], str] = {}


def _scope_text(scope: Mapping[str, str]) -> str:
    items = tuple(scope.items())
    try:
        text = _scope_texts.get(items)
    except TypeError:  # an unhashable value: a caller outside the guard
        return _encode(dict(items))
    if text is None:
        text = _encode(dict(items))
        # Only text keys and values: 1, 1.0 and True are equal keys, not equal JSON.
        if all(type(k) is str and type(v) is str for k, v in items):
            if len(_scope_texts) >= _CACHE_MAX:
                _scope_texts.clear()
            _scope_texts[items] = text
    return text


def _adapters_text(adapters: tuple[str, ...]) -> str:
    if type(adapters) is not tuple:
        return _encode(list(adapters))
    try:
        text = _adapter_texts.get(adapters)
    except TypeError:  # an unhashable item: a caller outside the guard
        return _encode(list(adapters))
    if text is None:
        text = _encode(list(adapters))
        if all(type(a) is str for a in adapters):
            if len(_adapter_texts) >= _CACHE_MAX:
                _adapter_texts.clear()
            _adapter_texts[adapters] = text
    return text


def call_row(record: CallRecord) -> tuple[Any, ...]:
    """Flatten a call record into the ``calls`` columns, in ``INSERT_CALL`` order."""
    usage = record.usage
    adapters = record.adapters
    return (
        record.call_id,
        record.ts,
        _scope_text(record.scope),
        record.provider,
        record.model,
        record.requested_model,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
        record.cost_micros,
        _adapters_text(adapters),
        record.outcome,
        record.estimate_tokens,
        record.estimate_micros,
        record.latency_ms,
    )


# A day of calls repeats a few scopes and adapter lists many times: each text is
# decoded once (read-only mappings, so records can share them).
@functools.lru_cache(maxsize=65_536)
def _scope(text: str) -> Mapping[str, str]:
    scope = json.loads(text)
    if not isinstance(scope, dict):
        msg = "scope is not a JSON object"
        raise ValueError(msg)  # noqa: TRY004 - malformed stored data, a value error
    return MappingProxyType({str(k): str(v) for k, v in scope.items()})


@functools.lru_cache(maxsize=1024)
def _adapters(text: str) -> tuple[str, ...]:
    adapters = json.loads(text)
    if not isinstance(adapters, list):
        msg = "adapters is not a JSON list"
        raise ValueError(msg)  # noqa: TRY004 - malformed stored data, a value error
    return tuple(str(a) for a in adapters)


def call_from_row(row: tuple[Any, ...]) -> CallRecord:
    """Rebuild a call record from a ``SELECT_CALLS`` row.

    Raises:
        ValueError: The scope or adapters column is not JSON of the right shape.
    """
    try:
        scope = _scope(row[2])
        adapters = _adapters(row[12])
    except ValueError as err:
        msg = f"call {row[0]!r}: {err}"
        raise ValueError(msg) from err
    return CallRecord(
        call_id=row[0],
        ts=row[1],
        scope=scope,
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
        adapters=adapters,
        outcome=row[13],
        estimate_tokens=row[14],
        estimate_micros=row[15],
        latency_ms=row[16],
    )
