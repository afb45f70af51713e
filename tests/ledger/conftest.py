"""Fixtures of the ledger tests: a redis-server of their own, per session.

And what the fast-lane tests share: their keys, and a call record.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid

import pytest

from allowance.testing import RedisServer
from allowance.typing import CallRecord, Usage

KEYS = ("tokens:session=a", "usd:session=a", "usd:tenant=t")


def call_record(call_id: str) -> CallRecord:
    """A call's log line, for ``settle``/``commit`` (the same for every id)."""
    return CallRecord(
        call_id=call_id,
        ts=0.0,
        scope={"session": "a"},
        provider="openai",
        model="m",
        requested_model="m",
        usage=Usage(1, 1),
        cost_micros=1,
        adapters=(),
        outcome="ok",
    )


NO_REDIS = "no redis-server binary on PATH (apt-get install redis-server)"


@pytest.fixture(scope="session")
def redis_server():
    """A redis-server on a free 127.0.0.1 port, shared by the session's tests."""
    if not RedisServer.available():
        pytest.skip(NO_REDIS)
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """The shared server's URL with a fresh namespace: an empty ledger."""
    return f"{redis_server.url}?prefix=t-{uuid.uuid4().hex}"


@pytest.fixture
def own_redis():
    """A redis-server for one test alone (the fault tests stop and kill it)."""
    if not RedisServer.available():
        pytest.skip(NO_REDIS)
    with RedisServer() as server:
        yield server


class ReplyDropper:
    """A TCP proxy to Redis that, when armed, swallows one reply and hangs up.

    The command reached Redis and ran; the client sees a broken connection
    and retries it: the second run must change nothing. With ``stay_down``,
    the proxy then refuses every connection until ``answer()`` (so the
    client's own retries fail too): a reply lost, then Redis gone a while.
    """

    def __init__(self, port: int, *, stay_down: bool = False) -> None:
        self.target = ("127.0.0.1", port)
        self.armed: bytes | None = None
        self.dropped = 0
        self.stay_down = stay_down
        self.down = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.05)
        self._stopped = threading.Event()
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def arm(self, marker: bytes) -> None:
        self.armed = marker

    def answer(self) -> None:
        """Accept connections again (after a drop with ``stay_down``)."""
        self.down.clear()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.down.is_set():
                client.close()  # Redis "unreachable"
                continue
            client.settimeout(None)
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            state = {"drop": False}
            threading.Thread(
                target=self._pump, args=(client, upstream, state, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, state, False), daemon=True
            ).start()

    def _pump(self, source, sink, state, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.armed is not None and self.armed in data:
                    self.armed = None
                    state["drop"] = True
                elif not from_client and state["drop"]:
                    self.dropped += 1
                    if self.stay_down:
                        self.down.set()
                    break  # the reply is lost: hang up on the client
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
