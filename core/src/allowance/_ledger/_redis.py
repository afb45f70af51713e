"""The Redis ledger behind ``redis://``: one budget shared by many machines.

Every write is one Lua script (``_lua/*.lua``), registered once per client and
run with EVALSHA (redis-py loads it again after a ``NOSCRIPT``), so a reserve
checks and holds every key of a call atomically. Leases are measured with the
server's clock (``TIME`` inside the scripts), so clients need no synchronised
clocks; expired leases are reaped lazily by the next reserve.

Key layout: every key of one ledger starts with the namespace in braces, a
Redis Cluster hash tag (``{allowance}:spent``, ``{allowance}:reserved``, ...,
see ``_lua/common.lua``), so all of them live in one slot and one script may
touch them all: the budgets of one call (tenant, session, day...) change
together or not at all. The price: one ledger namespace is served by one
shard. Ledger keys (``usd:tenant=acme:day=2026-11-22``) are fields of hashes,
not Redis keys, so their windows need no cron job and no key expiry.

The sync methods use one ``redis.Redis`` (a thread-safe connection pool); the
async twins use a ``redis.asyncio.Redis`` per event loop, closed when that
loop shuts down its async generators (as ``asyncio.run`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import threading
import weakref
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import (
    SplitResult,
    parse_qsl,
    unquote,
    urlencode,
    urlsplit,
    urlunsplit,
)

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url
from redis.retry import Retry

from allowance._errors import (
    ConfigurationError,
    LedgerError,
    LedgerUnavailableError,
)
from allowance._ledger import _sqlite_schema as rows
from allowance._ledger._admission import (
    check_amounts,
    check_lease,
    check_plans,
    fold_plan,
    known_id,
    plan_keys,
)
from allowance.typing import KeyState, ReserveResult

if TYPE_CHECKING:
    from collections.abc import (
        AsyncGenerator,
        Awaitable,
        Callable,
        Coroutine,
        Iterable,
        Mapping,
        Sequence,
    )

    from allowance.typing import CallRecord, ReserveItem

__all__ = ["DEFAULT_PREFIX", "RedisLedger", "open_redis_ledger"]

_T = TypeVar("_T")

DEFAULT_PREFIX: Final = "allowance"
"""The namespace of a ledger unless ``?prefix=`` says otherwise."""

PURGE_AFTER_SECONDS: Final = 86_400.0
"""Settled reservations are forgotten after a day (a later commit charges)."""

MAX_CALLS: Final = 1_000_000
"""The call log keeps the newest calls only (``?max_calls=``)."""

MAX_CONNECTIONS: Final = 64
"""Connections per client (one sync client, one per event loop); more
concurrent calls wait for one (``?max_connections=``)."""

MOST_CONNECTIONS: Final = 10_000
"""The most ``?max_connections=`` takes (Redis's own default ``maxclients``):
redis-py's blocking pool fills a queue slot per connection when built."""

SOCKET_TIMEOUT: Final = 5.0
CONNECT_TIMEOUT: Final = 2.0
RETRIES: Final = 2
"""A command that failed on a broken connection or a timeout is sent again
(after 50 ms, then 100 ms). The scripts are safe to repeat: a reserve
recognises its own retry, commit and release are idempotent (only a bare
``record`` repeated may log its call twice)."""

_SUFFIXES: Final = (
    "spent",
    "reserved",
    "names",
    "res",
    "leases",
    "settled",
    "markers",
    "calls",
    "seq",
)
_SCRIPTS: Final = ("reserve", "commit", "release", "record", "state", "keys", "reset")

_OURS: Final = frozenset({"prefix", "max_calls"})
_THEIRS: Final = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "health_check_interval",
        "max_connections",
        "client_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "db",
        "protocol",
    }
)
_OPTIONS: Final = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "health_check_interval",
        "max_connections",
        "client_name",
    }
)
"""Query options read here (with defaults) rather than by redis-py's URL parser."""
_SENTINEL_ONLY: Final = frozenset({"sentinel_password", "sentinel_username"})
_EXPECTED: Final = (
    "redis://[[user]:password@]host[:port][/db][?prefix=NAME&max_calls=N"
    "&socket_timeout=S...], rediss://... (TLS), or"
    " redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]"
)
_ZERO = KeyState()


