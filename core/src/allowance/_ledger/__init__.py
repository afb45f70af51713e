"""Ledger backends and ``open_ledger``, which picks one from a URL.

| URL | backend |
|---|---|
| ``memory://`` | a fresh in-process ledger (``MemoryLedger``) |
| ``memory://NAME`` | the in-process ledger called NAME, shared within the process |
| ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` | ``SQLiteLedger`` |
| ``redis://[[user]:password@]host[:port][/db]`` | ``RedisLedger`` |
| ``rediss://...`` | ``RedisLedger`` over TLS |
| ``redis+sentinel://[[user]:pw@]host[:port][,host...]/service[/db]`` | Sentinel |

A Sentinel URL lists the Sentinels (port 26379 unless given) and names the
service whose master holds the ledger.

``sqlite`` URLs follow SQLAlchemy: three slashes then the path, so an absolute
path gives four. They accept ``?busy_timeout=SECONDS`` and
``write_behind=SECONDS``: more than 0 (at most 1) opens a
``WriteBehindLedger``, which admits and charges most calls in memory and
writes them every that many seconds (what a killed process can lose; see
``_write_behind``).

``redis`` URLs need redis-py (``pip install 'allowance[redis]'``). They accept
``?prefix=NAME`` (the namespace: every Redis key is ``{NAME}:...``, default
``allowance``), ``max_calls=N`` (the call log's size), and redis-py's
``socket_timeout``, ``socket_connect_timeout``, ``health_check_interval``,
``max_connections``, ``client_name`` and TLS options (``ssl_cert_reqs``,
``ssl_ca_certs``, ...); Sentinel URLs also ``sentinel_password``. See
``_redis`` for the key layout.
"""

from __future__ import annotations

import importlib
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from allowance._errors import ConfigurationError
from allowance._ledger._memory import MemoryLedger
from allowance._ledger._sqlite import SQLiteLedger
from allowance._ledger._write_behind import MAX_WRITE_BEHIND, WriteBehindLedger
from allowance.typing import Ledger

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

__all__ = [
    "DEFAULT_LEDGER_URL",
    "MemoryLedger",
    "SQLiteLedger",
    "WriteBehindLedger",
    "open_ledger",
    "sqlite_file",
    "sqlite_url",
]

DEFAULT_LEDGER_URL: Final = "sqlite:///allowance.db"
"""Where spend is kept unless told otherwise: ``allowance.db`` in the working
directory, shared by every process started there."""

_EXPECTED: Final = "memory://, sqlite:///<path> or redis://host:port/db"
_MAX_BUSY_TIMEOUT: Final = 86_400.0

_named: dict[str, MemoryLedger] = {}
_named_lock = threading.Lock()


def open_ledger(url_or_ledger: str | Ledger, **options: Any) -> Ledger:
    """Return the ledger a URL names; a ledger object is returned as is.

    Args:
        url_or_ledger: A ledger URL (see the module docstring) or an object
            implementing ``allowance.typing.Ledger``.
        **options: Backend options, overriding the URL's query: ``clock`` (a
            callable returning Unix time, for tests) for every backend, and
            ``busy_timeout`` and ``write_behind`` (seconds) for SQLite, ``prefix`` and
            ``max_calls`` for Redis (whose leases use the server's clock
            unless a ``clock`` is given). A named memory ledger takes them
            when it is first opened.

    Returns:
        The ledger.

    Raises:
        ConfigurationError: The URL is malformed, its scheme unknown, its
            backend unavailable, or an option is not one the backend takes.
        LedgerUnavailableError: The backend cannot be opened (an unwritable
            directory, a file that is not a SQLite database, ...).

    Example:
        >>> ledger = open_ledger("memory://")
        >>> ledger.claim("first-run")
        True
    """
    if not isinstance(url_or_ledger, str):
        if isinstance(url_or_ledger, Ledger):
            if options:
                what, expected = "ledger options", "none (they only apply to a URL)"
                raise ConfigurationError(what, sorted(options), expected)
            return url_or_ledger
        raise _bad_url(url_or_ledger, _EXPECTED)
    url = url_or_ledger.strip()
    scheme, separator, _ = url.partition("://")
    opener = _OPENERS.get(scheme.lower()) if separator else None
    if opener is None:
        raise _bad_url(url_or_ledger, _EXPECTED)
    return opener(url, options)


def _open_memory(url: str, options: dict[str, Any]) -> Ledger:
    parts = urlsplit(url)
    if parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        expected = "memory:// or memory://NAME (a name, no path or query)"
        raise _bad_url(url, expected)
    clock = _pop_clock(options)
    _no_more(options, url, "clock")
    name = parts.netloc
    if not name:
        return MemoryLedger(clock, url="memory://")
    with _named_lock:
        ledger = _named.get(name)
        if ledger is None:
            ledger = _named[name] = MemoryLedger(clock, url=f"memory://{name}")
        return ledger


