"""``allowance run``: a real agent script in a real subprocess, on the fake provider.

The script does not import allowance; the bootstrap ``sitecustomize`` guards
its OpenAI client before its first line.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from allowance import open_ledger
from allowance._run import EXIT_BUDGET_EXCEEDED, child_env
from allowance.testing import FakeProvider

AGENT = """
import os, sys
import openai

client = openai.OpenAI(base_url=os.environ["FAKE_OPENAI_URL"], api_key="test",
                       max_retries=0)
calls, code = int(sys.argv[1]), int(sys.argv[2])
for i in range(calls):
    answer = client.chat.completions.create(
        model=os.environ.get("AGENT_MODEL", "gpt-4o"),
        messages=[{"role": "user", "content": "Plan the next step."}],
        max_tokens=100,
    )
    print("step", i, answer.model, answer.id, flush=True)
print("done", flush=True)
sys.exit(code)
"""


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    path = tmp_path / "agent.py"
    path.write_text(AGENT)
    return path


def allowance_run(
    *args: str,
    cwd: Path,
    fake: FakeProvider,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "FAKE_OPENAI_URL": fake.openai_base_url, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "allowance._cli", "run", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=90,
        check=False,
    )


def test_the_exit_code_passes_through(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    url = f"sqlite:///{tmp_path / 'run.db'}"
    result = allowance_run(
        "--budget", "$5", "--ledger", url, "--run-id", "nightly-1",
        "--scope", "tenant=acme",
        "--", sys.executable, str(agent), "2", "7",
        cwd=tmp_path, fake=fake_provider,
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert "done" in result.stdout
    ledger = open_ledger(url)
    try:
        calls = ledger.calls()
        keys = ledger.keys()
    finally:
        ledger.close()
    assert len(calls) == 2
    assert {c.scope["run"] for c in calls} == {"nightly-1"}
    assert {c.scope["tenant"] for c in calls} == {"acme"}
    assert {c.outcome for c in calls} == {"ok"}
    assert keys["usd:run=nightly-1"].spent > 0


def test_budget_exceeded_ends_the_program_with_a_clear_message(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    url = f"sqlite:///{tmp_path / 'run.db'}"
    result = allowance_run(
        "--budget", "$0.002", "--ledger", url, "--adapters", "openai",
        "--", sys.executable, str(agent), "20", "0",
        cwd=tmp_path, fake=fake_provider,
    )  # fmt: skip
    assert result.returncode == EXIT_BUDGET_EXCEEDED, result.stderr
    assert "step 0" in result.stdout
    assert "done" not in result.stdout
    assert "allowance: budget exceeded, the program was stopped" in result.stderr
    assert "Traceback" not in result.stderr
    ledger = open_ledger(url)
    try:
        outcomes = [c.outcome for c in ledger.calls()]
    finally:
        ledger.close()
    assert outcomes[-1] == "blocked"
    assert fake_provider.count("/chat/completions") == outcomes.count("ok")


def test_fallback_degrades_instead_of_stopping(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    result = allowance_run(
        "--budget", "$0.0012", "--adapters", "openai", "--fallback", "gpt-4o-mini", "--threshold", "0.5",
        "--ledger", "memory://", "--", sys.executable, str(agent), "8", "0",
        cwd=tmp_path, fake=fake_provider,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "gpt-4o-mini" in result.stdout


def test_options_come_from_the_environment(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    result = allowance_run(
        "--", sys.executable, str(agent), "1", "0",
        cwd=tmp_path, fake=fake_provider,
        env={"ALLOWANCE_BUDGET": "50k tokens", "ALLOWANCE_LEDGER": url,
             "ALLOWANCE_PER": "tenant", "ALLOWANCE_SCOPE": "tenant=globex",
             "ALLOWANCE_ADAPTERS": "openai"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ledger = open_ledger(url)
    try:
        keys = ledger.keys()
    finally:
        ledger.close()
    assert keys["tokens:tenant=globex"].spent > 0


def test_a_child_python_process_is_guarded_too(
    tmp_path: Path, fake_provider: FakeProvider, agent: Path
) -> None:
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys\n"
        f"sys.exit(subprocess.call([sys.executable, {str(agent)!r}, '1', '5']))\n"
    )
    url = f"sqlite:///{tmp_path / 'child.db'}"
    result = allowance_run(
        "--budget", "$1", "--ledger", url, "--run-id", "r", "--adapters", "openai",
        "--", sys.executable, str(parent),
        cwd=tmp_path, fake=fake_provider,
    )  # fmt: skip
    assert result.returncode == 5, result.stderr
    ledger = open_ledger(url)
    try:
        assert [c.scope["run"] for c in ledger.calls()] == ["r"]
    finally:
        ledger.close()


def test_a_child_in_another_directory_counts_on_the_same_file(
    tmp_path: Path, fake_provider: FakeProvider, agent: Path
) -> None:
    """A relative ledger path is made absolute for the whole run: a child
    Python process working in another directory counts on the same file, so
    on the same budget.

    If this fails with a second ``team.db`` under ``sub/``: each process
    opened the path relative to its own working directory, a budget of its
    own for each.
    """
    sub = tmp_path / "sub"
    sub.mkdir()
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys\n"
        f"subprocess.check_call([sys.executable, {str(agent)!r}, '1', '0'])\n"
        f"code = subprocess.call([sys.executable, {str(agent)!r}, '1', '5'],"
        f" cwd={str(sub)!r})\n"
        "sys.exit(code)\n"
    )
    result = allowance_run(
        "--budget", "$1", "--ledger", "sqlite:///team.db", "--run-id", "r",
        "--", sys.executable, str(parent),
        cwd=tmp_path, fake=fake_provider,
    )  # fmt: skip
    assert result.returncode == 5, result.stdout + result.stderr
    assert not (sub / "team.db").exists()
    ledger = open_ledger(f"sqlite:///{tmp_path / 'team.db'}")
    try:
        assert [c.scope["run"] for c in ledger.calls()] == ["r", "r"]
    finally:
        ledger.close()


def test_child_env_makes_a_relative_ledger_path_absolute(tmp_path: Path) -> None:
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        env = child_env({"ledger": "sqlite:///team.db?write_behind=0.05"}, base={})
        default = child_env({}, base={})
    finally:
        os.chdir(cwd)
    assert env["ALLOWANCE_LEDGER"] == f"sqlite:///{tmp_path}/team.db?write_behind=0.05"
    assert default["ALLOWANCE_LEDGER"] == f"sqlite:///{tmp_path}/allowance.db"
    redis = child_env({"ledger": "redis://127.0.0.1:6379/0"}, base={})
    assert redis["ALLOWANCE_LEDGER"] == "redis://127.0.0.1:6379/0"


def test_a_bad_option_is_refused_before_the_program_starts(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    result = allowance_run(
        "--budget", "five dollars", "--", sys.executable, str(agent), "1", "0",
        cwd=tmp_path, fake=fake_provider,
    )  # fmt: skip
    assert result.returncode == 2
    assert "five dollars" in result.stderr
    assert fake_provider.count() == 0


def test_a_bad_environment_variable_stops_the_program(
    agent: Path, tmp_path: Path, fake_provider: FakeProvider
) -> None:
    env = {
        **os.environ,
        **child_env({}),
        "ALLOWANCE_BUDGET": "lots",
        "FAKE_OPENAI_URL": fake_provider.openai_base_url,
    }
    result = subprocess.run(
        [sys.executable, str(agent), "1", "0"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "allowance run:" in result.stderr
    assert "lots" in result.stderr
    assert fake_provider.count() == 0


def test_no_command_is_a_usage_error(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    result = allowance_run("--budget", "$1", cwd=tmp_path, fake=fake_provider)
    assert result.returncode == 2
    assert "needs a command" in result.stderr


def test_an_unknown_command_is_a_usage_error(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    result = allowance_run(
        "--", "no-such-program-xyz", cwd=tmp_path, fake=fake_provider
    )
    assert result.returncode == 2
    assert "no-such-program-xyz" in result.stderr


def test_child_env_puts_the_bootstrap_first_once() -> None:
    env = child_env({"budget": "$1"}, base={"PYTHONPATH": "/x"})
    first, rest = env["PYTHONPATH"].split(os.pathsep, 1)
    assert first.endswith("_bootstrap")
    assert rest == "/x"
    again = child_env({}, base=env)
    assert again["PYTHONPATH"] == env["PYTHONPATH"]
    assert again["ALLOWANCE_BUDGET"] == "$1"
    assert again["ALLOWANCE_RUN_ID"] == env["ALLOWANCE_RUN_ID"]


def _python_without_allowance() -> str:
    """The interpreter this venv was made from, which has no allowance."""
    base = getattr(sys, "_base_executable", sys.executable)
    probe = subprocess.run(
        [base, "-c", "import allowance"], capture_output=True, check=False, timeout=60
    )
    if base == sys.executable or probe.returncode == 0:
        pytest.skip("no interpreter without allowance at hand")
    return base


def test_a_python_that_cannot_import_allowance_does_not_run_unguarded(
    tmp_path: Path, fake_provider: FakeProvider
) -> None:
    bare = _python_without_allowance()
    script = tmp_path / "hello.py"
    script.write_text("print('the program ran')\n")
    url = f"sqlite:///{tmp_path / 'bare.db'}"
    refused = allowance_run(
        "--budget", "$1", "--ledger", url, "--", bare, str(script),
        cwd=tmp_path, fake=fake_provider,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "the program ran" not in refused.stdout
    assert f"cannot import allowance in {bare}" in refused.stderr
    assert "--fail open" in refused.stderr

    allowed = allowance_run(
        "--budget", "$1", "--ledger", url, "--fail", "open", "--", bare, str(script),
        cwd=tmp_path, fake=fake_provider,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert "the program ran" in allowed.stdout
    assert "WITHOUT a budget" in allowed.stderr


# -- options from ALLOWANCE_* only (README: "Options default to ALLOWANCE_BUDGET,
# ALLOWANCE_PER, ALLOWANCE_WINDOW, ... ALLOWANCE_RUN_ID, ALLOWANCE_SESSION") ---


def run_with_env(
    agent: Path, calls: int, fake: FakeProvider, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """``allowance run -- python agent.py <calls> 0``, its options from ``env`` only."""
    return allowance_run(
        "--",
        sys.executable,
        str(agent),
        str(calls),
        "0",
        cwd=cwd,
        fake=fake,
        env={"ALLOWANCE_ADAPTERS": "openai", **env},
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


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("ALLOWANCE_WINDOW", "year", "'year'"),
        ("ALLOWANCE_PER", "x y", "'x y'"),
        ("ALLOWANCE_ON_LIMIT", "explode", "'explode'"),
        ("ALLOWANCE_FAIL", "maybe", "'maybe'"),
        ("ALLOWANCE_SCOPE", "a b=c", "'a b'"),
        ("ALLOWANCE_ADAPTERS", "openai,nonexistent", "'nonexistent'"),
    ],
)
@pytest.mark.parametrize("budget", [None, "$1"])
def test_every_malformed_variable_is_refused_before_the_program_starts(
    tmp_path: Path, variable: str, value: str, named: str, budget: str | None
) -> None:
    # Without a budget nothing read them and the program ran (exit 0); with
    # one, the message said window='year', not ALLOWANCE_WINDOW.
    env = {**os.environ, variable: value}
    if budget is not None:
        env["ALLOWANCE_BUDGET"] = budget
    result = subprocess.run(
        [sys.executable, "-m", "allowance._cli", "run", "--ledger", "memory://",
         "--", "sh", "-c", "echo the program ran"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert "the program ran" not in result.stdout
    assert f"{variable}={named}: expected" in result.stderr
