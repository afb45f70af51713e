"""README, "Key layout" and "How it works": the Redis keys a real call leaves.

A real OpenAI SDK client, guarded on a Redis ledger with the default namespace,
calls the fake provider on 127.0.0.1; the test then reads the redis-server of
its own with ``redis-cli``-like commands (redis-py) and checks the README's
table: every key of the ledger starts with ``{allowance}:``, each has the type
the table gives, and a held reservation's lease ends 10 minutes after it was
taken, measured on the server's clock.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

import allowance
from allowance import Budget, Guard, Policy, Threshold
from allowance.testing import FakeProvider

MESSAGES: Any = [{"role": "user", "content": "Say hello."}]

# README, "Key layout": key -> Redis type.
KEY_LAYOUT = {
    "{allowance}:spent": "hash",
    "{allowance}:reserved": "hash",
    "{allowance}:names": "zset",
    "{allowance}:res": "hash",
    "{allowance}:leases": "zset",
    "{allowance}:settled": "zset",
    "{allowance}:markers": "zset",
    "{allowance}:calls": "zset",
    "{allowance}:seq": "string",
}


@pytest.fixture
def fake():
    with FakeProvider() as fake:
        yield fake


def _server_now(client: Any) -> float:
    seconds, micros = client.time()
    return float(seconds + micros / 1_000_000)


def test_a_real_call_leaves_exactly_the_documented_keys(own_redis, fake) -> None:
    """Default namespace ``allowance``: the nine keys of the table, and no other."""
    guard = Guard(
        Policy([Budget("$1", per="tenant", thresholds=[Threshold(0.000001, "warn")])]),
        ledger=own_redis.url,  # no ?prefix=: the default namespace
    )
    client = openai_client(fake, guard)
    server: Any = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        with allowance.scope(tenant="acme"):
            ask(client)
            with pytest.warns(allowance.BudgetThresholdWarning):
                ask(client)  # crosses the warn threshold: a marker
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=16, stream=True
            )
            next(iter(stream))  # the call is in flight: its hold and lease live
            keys = set(server.keys("*"))
            assert keys == set(KEY_LAYOUT), sorted(keys)
            for key, kind in KEY_LAYOUT.items():
                assert server.type(key) == kind, key
            assert "usd:tenant=acme" in server.hkeys("{allowance}:spent")
            assert int(server.hget("{allowance}:reserved", "usd:tenant=acme")) > 0
            assert "usd:tenant=acme" in server.zrange("{allowance}:names", 0, -1)
            assert server.zcard("{allowance}:leases") == 1
            assert server.zcard("{allowance}:settled") == 2
            assert server.zcard("{allowance}:markers") == 1
            assert server.zcard("{allowance}:calls") == 2
            stream.close()
        assert int(server.hget("{allowance}:reserved", "usd:tenant=acme")) == 0
        assert server.zcard("{allowance}:leases") == 0
        assert server.zcard("{allowance}:calls") == 3
    finally:
        server.close()
        client.close()
        guard.close()


def test_a_held_reservation_leases_ten_minutes_on_the_server_clock(
    own_redis, fake
) -> None:
    """``lease_seconds`` is 10 minutes by default: the lease ends at TIME + 600."""
    guard = Guard(budget="$1", ledger=own_redis.url)
    client = openai_client(fake, guard)
    server: Any = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        before = _server_now(server)
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=16, stream=True
        )
        next(iter(stream))
        after = _server_now(server)
        [(_, ends)] = server.zrange("{allowance}:leases", 0, -1, withscores=True)
        assert before + 600 - 0.01 <= ends <= after + 600 + 0.01
        stream.close()
    finally:
        server.close()
        client.close()
        guard.close()


def openai_client(fake: FakeProvider, guard: Guard):
    import openai

    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="test", max_retries=0)
    return allowance.wrap(client, guard=guard)


def ask(client) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
    )