def _load_scripts() -> dict[str, str]:
    folder = resources.files("allowance._ledger").joinpath("_lua")
    common = folder.joinpath("common.lua").read_text(encoding="utf-8")
    return {
        name: common + "\n" + folder.joinpath(f"{name}.lua").read_text("utf-8")
        for name in _SCRIPTS
    }


_SOURCES: Final = _load_scripts()


class _LoopClient:
    """The async client of one event loop, and what closes it with the loop."""

    __slots__ = ("client", "keeper", "scripts")

    def __init__(
        self,
        client: redis.asyncio.Redis,
        scripts: dict[str, Any],
        keeper: AsyncGenerator[None, None],
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.keeper = keeper


async def _keeper(client: redis.asyncio.Redis) -> AsyncGenerator[None, None]:
    """Close ``client`` when the loop shuts down its async generators."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


class RedisLedger:
    """A ledger in Redis, shared by every process and machine that reaches it.

    Open it with ``open_ledger("redis://host:6379/0")`` (see
    ``open_redis_ledger`` for the URL forms).

    Args:
        make_client: Builds the sync ``redis.Redis`` client.
        make_async_client: Builds a ``redis.asyncio.Redis`` client (one per
            event loop).
        url: The URL, with any password masked, for messages and reports.
        prefix: The namespace: every Redis key of the ledger starts with
            ``{prefix}:`` (a hash tag).
        clock: Returns the current Unix time for leases; None (the default)
            uses the Redis server's clock, which every client shares.
        max_calls: How many calls the call log keeps (the newest).

    Example:
        >>> ledger = open_ledger("redis://127.0.0.1:6379/0")  # doctest: +SKIP
        >>> ledger.state(["tenant:acme"])["tenant:acme"].used  # doctest: +SKIP
        0
    """

    def __init__(
        self,
        make_client: Callable[[], redis.Redis],
        make_async_client: Callable[[], redis.asyncio.Redis],
        *,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] | None = None,
        max_calls: int = MAX_CALLS,
    ) -> None:
        """Prepare the clients; nothing connects before the first call."""
        self.url = url
        self.prefix = prefix
        self._make_async_client = make_async_client
        self._clock = clock
        self._max_calls = str(max_calls)
        # Encoded once: redis-py passes bytes through untouched.
        self._keys = [f"{{{prefix}}}:{suffix}".encode() for suffix in _SUFFIXES]
        self._markers = self._keys[6]
        self._calls = self._keys[7]
        self._client = make_client()
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in _SOURCES.items()
        }
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _LoopClient
        ] = weakref.WeakKeyDictionary()
        self._loops_lock = threading.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._nonce = f"{os.urandom(4).hex()}."
        self._counter = itertools.count()

    def __repr__(self) -> str:
        """Show the URL (password masked) and the namespace."""
        return f"RedisLedger(url={self.url!r}, prefix={self.prefix!r})"

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
            LedgerUnavailableError: Redis cannot be reached.
            LedgerError: Redis refused the script (out of memory, read-only
                replica, ...).
        """
        keys, args = self._reserve_args(plans, reservation_id, lease_seconds)
        reply = self._run("reserve", args)
        return self._reserve_result(reply, keys, reservation_id)

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
            LedgerUnavailableError: Redis cannot be reached (a retry is safe).
            LedgerError: Redis refused the script.
        """
        self._run("commit", self._commit_args(reservation_id, amounts, record))

    def release(self, reservation_id: str, *, record: CallRecord | None = None) -> None:
        """Drop the hold, charging nothing; idempotent; see ``Ledger``.

        Raises:
            LedgerUnavailableError: Redis cannot be reached.
            LedgerError: Redis refused the script.
        """
        self._run("release", self._release_args(reservation_id, record))

    def claim(self, marker: str) -> bool:
        """Set a once-only marker; True when this call set it.

        Raises:
            LedgerUnavailableError: Redis cannot be reached.
        """
        added = self._call(
            "claim", lambda: self._client.zadd(self._markers, {marker: 0}, nx=True)
        )
        return bool(added)

    def record(self, record: CallRecord) -> None:
        """Append a call to the log without touching any counter.

        Raises:
            LedgerUnavailableError: Redis cannot be reached.
        """
        self._run("record", self._record_args(record))

    def reset(self, prefix: str = "") -> None:
        """Delete counters, holds and markers whose key starts with ``prefix``.

        A reservation still held keeps its holds on other keys; a later commit
        charges whatever it is given, reset keys included. The call log stays.

        Raises:
            LedgerUnavailableError: Redis cannot be reached.
        """
        self._run("reset", [prefix])

    # -- reads ----------------------------------------------------------------

    def state(self, keys: Iterable[str]) -> dict[str, KeyState]:
        """Return the state of each key (zeros for keys never used).

        Raises:
            LedgerUnavailableError: Redis cannot be reached.
        """
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        return _states(wanted, self._run("state", wanted))

    def keys(self, prefix: str = "") -> dict[str, KeyState]:
        """Return every counter whose key starts with ``prefix``, sorted by key.

        Raises:
            LedgerUnavailableError: Redis cannot be reached.
        """
        reply = self._run("keys", [prefix])
        return {
            _text(reply[i]): KeyState(int(reply[i + 1]), int(reply[i + 2]))
            for i in range(0, len(reply), 3)
        }

    def calls(
        self, *, since: float | None = None, until: float | None = None
    ) -> list[CallRecord]:
        """Return logged calls with ``since <= ts < until``, oldest first.

        Raises:
            LedgerUnavailableError: Redis cannot be reached.
            LedgerError: A logged call is malformed.
        """
        low = "-inf" if since is None else repr(float(since))
        high = "+inf" if until is None else f"({float(until)!r}"
        members = self._call(
            "read the call log",
            lambda: self._client.zrangebyscore(self._calls, low, high),
        )
        return self._decode_calls(members)

    def close(self) -> None:
        """Close the connections; a later call opens fresh ones.

        Async clients of event loops that are still running stay open until
        their loop shuts down (or ``aclose`` is awaited on it).
        """
        with contextlib.suppress(Exception):
            self._client.close()
        with self._loops_lock:
            for loop in [loop for loop in self._loops if loop.is_closed()]:
                del self._loops[loop]

    # -- async twins ----------------------------------------------------------

    async def areserve(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        *,
        reservation_id: str,
        lease_seconds: float,
    ) -> ReserveResult:
        """Async twin of ``reserve``.

        If the awaiting task is cancelled while the script runs, a plan it
        admitted is released as soon as the reply arrives: a cancelled call
        never keeps budget until its lease ends.
        """
        keys, args = self._reserve_args(plans, reservation_id, lease_seconds)
        task = asyncio.ensure_future(self._arun("reserve", args))
        try:
            reply = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(
                lambda done: self._release_orphan(done, reservation_id)
            )
            self._keep(task)
            raise
        return self._reserve_result(reply, keys, reservation_id)

    async def acommit(
        self,
        reservation_id: str,
        amounts: Mapping[str, int],
        *,
        record: CallRecord | None = None,
    ) -> None:
        """Async twin of ``commit`` (a cancelled await still commits)."""
        args = self._commit_args(reservation_id, amounts, record)
        await self._shielded(self._arun("commit", args))

    async def arelease(
        self, reservation_id: str, *, record: CallRecord | None = None
    ) -> None:
        """Async twin of ``release`` (a cancelled await still releases)."""
        args = self._release_args(reservation_id, record)
        await self._shielded(self._arun("release", args))

    async def astate(self, keys: Iterable[str]) -> dict[str, KeyState]:
        """Async twin of ``state``."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        return _states(wanted, await self._arun("state", wanted))

    async def aclaim(self, marker: str) -> bool:
        """Async twin of ``claim``."""
        client = (await self._loop_client()).client
        added = await self._acall(
            "claim", lambda: client.zadd(self._markers, {marker: 0}, nx=True)
        )
        return bool(added)

    async def arecord(self, record: CallRecord) -> None:
        """Async twin of ``record``."""
        await self._arun("record", self._record_args(record))

    async def aclose(self) -> None:
        """Async twin of ``close``; also closes this event loop's client."""
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            entry = self._loops.pop(loop, None)
        if entry is not None:
            await entry.keeper.aclose()
        await asyncio.to_thread(self.close)

    # -- arguments and replies ------------------------------------------------

    def _now(self) -> str:
        clock = self._clock
        return "" if clock is None else repr(float(clock()))

    def _reserve_args(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        reservation_id: str,
        lease_seconds: float,
    ) -> tuple[list[str], list[Any]]:
        check_plans(plans)
        check_lease(lease_seconds)
        keys = plan_keys(plans)
        # Names this very call, so that a retry of it is recognised.
        nonce = f"{self._nonce}{os.getpid():x}.{next(self._counter)}"
        args: list[Any] = [
            self._now(),
            repr(float(lease_seconds)),
            reservation_id,
            nonce,
            repr(PURGE_AFTER_SECONDS),
            len(keys),
            *keys,
            len(plans),
        ]
        for plan in plans:
            folded = fold_plan(plan)
            args.append(len(folded))
            for key, (amount, limit, gate) in folded.items():
                args += (key, amount, limit, "" if gate is None else gate)
        return keys, args

    def _reserve_result(
        self, reply: list[Any], keys: list[str], reservation_id: str
    ) -> ReserveResult:
        plan = int(reply[0])
        before = {
            key: KeyState(int(reply[2 * i + 1]), int(reply[2 * i + 2]))
            for i, key in enumerate(keys)
        }
        if plan == -2:  # noqa: PLR2004 - the script's "id already known"
            raise known_id(reservation_id, self.url)
        return ReserveResult(None if plan < 0 else plan, before)

    def _commit_args(
        self,
        reservation_id: str,
        amounts: Mapping[str, int],
        record: CallRecord | None,
    ) -> list[Any]:
        check_amounts(amounts)
        ts, row = _row(record)
        args: list[Any] = [
            self._now(),
            reservation_id,
            ts,
            row,
            self._max_calls,
            len(amounts),
        ]
        for key, amount in amounts.items():
            args += (key, amount)
        return args

    def _release_args(
        self, reservation_id: str, record: CallRecord | None
    ) -> list[Any]:
        ts, row = _row(record)
        return [self._now(), reservation_id, ts, row, self._max_calls]

    def _record_args(self, record: CallRecord) -> list[Any]:
        ts, row = _row(record)
        return [ts, row, self._max_calls]

    def _decode_calls(self, members: list[Any]) -> list[CallRecord]:
        try:
            return [rows.call_from_row(tuple(json.loads(m[16:]))) for m in members]
        except (ValueError, TypeError, IndexError) as err:
            msg = f"Redis ledger at {self.url}: a logged call is malformed: {err}"
            raise LedgerError(msg) from err

    # -- running scripts ------------------------------------------------------

    def _run(self, name: str, args: list[Any]) -> Any:
        script = self._scripts[name]
        return self._call(name, lambda: script(keys=self._keys, args=args))

    def _call(self, operation: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except redis.RedisError as err:
            raise self._error(operation, err) from err

    async def _arun(self, name: str, args: list[Any]) -> Any:
        scripts = (await self._loop_client()).scripts
        script = scripts[name]
        return await self._acall(name, lambda: script(keys=self._keys, args=args))

    async def _acall(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await call()
        except redis.RedisError as err:
            raise self._error(operation, err) from err

    def _error(self, operation: str, err: redis.RedisError) -> LedgerError:
        where = f"Redis ledger at {self.url}"
        if isinstance(err, redis.ConnectionError | redis.TimeoutError):
            msg = f"{where}: {operation} failed: Redis is unreachable: {err}"
            return LedgerUnavailableError(msg)
        return LedgerError(f"{where}: {operation} failed: {err}")

    async def _loop_client(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        entry = self._loops.get(loop)
        if entry is not None:
            return entry
        client = self._make_async_client()
        scripts = {
            name: client.register_script(source) for name, source in _SOURCES.items()
        }
        keeper = _keeper(client)
        await keeper.__anext__()  # now the loop knows it, and closes it at shutdown
        entry = _LoopClient(client, scripts, keeper)
        with self._loops_lock:
            self._loops[loop] = entry
        return entry

    def _keep(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._tasks.discard)

    async def _shielded(self, call: Coroutine[Any, Any, _T]) -> _T:
        task = asyncio.ensure_future(call)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._keep(task)  # it finishes; a failure is logged by asyncio
            raise

    def _release_orphan(self, done: asyncio.Future[Any], reservation_id: str) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # nothing admitted, or unknown: the lease ends it
        if int(done.result()[0]) >= 0:
            self._keep(asyncio.ensure_future(self.arelease(reservation_id)))


def _states(keys: list[str], reply: list[Any]) -> dict[str, KeyState]:
    return {
        key: KeyState(int(reply[2 * i]), int(reply[2 * i + 1]))
        for i, key in enumerate(keys)
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _row(record: CallRecord | None) -> tuple[str, str]:
    if record is None:
        return "", ""
    row = json.dumps(rows.call_row(record), separators=(",", ":"), ensure_ascii=False)
    return repr(float(record.ts)), row


# -- opening from a URL ------------------------------------------------------------


def open_redis_ledger(url: str, **options: Any) -> RedisLedger:
    """Open the Redis ledger a URL names.

    URL forms:

    - ``redis://[[user]:password@]host[:port][/db]``: one Redis server.
    - ``rediss://...``: the same over TLS (``?ssl_cert_reqs=``,
      ``ssl_ca_certs=`` ... as redis-py reads them).
    - ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``:
      the master of ``service``, found through the Sentinels listed (default
      port 26379); ``?sentinel_password=`` if the Sentinels need one.

    Query options: ``prefix`` (the namespace, default ``allowance``: every
    Redis key is ``{prefix}:...``, so several ledgers can share a database),
    ``max_calls`` (call log size, default 1,000,000), and redis-py's
    ``socket_timeout`` (default 5 s), ``socket_connect_timeout`` (default
    2 s), ``health_check_interval``, ``max_connections``, ``client_name``.

    Args:
        url: The URL.
        **options: ``clock`` (a callable returning Unix time, for tests: leases
            are then measured with it instead of the server's clock),
            ``prefix`` and ``max_calls`` (overriding the URL's).

    Returns:
        The ledger; it connects on its first call.

    Raises:
        ConfigurationError: The URL is malformed or an option unknown.
    """
    scheme, _, _ = url.partition("://")
    scheme = scheme.lower()
    safe = _masked(url)  # errors name the URL with its passwords hidden
    try:
        parts = urlsplit(url)
    except ValueError as err:  # "redis://[::1/0": an unclosed IPv6 address
        raise ConfigurationError("ledger", safe, _EXPECTED) from err
    if parts.fragment:
        raise ConfigurationError("ledger", safe, _EXPECTED)
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as err:
        raise ConfigurationError("ledger", safe, _EXPECTED) from err
    query = dict(pairs)
    allowed = (
        _OURS | _THEIRS | (_SENTINEL_ONLY if scheme == "redis+sentinel" else set())
    )
    unknown = sorted(set(query) - allowed)
    if unknown or len(query) != len(pairs):
        expected = (
            f"{_EXPECTED}; query options: {', '.join(sorted(allowed))} (each once)"
        )
        raise ConfigurationError("ledger", safe, expected)
    prefix = str(options.pop("prefix", query.pop("prefix", DEFAULT_PREFIX)))
    if not prefix or any(c in prefix for c in "{}"):
        what, expected = "ledger prefix", "a non-empty name without { or }"
        raise ConfigurationError(what, prefix, expected)
    max_calls = _positive_int(
        safe, "max_calls", options.pop("max_calls", query.pop("max_calls", MAX_CALLS))
    )
    clock = options.pop("clock", None)
    if clock is not None and not callable(clock):
        what, expected = "clock", "a callable returning Unix time"
        raise ConfigurationError(what, clock, expected)
    if options:
        what = "ledger option"
        expected = f"one of the options {scheme} takes: clock, max_calls, prefix"
        raise ConfigurationError(what, min(options), expected)
    if scheme == "redis+sentinel":
        make, make_async = _sentinel_factories(safe, parts, query)
    else:
        make, make_async = _direct_factories(safe, parts, query)
    return RedisLedger(
        make,
        make_async,
        url=_mask(parts),
        prefix=prefix,
        clock=clock,
        max_calls=max_calls,
    )


def _positive_int(url: str, name: str, value: object, most: int | None = None) -> int:
    """``value`` as an int > 0 (and <= ``most``); ``url`` is the masked URL."""
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number <= 0 or (most is not None and number > most):
        expected = (
            f"{name}=<an int > 0>"
            if most is None
            else (f"{name}=<an int from 1 to {most:,}>")
        )
        raise ConfigurationError("ledger", url, expected)
    return number


def _masked(url: str) -> str:
    """``url`` with its passwords hidden, even when it does not parse."""
    try:
        parts = urlsplit(url)
    except ValueError:
        scheme, sep, rest = url.partition("://")
        if "@" in rest:  # a user and password may be anywhere before the last @
            rest = "***@" + rest.rpartition("@")[2]
        rest = re.sub(r"(sentinel_password=)[^&#]*", r"\1***", rest)
        return f"{scheme}{sep}{rest}"
    if parts.password is None and "sentinel_password" not in parts.query:
        return url  # nothing to hide: shown as written
    return _mask(parts)


def _mask(parts: SplitResult) -> str:
    """Return the URL with its password (and the Sentinels' one) hidden."""
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        name = user.partition(":")[0]
        netloc = f"{name}:***@{host}"
    query = [
        (k, "***" if k == "sentinel_password" else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(
        (parts.scheme, netloc, parts.path, urlencode(query, safe="*"), "")
    )


def _options(url: str, query: dict[str, str]) -> dict[str, Any]:
    """redis-py's connection options from the query, with our defaults."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
    }
    floats = ("socket_timeout", "socket_connect_timeout", "health_check_interval")
    for name in floats:
        if name in query:
            try:
                value = float(query[name])
            except ValueError:
                value = math.nan
            if not value >= 0 or math.isinf(value):
                raise ConfigurationError("ledger", url, f"{name}=<seconds >= 0>")
            options[name] = value
    if "max_connections" in query:
        options["max_connections"] = _positive_int(
            url, "max_connections", query["max_connections"], MOST_CONNECTIONS
        )
    if "client_name" in query:
        options["client_name"] = query["client_name"]
    return options


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), RETRIES)


def _aretry() -> redis.asyncio.retry.Retry:
    return redis.asyncio.retry.Retry(ExponentialBackoff(cap=0.2, base=0.05), RETRIES)


def _direct_factories(
    url: str, parts: SplitResult, query: dict[str, str]
) -> tuple[Callable[[], redis.Redis], Callable[[], redis.asyncio.Redis]]:
    options = _options(url, query)
    # What redis-py reads from the URL itself (TLS settings, db, protocol).
    passed = {k: v for k, v in query.items() if k in _THEIRS and k not in _OPTIONS}
    clean = urlunsplit(
        (parts.scheme.lower(), parts.netloc, parts.path, urlencode(passed), "")
    )
    try:
        parts.port  # noqa: B018 - raises ValueError when out of range
        path = parts.path.strip("/")
        if not parts.hostname or (path and not path.isdigit()):
            raise ValueError(url)  # noqa: TRY301 - one error for every bad URL
        parse_url(clean)  # type: ignore[no-untyped-call] # redis-py's own check
    except ValueError as err:
        raise ConfigurationError("ledger", url, _EXPECTED) from err

    # Blocking pools: a burst of concurrent calls waits for a free connection
    # (up to socket_timeout) instead of failing with "Too many connections".
    pooled = {
        "max_connections": options.pop("max_connections", MAX_CONNECTIONS),
        "timeout": options["socket_timeout"],
        **options,
    }

    def make() -> redis.Redis:
        pool = redis.BlockingConnectionPool.from_url(clean, retry=_retry(), **pooled)
        return redis.Redis.from_pool(pool)

    def make_async() -> redis.asyncio.Redis:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            clean, retry=_aretry(), **pooled
        )
        return redis.asyncio.Redis.from_pool(pool)

    return make, make_async


class _SentinelRedis(redis.Redis):
    """The master's client; closing it closes the Sentinels' clients too."""

    sentinel_clients: list[redis.Redis]

    def close(self) -> None:
        super().close()
        for client in getattr(self, "sentinel_clients", ()):
            client.close()


class _AsyncSentinelRedis(redis.asyncio.Redis):
    """The master's async client; closing it closes the Sentinels' clients too."""

    sentinel_clients: list[redis.asyncio.Redis]

    async def aclose(self, close_connection_pool: bool | None = None) -> None:  # noqa: FBT001 - as redis-py
        await super().aclose(close_connection_pool)
        for client in getattr(self, "sentinel_clients", ()):
            await client.aclose()


def _parse_sentinel(
    url: str, parts: SplitResult, query: dict[str, str]
) -> tuple[list[tuple[str, int]], str, int]:
    """Return the Sentinels' addresses, the service name and the db number."""
    hosts = parts.netloc.rpartition("@")[2]
    sentinels: list[tuple[str, int]] = []
    try:
        for host in hosts.split(","):
            name, colon, port = host.rpartition(":")
            if not colon:
                name, port = host, ""
            number = int(port) if port else 26379
            if not name or not 0 < number < 65536:  # noqa: PLR2004 - TCP ports
                raise ValueError(host)  # noqa: TRY301 - one error for every bad URL
            sentinels.append((name, number))
        path = [unquote(p) for p in parts.path.split("/") if p]
        db = path[1] if len(path) == 2 else query.get("db", "0")  # noqa: PLR2004
        if not 1 <= len(path) <= 2 or not db.isdigit():  # noqa: PLR2004
            raise ValueError(parts.path)  # noqa: TRY301
    except ValueError as err:
        raise ConfigurationError("ledger", url, _EXPECTED) from err
    return sentinels, path[0], int(db)


def _sentinel_factories(
    url: str, parts: SplitResult, query: dict[str, str]
) -> tuple[Callable[[], redis.Redis], Callable[[], redis.asyncio.Redis]]:
    sentinels, service, db = _parse_sentinel(url, parts, query)
    options = _options(url, query)
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    sentinel_options: dict[str, Any] = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
    }
    if "sentinel_password" in query:
        sentinel_options["password"] = query["sentinel_password"]
    if "sentinel_username" in query:
        sentinel_options["username"] = query["sentinel_username"]

    def make() -> redis.Redis:
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            sentinels, sentinel_kwargs=sentinel_options, **options
        )
        client: _SentinelRedis = sentinel.master_for(  # type: ignore[no-untyped-call]
            service, redis_class=_SentinelRedis, db=db, retry=_retry()
        )
        client.sentinel_clients = list(sentinel.sentinels)
        return client

    def make_async() -> redis.asyncio.Redis:
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            sentinels, sentinel_kwargs=sentinel_options, **options
        )
        client: _AsyncSentinelRedis = sentinel.master_for(
            service, redis_class=_AsyncSentinelRedis, db=db, retry=_aretry()
        )
        client.sentinel_clients = list(sentinel.sentinels)
        return client

    return make, make_async
