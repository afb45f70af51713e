"""``open_ledger``: URL parsing, options, and errors that name the value."""

from __future__ import annotations

import re

import pytest

from allowance import ConfigurationError
from allowance._ledger import (
    DEFAULT_LEDGER_URL,
    MemoryLedger,
    SQLiteLedger,
    open_ledger,
)
from allowance.testing.conformance import ManualClock
from allowance.typing import KeyState, ReserveItem


def _spend(ledger, key: str = "k", amount: int = 5) -> None:
    ledger.reserve(
        [[ReserveItem(key, amount, 100)]], reservation_id=f"r-{key}", lease_seconds=60
    )
    ledger.commit(f"r-{key}", {key: amount})


def _named(value: object) -> str:
    return re.escape(repr(value))


def test_default_url() -> None:
    assert DEFAULT_LEDGER_URL == "sqlite:///allowance.db"


def test_default_url_opens_allowance_db_in_the_working_directory(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ledger = open_ledger(DEFAULT_LEDGER_URL)
    try:
        assert isinstance(ledger, SQLiteLedger)
        assert (tmp_path / "allowance.db").is_file()
    finally:
        ledger.close()


# -- memory ----------------------------------------------------------------------


def test_memory_is_fresh_each_time() -> None:
    first, second = open_ledger("memory://"), open_ledger("memory://")
    assert isinstance(first, MemoryLedger)
    assert first is not second
    _spend(first)
    assert second.state(["k"])["k"] == KeyState()
    assert first.url == "memory://"


def test_named_memory_is_shared_within_the_process() -> None:
    name = "test-open-ledger-shared"
    first, again = open_ledger(f"memory://{name}"), open_ledger(f"memory://{name}")
    other = open_ledger(f"memory://{name}-other")
    assert first is again
    assert first is not other
    assert first.url == f"memory://{name}"
    first.reset()
    _spend(first)
    assert again.state(["k"])["k"] == KeyState(spent=5)


def test_memory_takes_a_clock() -> None:
    clock = ManualClock()
    ledger = open_ledger("memory://", clock=clock)
    ledger.reserve([[ReserveItem("k", 5, 100)]], reservation_id="r", lease_seconds=10)
    clock.advance(10)
    ledger.reserve([], reservation_id="reap", lease_seconds=10)
    assert ledger.state(["k"])["k"] == KeyState()


@pytest.mark.parametrize(
    "url",
    ["memory:///x", "memory://name/x", "memory://?x=1", "memory://a@b", "memory://#f"],
)
def test_memory_rejects_paths_and_queries(url: str) -> None:
    with pytest.raises(ConfigurationError, match=_named(url)) as caught:
        open_ledger(url)
    assert caught.value.value == url
    assert "memory://NAME" in str(caught.value)


# -- sqlite ----------------------------------------------------------------------


def test_sqlite_relative_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ledger = open_ledger("sqlite:///data/sub/ledger.db")
    try:
        assert isinstance(ledger, SQLiteLedger)
        assert (tmp_path / "data" / "sub" / "ledger.db").is_file()
        assert ledger.url == "sqlite:///data/sub/ledger.db"
        assert ledger.busy_timeout == 5.0
    finally:
        ledger.close()


def test_sqlite_absolute_path(tmp_path) -> None:
    path = tmp_path / "abs.db"
    assert str(path).startswith("/")
    ledger = open_ledger(f"sqlite:///{path}")
    try:
        assert isinstance(ledger, SQLiteLedger)
        assert ledger.path == path
        _spend(ledger)
    finally:
        ledger.close()
    again = open_ledger(f"sqlite:////{str(path).lstrip('/')}")
    try:
        assert again.state(["k"])["k"] == KeyState(spent=5)
    finally:
        again.close()


def test_sqlite_scheme_is_case_insensitive_and_path_is_unquoted(tmp_path) -> None:
    ledger = open_ledger(f"SQLite:///{tmp_path}/with%20space.db")
    try:
        assert (tmp_path / "with space.db").is_file()
    finally:
        ledger.close()


def test_sqlite_busy_timeout_from_query_and_option(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}?busy_timeout=2.5"
    ledger = open_ledger(url)
    try:
        assert isinstance(ledger, SQLiteLedger)
        assert ledger.busy_timeout == 2.5
        assert ledger.path == tmp_path / "q.db"
    finally:
        ledger.close()
    ledger = open_ledger(url, busy_timeout=0.25)
    try:
        assert isinstance(ledger, SQLiteLedger)
        assert ledger.busy_timeout == 0.25
    finally:
        ledger.close()


def test_sqlite_takes_a_clock(tmp_path) -> None:
    clock = ManualClock()
    ledger = open_ledger(f"sqlite:///{tmp_path / 'c.db'}", clock=clock)
    try:
        ledger.reserve(
            [[ReserveItem("k", 5, 100)]], reservation_id="r", lease_seconds=10
        )
        clock.advance(10)
        ledger.reserve([], reservation_id="reap", lease_seconds=10)
        assert ledger.state(["k"])["k"] == KeyState()
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///", "sqlite:///<relative path>"),
        ("sqlite://", "sqlite:///<relative path>"),
        ("sqlite://host/x.db", "sqlite:///<relative path>"),
        ("sqlite:///dir/", "sqlite:///<relative path>"),
        ("sqlite:///x.db#frag", "sqlite:///<relative path>"),
        ("sqlite:///:memory:", "use memory://"),
        ("sqlite:///x.db?busy_timeout=abc", "busy_timeout=<seconds>"),
        ("sqlite:///x.db?busy_timeout=-1", "busy_timeout=<seconds>"),
        ("sqlite:///x.db?busy_timeout=nan", "busy_timeout=<seconds>"),
        ("sqlite:///x.db?busy_timeout=", "busy_timeout=<seconds>"),
        ("sqlite:///x.db?timeout=3", "no other query"),
        ("sqlite:///x.db?busy_timeout=1&mode=ro", "no other query"),
        ("sqlite:///x.db?garbage", "no other query"),
        ("sqlite:///x%00.db", "without a NUL byte"),  # was a bare ValueError
    ],
)
def test_sqlite_rejects_malformed_urls(tmp_path, monkeypatch, url, expected) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=_named(url)) as caught:
        open_ledger(url)
    assert expected in caught.value.expected
    assert caught.value.value == url
    assert not (tmp_path / "x.db").exists()


