"""README, "Budgets, scopes, policies": whose session a call is charged to.

"``wrap()`` charges its own session: each wrapped client gets a new session id
unless you pass ``session="..."`` (then clients and processes with the same id
share that session's budget). ``patch()`` charges the process's session unless
``allowance.scope(session=...)`` names one."

Real OpenAI SDK clients over loopback HTTP to the fake provider, one SQLite
file shared by every guard of a test, a budget that holds one call only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.sdk.conftest import GPT, USER

import allowance
from allowance import open_ledger
from allowance.testing import FakeProvider, FakeUsage

ONE_CALL = 200
"""Tokens: one call below (a worst case of 117, charged 110) fits, two do not."""


@pytest.fixture
def fake(fake_provider: FakeProvider) -> FakeProvider:
    fake_provider.usage = FakeUsage(input_tokens=10, output_tokens=100)
    return fake_provider


def ask(client: Any) -> None:
    client.chat.completions.create(model=GPT, messages=USER, max_tokens=100)


def sessions(url: str) -> list[str]:
    """The session of each call the ledger logged as answered, oldest first."""
    ledger = open_ledger(url)
    try:
        calls = sorted(ledger.calls(), key=lambda call: call.ts)
        return [call.scope["session"] for call in calls if call.outcome == "ok"]
    finally:
        ledger.close()


def test_the_budget_holds_one_call(fake, clients, tmp_path: Path) -> None:
    """Control: on one client, the second call does not fit."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    client = allowance.wrap(clients("openai", "sync"), ONE_CALL, ledger=url)
    ask(client)
    with pytest.raises(allowance.BudgetExceeded):
        ask(client)


def test_each_wrapped_client_gets_its_own_session(
    fake, clients, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = allowance.wrap(clients("openai", "sync"), ONE_CALL, ledger=url)
    second = allowance.wrap(clients("openai", "sync"), ONE_CALL, ledger=url)
    ask(first)
    ask(second)  # not refused: a session of its own, untouched
    first_session, second_session = sessions(url)
    assert first_session != second_session


def test_clients_with_the_same_session_share_its_budget(
    fake, clients, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = allowance.wrap(
        clients("openai", "sync"), ONE_CALL, ledger=url, session="shared"
    )
    second = allowance.wrap(
        clients("openai", "sync"), ONE_CALL, ledger=url, session="shared"
    )
    ask(first)
    with pytest.raises(allowance.BudgetExceeded):
        ask(second)
    assert sessions(url) == ["shared"]


def test_patch_charges_the_process_session(fake, clients, tmp_path: Path) -> None:
    """Two clients under ``patch()`` spend from one session budget."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    allowance.patch(ONE_CALL, ledger=url)
    first, second = clients("openai", "sync"), clients("openai", "sync")
    ask(first)
    with pytest.raises(allowance.BudgetExceeded):
        ask(second)
    assert fake.generation_count == 1


def test_patch_charges_the_session_a_scope_names(fake, clients, tmp_path: Path) -> None:
    """Under ``patch()``, ``allowance.scope(session=...)`` picks the session."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    allowance.patch(ONE_CALL, ledger=url)
    client = clients("openai", "sync")
    ask(client)  # the process's session: now full
    with allowance.scope(session="job-7"):
        ask(client)  # a session of its own
    with pytest.raises(allowance.BudgetExceeded):
        ask(client)
    process_session, named = sessions(url)
    assert named == "job-7"
    assert process_session != "job-7"
