"""The Redis ledger under faults, on a real redis-server of the test's own.

Killed workers, Redis gone and back, replies lost on the wire: the budget
holds, nothing is charged twice, nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid

import openai
import pytest
from tests.ledger.conftest import ReplyDropper

import allowance
from allowance import LedgerUnavailableError
from allowance._ledger import open_ledger
from allowance.testing import FakeProvider
from allowance.typing import KeyState, ReserveItem

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def fake():
    with FakeProvider() as fake:
        yield fake


def _client(fake: FakeProvider, ledger: str, **options) -> openai.OpenAI:
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0)
    return allowance.wrap(client, budget="$1", ledger=ledger, session="s", **options)


def _aclient(fake: FakeProvider, ledger: str, **options) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(
        base_url=fake.openai_base_url, api_key="x", max_retries=0
    )
    return allowance.wrap(client, budget="$1", ledger=ledger, session="s", **options)


def _ask(client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
    )


def _url(server) -> str:
    return f"{server.url}?prefix=t-{uuid.uuid4().hex}&socket_timeout=2"


# -- Redis unreachable or restarted -------------------------------------------------


def test_unreachable_server_raises_a_typed_error_without_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    ledger = open_ledger(f"redis://:s3cret@127.0.0.1:{port}/0")
    try:
        with pytest.raises(LedgerUnavailableError) as caught:
            ledger.reserve(
                [[ReserveItem("k", 1, 10)]], reservation_id="r", lease_seconds=60
            )
        message = str(caught.value)
        assert f"127.0.0.1:{port}" in message
        assert "unreachable" in message
        assert "s3cret" not in message
        with pytest.raises(LedgerUnavailableError):
            ledger.commit("r", {"k": 1})
        with pytest.raises(LedgerUnavailableError):
            ledger.calls()
    finally:
        ledger.close()


async def test_unreachable_server_fails_the_async_twins_too() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ledger = open_ledger(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(LedgerUnavailableError, match="unreachable"):
            await ledger.areserve(
                [[ReserveItem("k", 1, 10)]], reservation_id="r", lease_seconds=60
            )
        with pytest.raises(LedgerUnavailableError):
            await ledger.aclaim("m")
    finally:
        await ledger.aclose()


def test_wrong_password_is_a_typed_error(own_redis) -> None:
    own_redis.command("CONFIG", "SET", "requirepass", "right")
    try:
        wrong = open_ledger(f"redis://:wrong@127.0.0.1:{own_redis.port}/0")
        with pytest.raises(LedgerUnavailableError) as caught:
            wrong.state(["k"])
        assert "wrong" not in str(caught.value).replace("WRONGPASS", "")
        wrong.close()
        right = open_ledger(f"redis://:right@127.0.0.1:{own_redis.port}/0")
        assert right.claim("m")
        right.close()
    finally:
        with contextlib.suppress(Exception):
            own_redis.kill()


def test_fail_closed_sends_nothing_while_redis_is_down(own_redis, fake) -> None:
    client = _client(fake, _url(own_redis))
    _ask(client)
    assert fake.generation_count == 1
    own_redis.stop(save=True)
    for _ in range(3):
        with pytest.raises(LedgerUnavailableError):
            _ask(client)
    assert fake.generation_count == 1  # nothing reached the provider
    own_redis.start()
    _ask(client)
    assert fake.generation_count == 2
    client.allowance.guard.close()


async def test_fail_closed_async_sends_nothing_while_redis_is_down(
    own_redis, fake
) -> None:
    client = _aclient(fake, _url(own_redis))
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
    )
    own_redis.kill()
    with pytest.raises(LedgerUnavailableError):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
        )
    assert fake.generation_count == 1
    await client.close()


def test_fail_open_lets_calls_through_and_replays_their_charges(
    own_redis, fake, caplog
) -> None:
    """Redis restarted mid-run: the calls made meanwhile are charged once back."""
    url = _url(own_redis)
    client = _client(fake, url, fail="open")
    guard = client.allowance.guard
    _ask(client)
    [status] = guard.status()
    one_call = status.spent
    assert one_call > 0
    own_redis.stop(save=True)
    with caplog.at_level(logging.ERROR, logger="allowance"):
        for _ in range(3):
            _ask(client)  # let through
    assert fake.generation_count == 4
    assert len(guard._pending) == 3
    assert any(
        "failed on reserve" in r.message and "let through" in r.message
        for r in caplog.records
    )
    assert any("held in memory" in r.message for r in caplog.records)
    own_redis.start()  # the dump brings the first call's spend back
    _ask(client)  # writes the three held charges first
    assert not guard._pending
    assert guard.status()[0].spent == 5 * one_call
    assert guard.status()[0].reserved == 0
    ledger = open_ledger(url)
    try:
        calls = ledger.calls()
        assert len(calls) == 5
        assert len({c.call_id for c in calls}) == 5
    finally:
        ledger.close()
    guard.close()


async def test_fail_open_async_replays_on_close(own_redis, fake) -> None:
    url = _url(own_redis)
    client = _aclient(fake, url, fail="open")
    guard = client.allowance.guard
    own_redis.stop()
    for _ in range(2):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
        )
    assert len(guard._pending) == 2
    own_redis.start()  # empty: nothing was saved
    guard.close()  # writes what it held
    assert not guard._pending
    ledger = open_ledger(url)
    try:
        assert len(ledger.calls()) == 2
        assert sum(s.spent for s in ledger.keys().values()) > 0
    finally:
        ledger.close()
    await client.close()


def test_fail_open_buffer_is_bounded_and_loses_nothing(
    own_redis, fake, monkeypatch
) -> None:
    from allowance import _guard

    monkeypatch.setattr(_guard, "_BUFFER_LIMIT", 3)
    url = _url(own_redis)
    client = _client(fake, url, fail="open")
    guard = client.allowance.guard
    own_redis.stop()
    for _ in range(3):
        _ask(client)
    assert len(guard._pending) == 3
    with pytest.raises(LedgerUnavailableError, match="held in memory") as caught:
        _ask(client)  # the buffer is full: refused before sending
    assert caught.value.fail_open
    assert fake.generation_count == 3
    own_redis.start()
    _ask(client)
    assert not guard._pending
    ledger = open_ledger(url)
    try:
        assert len(ledger.calls()) == 4
    finally:
        ledger.close()
    guard.close()


# -- a reply lost on the wire: redis-py sends the script again ----------------------


@pytest.fixture
def dropper(redis_server):
    proxy = ReplyDropper(redis_server.port)
    yield proxy
    proxy.close()


def test_a_commit_that_reaches_redis_twice_is_charged_once(dropper) -> None:
    url = f"redis://127.0.0.1:{dropper.port}/0?prefix=t-{uuid.uuid4().hex}"
    ledger = open_ledger(url)
    try:
        ledger.reserve(
            [[ReserveItem("k", 10, 100)]], reservation_id="warm", lease_seconds=60
        )
        ledger.commit("warm", {"k": 1})  # scripts loaded, connection open
        ledger.reserve(
            [[ReserveItem("k", 10, 100)]], reservation_id="r", lease_seconds=60
        )
        dropper.arm(b"EVALSHA")
        ledger.commit("r", {"k": 7})  # ran, reply lost, sent again: no error
        assert dropper.dropped == 1
        assert ledger.state(["k"])["k"] == KeyState(spent=8, reserved=0)
    finally:
        ledger.close()


def test_a_reserve_that_reaches_redis_twice_holds_once(dropper) -> None:
    url = f"redis://127.0.0.1:{dropper.port}/0?prefix=t-{uuid.uuid4().hex}"
    ledger = open_ledger(url)
    try:
        ledger.state(["k"])  # connection open
        ledger.reserve(
            [[ReserveItem("k", 1, 100)]], reservation_id="w", lease_seconds=60
        )
        dropper.arm(b"EVALSHA")
        result = ledger.reserve(
            [[ReserveItem("k", 60, 100)]], reservation_id="r", lease_seconds=60
        )
        assert dropper.dropped == 1
        # The retry recognised its own hold (no "id already known"), and
        # reports the state before it.
        assert result.plan == 0
        assert result.before["k"] == KeyState(0, 1)
        assert ledger.state(["k"])["k"] == KeyState(0, 61)
        ledger.commit("r", {"k": 50})
        assert ledger.state(["k"])["k"] == KeyState(50, 1)
    finally:
        ledger.close()


async def test_an_async_commit_that_reaches_redis_twice_is_charged_once(
    dropper,
) -> None:
    url = f"redis://127.0.0.1:{dropper.port}/0?prefix=t-{uuid.uuid4().hex}"
    ledger = open_ledger(url)
    try:
        await ledger.areserve(
            [[ReserveItem("k", 10, 100)]], reservation_id="r", lease_seconds=60
        )
        dropper.arm(b"EVALSHA")
        await ledger.acommit("r", {"k": 7})
        assert dropper.dropped == 1
        assert await ledger.astate(["k"]) == {"k": KeyState(spent=7, reserved=0)}
    finally:
        await ledger.aclose()


# -- the server's clock, and scripts flushed from the server ----------------------------


def test_scripts_are_loaded_again_after_script_flush(redis_server, redis_url) -> None:
    ledger = open_ledger(redis_url)
    try:
        ledger.reserve([[ReserveItem("k", 1, 9)]], reservation_id="a", lease_seconds=60)
        redis_server.command("SCRIPT", "FLUSH")  # as after a failover or restart
        ledger.commit("a", {"k": 1})

        async def main() -> None:
            await ledger.areserve(
                [[ReserveItem("k", 1, 9)]], reservation_id="b", lease_seconds=60
            )
            redis_server.command("SCRIPT", "FLUSH")
            await ledger.acommit("b", {"k": 2})

        asyncio.run(main())
        assert ledger.state(["k"])["k"] == KeyState(spent=3, reserved=0)
    finally:
        ledger.close()


def test_leases_use_the_server_clock_not_the_clients(redis_url) -> None:
    """Without a clock option, a client whose clock is a day off changes nothing."""
    ledger = open_ledger(redis_url)
    try:
        ledger.reserve([[ReserveItem("k", 5, 9)]], reservation_id="a", lease_seconds=60)
        skewed = open_ledger(redis_url.replace("t-", "t-", 1))
        result = skewed.reserve([], reservation_id="tick", lease_seconds=60)
        assert result.before == {}
        assert skewed.state(["k"])["k"] == KeyState(0, 5)
        skewed.close()
    finally:
        ledger.close()


def test_call_log_is_capped(redis_url) -> None:
    from allowance.testing._ledger_conformance import _record

    ledger = open_ledger(redis_url, max_calls=3)
    try:
        for i in range(5):
            ledger.record(_record(f"c{i}", float(i)))
        assert [c.call_id for c in ledger.calls()] == ["c2", "c3", "c4"]
    finally:
        ledger.close()


# -- Sentinel -----------------------------------------------------------------------


@pytest.fixture
def sentinel(redis_server, tmp_path):
    """A real Sentinel (``redis-server --sentinel``) watching the session's server."""
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor ledger 127.0.0.1 {redis_server.port} 1\n"
    )
    process = subprocess.Popen(
        [redis_server.binary, str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=1) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    break
            time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


def test_sentinel_url_finds_the_master(sentinel) -> None:
    prefix = f"t-{uuid.uuid4().hex}"
    url = f"redis+sentinel://127.0.0.1:{sentinel},127.0.0.1:1/ledger/0?prefix={prefix}"
    ledger = open_ledger(url)
    try:
        ledger.reserve([[ReserveItem("k", 5, 9)]], reservation_id="a", lease_seconds=60)
        ledger.commit("a", {"k": 4})

        async def main() -> None:
            await ledger.areserve(
                [[ReserveItem("k", 5, 9)]], reservation_id="b", lease_seconds=60
            )
            await ledger.acommit("b", {"k": 5})

        asyncio.run(main())
        assert ledger.state(["k"])["k"] == KeyState(spent=9, reserved=0)
    finally:
        ledger.close()