def test_sqlite_rejects_a_directory(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match=_named(str(tmp_path))) as caught:
        open_ledger(f"sqlite:///{tmp_path}")
    assert "not a directory" in str(caught.value)


def test_sqlite_rejects_a_bad_busy_timeout_option(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="busy_timeout='soon'"):
        open_ledger(f"sqlite:///{tmp_path / 'x.db'}", busy_timeout="soon")


# -- other schemes and values ----------------------------------------------------------


# -- redis ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://localhost", "redis://localhost"),
        ("REDIS://cache:6380/3?prefix=team-a", "redis://cache:6380/3?prefix=team-a"),
        ("rediss://:s3cret@cache:6380/1", "rediss://:***@cache:6380/1"),
        ("redis://bob:s3cret@cache/2?socket_timeout=0.5", "redis://bob:***@cache/2"),
        (
            "redis+sentinel://:pw@s1:26379,s2/mymaster/2?sentinel_password=x",
            "redis+sentinel://:***@s1:26379,s2/mymaster/2?sentinel_password=***",
        ),
    ],
)
def test_redis_urls_open_lazily_and_hide_passwords(url: str, shown: str) -> None:
    from allowance._ledger._redis import RedisLedger

    ledger = open_ledger(url)  # nothing listens there: opening does not connect
    try:
        assert isinstance(ledger, RedisLedger)
        assert ledger.url.startswith(shown.partition("?")[0])
        assert "s3cret" not in ledger.url
        assert "s3cret" not in repr(ledger)
    finally:
        ledger.close()


