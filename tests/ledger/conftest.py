"""Fixtures of the ledger tests: a redis-server of their own, per session.

And what the fast-lane tests share: their keys, and a call record.
"""

from __future__ import annotations

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
