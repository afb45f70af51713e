"""Fixtures of the ledger tests: a redis-server of their own, per session."""

from __future__ import annotations

import uuid

import pytest

from allowance.testing import RedisServer

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
