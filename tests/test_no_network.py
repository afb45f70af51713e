"""Canary: the test run cannot reach beyond loopback (pytest-socket)."""

from __future__ import annotations

import http.client
import socket

import pytest
from pytest_socket import SocketConnectBlockedError

from allowance.testing import FakeProvider


def test_non_loopback_connections_are_blocked() -> None:
    with (
        pytest.warns(UserWarning, match="192.0.2.1"),
        pytest.raises(SocketConnectBlockedError),
    ):
        socket.create_connection(("192.0.2.1", 443), timeout=0.1)


def test_loopback_is_allowed(fake_provider: FakeProvider) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fake_provider.port, timeout=5)
    try:
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
