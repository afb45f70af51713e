"""README, "``allowance run``": the options that default to ``ALLOWANCE_*``.

"Options default to ``ALLOWANCE_BUDGET``, ``ALLOWANCE_PER`` (default ``run``),
``ALLOWANCE_WINDOW``, ``ALLOWANCE_LEDGER``, ``ALLOWANCE_FALLBACK``,
``ALLOWANCE_THRESHOLD``, ``ALLOWANCE_ON_LIMIT``, ``ALLOWANCE_FAIL``,
``ALLOWANCE_RUN_ID``, ``ALLOWANCE_SESSION``, ..." (tests/cli/test_run.py
covers BUDGET, LEDGER, PER, SCOPE and ADAPTERS; these are the others.)

A real agent script that does not import allowance runs in a real
subprocess, its real OpenAI client on the fake provider on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from allowance import open_ledger
from allowance.testing import FakeProvider

AGENT = """
import os, sys
import openai

client = openai.OpenAI(base_url=os.environ["FAKE_OPENAI_URL"], api_key="test",
                       max_retries=0)
for i in range(int(sys.argv[1])):
    answer = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Plan the next step."}],
        max_tokens=100,
    )
    print("step", i, answer.model, answer.id, flush=True)
print("done", flush=True)
"""


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    path = tmp_path / "agent.py"
    path.write_text(AGENT)
    return path


def run_with_env(
    agent: Path, calls: int, fake: FakeProvider, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "FAKE_OPENAI_URL": fake.openai_base_url,
        "ALLOWANCE_ADAPTERS": "openai",
        **env,
    }
    command = [sys.executable, "-m", "allowance._cli", "run", "--"]
    return subprocess.run(
        [*command, sys.executable, str(agent), str(calls)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=90,
        check=False,
    )


def ledger_state(url: str) -> tuple[dict[str, Any], list[Any]]:
    ledger = open_ledger(url)
    try:
        return ledger.keys(), ledger.calls()
    finally:
        ledger.close()


def test_run_id_and_window_come_from_the_environment(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    result = run_with_env(
        agent, 2, fake_provider, tmp_path,
        ALLOWANCE_BUDGET="$5", ALLOWANCE_LEDGER=url,
        ALLOWANCE_RUN_ID="nightly-9", ALLOWANCE_WINDOW="day",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    keys, calls = ledger_state(url)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert set(keys) == {f"usd:run=nightly-9:day={today}"}
    assert {c.scope["run"] for c in calls} == {"nightly-9"}
    assert len(calls) == 2


def test_session_comes_from_the_environment(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    result = run_with_env(
        agent, 1, fake_provider, tmp_path,
        ALLOWANCE_BUDGET="50k tokens", ALLOWANCE_LEDGER=url,
        ALLOWANCE_PER="session", ALLOWANCE_SESSION="sess-4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    keys, calls = ledger_state(url)
    assert set(keys) == {"tokens:session=sess-4"}
    assert [c.scope["session"] for c in calls] == ["sess-4"]


def test_on_limit_stop_comes_from_the_environment(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    """A budget too small for any call: the program runs to its end, answered
    by empty responses marked ``allowance-stop``; nothing reaches the provider."""
    url = f"sqlite:///{tmp_path / 'env.db'}"
    result = run_with_env(
        agent, 2, fake_provider, tmp_path,
        ALLOWANCE_BUDGET="10", ALLOWANCE_LEDGER=url, ALLOWANCE_ON_LIMIT="stop",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    assert result.stdout.count("allowance-stop") == 2
    assert fake_provider.generation_count == 0


def test_fallback_and_threshold_come_from_the_environment(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    result = run_with_env(
        agent, 8, fake_provider, tmp_path,
        ALLOWANCE_BUDGET="$0.0012", ALLOWANCE_LEDGER="memory://",
        ALLOWANCE_FALLBACK="gpt-4o-mini", ALLOWANCE_THRESHOLD="0.5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "gpt-4o-mini" in result.stdout
    assert "done" in result.stdout


def test_fail_open_comes_from_the_environment(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    """A ledger nobody answers: closed stops the program, open lets it run."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    url = f"redis://127.0.0.1:{port}/0?socket_connect_timeout=0.5"
    closed = run_with_env(
        agent, 1, fake_provider, tmp_path, ALLOWANCE_BUDGET="$1", ALLOWANCE_LEDGER=url
    )
    assert closed.returncode != 0
    assert "done" not in closed.stdout
    assert fake_provider.generation_count == 0
    opened = run_with_env(
        agent, 1, fake_provider, tmp_path,
        ALLOWANCE_BUDGET="$1", ALLOWANCE_LEDGER=url, ALLOWANCE_FAIL="open",
    )  # fmt: skip
    assert opened.returncode == 0, opened.stderr
    assert "done" in opened.stdout
    assert fake_provider.generation_count == 1