def test_redis_prefix_and_options() -> None:
    ledger = open_ledger("redis://h/0?prefix=a", prefix="b", max_calls=10)
    assert ledger.prefix == "b"  # type: ignore[attr-defined]
    assert ledger._keys[0] == b"{b}:spent"  # type: ignore[attr-defined]
    assert ledger._max_calls == "10"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://", "redis://[[user]:password@]host"),
        ("redis://host:99999/0", "redis://[[user]:password@]host"),
        ("redis://host:port/0", "redis://[[user]:password@]host"),
        ("redis://host/zero", "redis://[[user]:password@]host"),
        ("redis://host/0/1", "redis://[[user]:password@]host"),
        ("redis://host/0#frag", "redis://[[user]:password@]host"),
        ("redis://host/0?nope=1", "query options: client_name"),
        ("redis://host/0?prefix=a&prefix=b", "each once"),
        ("redis://host/0?max_calls=0", "max_calls=<an int > 0>"),
        ("redis://host/0?max_calls=many", "max_calls=<an int > 0>"),
        ("redis://host/0?socket_timeout=-1", "socket_timeout=<seconds >= 0>"),
        ("redis://host/0?socket_timeout=inf", "socket_timeout=<seconds >= 0>"),
        ("redis://host/0?max_connections=0", "an int from 1 to 10,000"),
        # A pool fills a slot per connection when built: 10**20 took minutes
        # and gigabytes inside open_ledger() before it raised nothing.
        ("redis://host/0?max_connections=10001", "an int from 1 to 10,000"),
        ("redis://host/0?max_connections=" + "9" * 20, "an int from 1 to 10,000"),
        ("redis://[::1/0", "redis://[[user]:password@]host"),  # was a ValueError
        ("redis+sentinel://s1:26379", "redis+sentinel://"),
        ("redis+sentinel://s1:26379/", "redis+sentinel://"),
        ("redis+sentinel://s1:26379/svc/x", "redis+sentinel://"),
        ("redis+sentinel://s1:0/svc", "redis+sentinel://"),
        ("redis+sentinel://s1,:1/svc", "redis+sentinel://"),
    ],
)
def test_redis_rejects_malformed_urls(url: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match=_named(url)) as caught:
        open_ledger(url)
    assert expected in caught.value.expected
    assert caught.value.value == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:99999/0", "redis://:***@127.0.0.1:99999/0"),
        ("redis://user:hunter2@h/0?bogus=1", "redis://user:***@h/0?bogus=1"),
        ("redis://:hunter2@h/0?max_calls=0", "redis://:***@h/0?max_calls=0"),
        ("redis://:hunter2@h/0?socket_timeout=-1", "redis://:***@h/0?socket_timeout"),
        ("redis+sentinel://:hunter2@h1/svc/0/9", "redis+sentinel://:***@h1/svc/0/9"),
        (
            "redis+sentinel://h1/svc?sentinel_password=hunter2&nope=1",
            "redis+sentinel://h1/svc?sentinel_password=***&nope=1",
        ),
        ("redis://h/0?sentinel_password=hunter2", "redis://h/0?sentinel_password=***"),
        ("redis://u:hunter2@[::1/0", "redis://***@[::1/0"),  # urlsplit fails
        (
            "redis+sentinel://[::1/svc?sentinel_password=hunter2",
            "redis+sentinel://[::1/svc?sentinel_password=***",
        ),
    ],
)
def test_a_malformed_redis_url_is_named_without_its_password(
    url: str, shown: str
) -> None:
    # The README: passwords are shown as ***. A malformed URL was named whole.
    with pytest.raises(ConfigurationError) as caught:
        open_ledger(url)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(caught.value.value)
    assert str(caught.value.value).startswith(shown)


@pytest.mark.parametrize("prefix", ["", "a{b", "c}"])
def test_redis_rejects_a_bad_prefix(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="ledger prefix"):
        open_ledger("redis://h/0", prefix=prefix)


def test_redis_rejects_unknown_options() -> None:
    with pytest.raises(
        ConfigurationError, match="ledger option='busy_timeout'"
    ) as caught:
        open_ledger("redis://h/0", busy_timeout=1)
    assert "clock, max_calls, prefix" in str(caught.value)
    with pytest.raises(ConfigurationError, match="clock"):
        open_ledger("redis://h/0", clock="now")


def test_redis_without_redis_py_names_the_extra(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)  # import redis fails
    monkeypatch.delitem(sys.modules, "allowance._ledger._redis", raising=False)
    url = "redis://localhost:6379/0"
    with pytest.raises(ConfigurationError, match=_named(url)) as caught:
        open_ledger(url)
    assert "pip install 'allowance[redis]'" in str(caught.value)
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize(
    "url",
    ["", "allowance.db", "postgres://db/x", "sqlite3:///x.db", "memory:/x", "://x"],
)
def test_unknown_schemes_name_the_value(url: str) -> None:
    with pytest.raises(ConfigurationError, match=_named(url)) as caught:
        open_ledger(url)
    assert caught.value.value == url
    assert "memory://, sqlite:///<path> or redis://host:port/db" in str(caught.value)


def test_not_a_url_or_ledger() -> None:
    with pytest.raises(ConfigurationError, match="ledger=42: expected"):
        open_ledger(42)  # type: ignore[arg-type]


def test_a_ledger_passes_through() -> None:
    ledger = MemoryLedger()
    assert open_ledger(ledger) is ledger


def test_a_ledger_takes_no_options() -> None:
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        open_ledger(MemoryLedger(), busy_timeout=1)


@pytest.mark.parametrize("url", ["memory://", "memory://named-opts"])
def test_unknown_options_are_named(url: str) -> None:
    with pytest.raises(ConfigurationError, match="ledger option='busy_timeout'"):
        open_ledger(url, busy_timeout=1)


def test_unknown_sqlite_option_is_named(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="ledger option='timeout'") as caught:
        open_ledger(f"sqlite:///{tmp_path / 'x.db'}", timeout=1)
    assert "busy_timeout, write_behind, clock" in str(caught.value)


def test_clock_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match=_named(12.0)):
        open_ledger("memory://", clock=12.0)