def sqlite_file(url: str) -> str | None:
    """Return the file a ``sqlite://`` URL names; None for another scheme.

    Raises:
        ConfigurationError: A malformed ``sqlite://`` URL, as ``open_ledger``.
    """
    url = url.strip()
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.lower() != "sqlite":
        return None
    return _parse_sqlite(url)[0]


def absolute_url(url: str) -> str:
    """``url`` with a relative ``sqlite://`` path made absolute (here and now).

    A relative path is opened relative to the working directory when a guard
    first uses it: a process that starts in, or moves to, another directory
    would count on another file. Other URLs are returned unchanged.

    Raises:
        ConfigurationError: A malformed ``sqlite://`` URL, as ``open_ledger``.
    """
    path = sqlite_file(url)
    if path is None or Path(path).is_absolute():
        return url
    query = url.strip().partition("://")[2].partition("?")[2]
    return sqlite_url(path) + (f"?{query}" if query else "")


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The ``sqlite://`` URL of a file: its absolute path, ``#?%`` escaped."""
    return "sqlite:///" + quote(str(Path(path).absolute()), safe="/")


def _open_sqlite(url: str, options: dict[str, Any]) -> Ledger:
    path, seconds = _parse_sqlite(url)
    busy_timeout = options.pop("busy_timeout", seconds["busy_timeout"])
    write_behind = options.pop("write_behind", seconds["write_behind"])
    clock = _pop_clock(options)
    _no_more(options, url, "busy_timeout, write_behind, clock")
    if write_behind == 0:
        return SQLiteLedger(path, busy_timeout=busy_timeout, clock=clock, url=url)
    return WriteBehindLedger(
        path,
        write_behind=write_behind,
        busy_timeout=busy_timeout,
        clock=clock,
        url=url,
    )


def _parse_sqlite(url: str) -> tuple[str, dict[str, float]]:
    """The file path of a ``sqlite://`` URL, and its query's seconds."""
    expected = "sqlite:///<relative path> or sqlite:////<absolute path>"
    rest = url.partition("://")[2]
    if not rest.startswith("/"):
        # "sqlite://host/x.db": SQLite has no host.
        raise _bad_url(url, expected)
    rest, _, fragment = rest[1:].partition("#")
    raw_path, _, query = rest.partition("?")
    path = unquote(raw_path)
    if "\x00" in path:  # "%00": no file name holds one
        raise _bad_url(url, f"{expected}, without a NUL byte")
    if fragment or not path or path.endswith("/") or path == ":memory:":
        if path == ":memory:":
            expected = "a file path (use memory:// for an in-process ledger)"
        raise _bad_url(url, expected)
    seconds = {"busy_timeout": 5.0, "write_behind": 0.0}
    most = {"busy_timeout": _MAX_BUSY_TIMEOUT, "write_behind": MAX_WRITE_BEHIND}
    only = (
        "sqlite:///<path>?busy_timeout=<seconds>&write_behind=<seconds>"
        " (no other query)"
    )
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as err:
        raise _bad_url(url, only) from err
    for name, value in pairs:
        if name not in seconds:
            raise _bad_url(url, only)
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not 0 <= number <= most[name]:  # also rejects nan
            raise _bad_url(url, f"{name}=<seconds>, a number from 0 to {most[name]:g}")
        seconds[name] = number
    return path, seconds


def _open_redis(url: str, options: dict[str, Any]) -> Ledger:
    try:
        module = importlib.import_module("allowance._ledger._redis")
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("redis"):
            raise
        expected = (
            "memory:// or sqlite:///<path> (the Redis ledger needs redis-py,"
            " which is not installed: pip install 'allowance[redis]')"
        )
        raise _bad_url(url, expected) from err
    ledger: Ledger = module.open_redis_ledger(url, **options)
    return ledger


_OPENERS: Final[dict[str, Callable[[str, dict[str, Any]], Ledger]]] = {
    "memory": _open_memory,
    "sqlite": _open_sqlite,
    "redis": _open_redis,
    "rediss": _open_redis,
    "redis+sentinel": _open_redis,
}


def _pop_clock(options: dict[str, Any]) -> Callable[[], float]:
    clock = options.pop("clock", time.time)
    if not callable(clock):
        what, expected = "clock", "a callable returning Unix time"
        raise ConfigurationError(what, clock, expected)
    return clock  # type: ignore[no-any-return]


def _no_more(options: dict[str, Any], url: str, accepted: str) -> None:
    if options:
        what = "ledger option"
        expected = f"one of the options {url.partition(':')[0]} takes: {accepted}"
        raise ConfigurationError(what, min(options), expected)


def _bad_url(url: object, expected: str) -> ConfigurationError:
    return ConfigurationError("ledger", url, expected)
