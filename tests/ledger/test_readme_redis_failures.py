"""README, "When Redis goes away" and "URLs", on a real redis-server.

- ``fail="closed"``: "If the reserve ran and only its reply was lost, its hold
  is released once Redis answers again (the next call), not kept until its
  lease ends." The reply is lost for real: a TCP proxy between the client and
  Redis swallows the reserve script's reply, then refuses connections (so
  redis-py's own retries fail too) until the test lets Redis answer again.
- ``fail="open"``: "the error is logged loudly (logger ``allowance``, level
  ERROR)", and "Passwords never appear in logs or ``repr``".
"""

from __future__ import annotations

import logging
import socket
import uuid
from typing import Any

import openai
import pytest
from tests.ledger.conftest import ReplyDropper

import allowance
from allowance import LedgerUnavailableError, open_ledger
from allowance.testing import FakeProvider, FakeUsage

MESSAGES: Any = [{"role": "user", "content": "Say hello."}]
KEY = "tokens:session=s"


@pytest.fixture
def proxy(redis_server):
    losing = ReplyDropper(redis_server.port, stay_down=True)
    yield losing
    losing.close()


@pytest.fixture
def fake():
    with FakeProvider(usage=FakeUsage(input_tokens=10, output_tokens=100)) as fake:
        yield fake


def _ask(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)


def test_a_lost_reserve_reply_gives_its_hold_back_on_the_next_call(
    proxy: ReplyDropper, fake: FakeProvider
) -> None:
    """A budget of 300 tokens; a call holds 117 and is charged 110.

    If the lost reserve's hold stayed until its lease ends, the third call
    (110 spent + 117 held + 117 asked > 300) would be refused.
    """
    prefix = f"t-{uuid.uuid4().hex}"
    url = f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}&socket_timeout=2"
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0)
    allowance.wrap(client, budget=300, ledger=url, session="s")
    direct = open_ledger(f"redis://127.0.0.1:{proxy.target[1]}/0?prefix={prefix}")
    try:
        _ask(client)  # scripts loaded, 110 spent
        proxy.arm(b"EVALSHA")
        with pytest.raises(LedgerUnavailableError):
            _ask(client)
        assert proxy.dropped == 1
        assert fake.generation_count == 1  # nothing sent
        state = direct.state([KEY])[KEY]
        assert (state.spent, state.reserved) == (110, 117)  # the reserve ran
        proxy.answer()
        _ask(client)  # the lost hold is released before this call reserves
        assert fake.generation_count == 2
        state = direct.state([KEY])[KEY]
        assert (state.spent, state.reserved) == (220, 0)
    finally:
        direct.close()
        allowance.of(client).guard.close()
        client.close()


def test_fail_open_logs_at_error_and_never_the_password(
    fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    url = f"redis://bob:s3cret@127.0.0.1:{port}/0?socket_connect_timeout=0.5"
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0)
    allowance.wrap(client, budget="$1", ledger=url, fail="open")
    guard = allowance.of(client).guard
    try:
        with caplog.at_level(logging.DEBUG):
            _ask(client)
            assert fake.generation_count == 1  # let through
            guard.close()  # tries to write the held charge: fails, logs
        errors = [
            r for r in caplog.records
            if r.name == "allowance" and r.levelno == logging.ERROR
        ]  # fmt: skip
        assert errors
        assert "***" in errors[0].getMessage()
        assert "s3cret" not in caplog.text
        assert "s3cret" not in repr(guard)
    finally:
        client.close()
