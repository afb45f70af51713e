"""The ``allowance`` command: report from a real SQLite ledger, in a real process."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from allowance import Estimate, Guard, Usage, open_ledger, scope


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "allowance._cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )


def test_report_shows_spend_by_dimension_and_model(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    guard = Guard(budget="$1", per="tenant", ledger=url)
    for tenant, calls in (("acme", 3), ("globex", 1)):
        with scope(tenant=tenant):
            for _ in range(calls):
                guard.begin(Estimate("openai", "gpt-4o", 1000, 500)).commit(
                    Usage(1000, 500)
                )
    guard.close()
    result = run_cli("report", "--ledger", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Spend by tenant" in out
    assert "acme" in out
    assert "$0.0225" in out  # 3 x (1000 x $2.50 + 500 x $10) per million tokens
    assert "Spend by model" in out
    assert "4 calls, $0.03 spent, 0 refused before sending." in out


def test_report_groups_by_a_chosen_dimension(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    guard = Guard(ledger=url)
    with scope(user="u1", tenant="t"):
        guard.begin(Estimate("openai", "gpt-4o-mini", 10, 10)).commit(Usage(10, 10))
    guard.close()
    out = run_cli("report", "--ledger", url, "--by", "user", cwd=tmp_path).stdout
    assert "Spend by user" in out
    assert "Spend by tenant" not in out


def empty_ledger(path: Path) -> None:
    """A ledger file with no counters and no calls."""
    ledger = open_ledger(f"sqlite:///{path}")
    ledger.keys("")
    ledger.close()
    assert path.exists()


def test_report_of_an_empty_ledger(tmp_path: Path) -> None:
    empty_ledger(tmp_path / "empty.db")
    result = run_cli("report", "--ledger", "sqlite:///empty.db", cwd=tmp_path)
    assert result.returncode == 0
    assert "No calls recorded." in result.stdout


@pytest.mark.parametrize("command", ["report", "status", "reset"])
def test_a_ledger_file_that_does_not_exist_is_an_error_not_created(
    tmp_path: Path, command: str
) -> None:
    result = run_cli(command, "--ledger", "sqlite:///typo/ledger.db", cwd=tmp_path)
    assert result.returncode == 2
    assert "there is no file" in result.stderr
    assert "typo" in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # neither the file nor its directory


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["report", "--top", "-5"], "--top"),
        (["report", "--top", "0"], "--top"),
        (["report", "--top", "ten"], "--top"),
        (["report", "--by", "a b"], "'a b'"),
        (["report", "--by", "tenant,x:y"], "'x:y'"),
        (["status", "--per", "a b"], "'a b'"),
    ],
)
def test_bad_report_and_status_options_are_clear_errors(
    tmp_path: Path, args: list[str], named: str
) -> None:
    empty_ledger(tmp_path / "live.db")
    result = run_cli(*args, "--ledger", "sqlite:///live.db", cwd=tmp_path)
    assert result.returncode == 2
    assert named in result.stdout + result.stderr


def test_a_bad_ledger_url_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("report", "--ledger", "postgres://x", cwd=tmp_path)
    assert result.returncode == 2
    assert "ledger" in result.stderr
    assert "expected" in result.stderr


def test_a_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.db").write_bytes(b"this is not a database" * 100)
    result = run_cli("report", "--ledger", "sqlite:///bad.db", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.db" in result.stderr


def test_an_html_path_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    """No traceback: exit 2, naming the path, on stderr."""
    empty_ledger(tmp_path / "live.db")
    result = run_cli(
        "report", "--ledger", "sqlite:///live.db",
        "--html", str(tmp_path / "nodir" / "r.html"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--html" in result.stderr
    assert "nodir" in result.stderr
    assert "Traceback" not in result.stderr


def test_errors_go_to_stderr_so_a_redirected_report_stays_clean(
    tmp_path: Path,
) -> None:
    result = run_cli(
        "report", "--ledger", "sqlite:///none.db", "--format", "csv", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "none.db" in result.stderr


@pytest.mark.parametrize("command", ["report", "status", "reset"])
@pytest.mark.parametrize("kind", ["another program's database", "an empty file"])
def test_a_file_that_is_not_a_ledger_is_an_error_and_left_as_it_was(
    tmp_path: Path, command: str, kind: str
) -> None:
    # They wrote a ledger's tables into the file (and set WAL mode), then
    # reported nothing.
    path = tmp_path / "app.db"
    path.touch()
    if kind != "an empty file":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE users (id INTEGER)")
        conn.commit()
        conn.close()
    before = path.read_bytes()
    yes = ["--yes"] if command == "reset" else []
    result = run_cli(command, *yes, "--ledger", "sqlite:///app.db", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--ledger='sqlite:///app.db': expected an allowance ledger" in result.stderr
    assert "'app.db' is not one" in result.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["app.db"]


def test_an_empty_relative_range_is_refused(tmp_path: Path) -> None:
    # Each relative time was taken from its own clock reading: '--since 1d
    # --until 1d' was a range of a few microseconds, reported as empty.
    empty_ledger(tmp_path / "live.db")
    result = run_cli(
        "report", "--ledger", "sqlite:///live.db", "--since", "1d", "--until", "1d",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--until='1d': expected a time later than --since=1d" in result.stderr
