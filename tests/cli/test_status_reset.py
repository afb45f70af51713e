"""``allowance status`` and ``allowance reset`` on a real SQLite ledger."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from allowance import Budget, Estimate, Guard, Policy, Usage, open_ledger, scope
from allowance._cli import main, split_key


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "allowance._cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'live.db'}"
    guard = Guard(
        Policy(
            [
                Budget("$1", per="tenant", window="day"),
                Budget(100_000, per="user", name="seats"),
            ]
        ),
        ledger=url,
    )
    for tenant, user in (("acme", "a:1"), ("globex", "g 2")):
        with scope(tenant=tenant, user=user):
            guard.begin(Estimate("openai", "gpt-4o", 1000, 500)).commit(
                Usage(1000, 500)
            )
    with scope(tenant="acme", user="a:1"):
        guard.begin(Estimate("openai", "gpt-4o", 1000, 500))  # held, in flight
    guard.close()
    return url


def test_status_shows_counters_and_limits(url: str, tmp_path: Path) -> None:
    result = run_cli("status", "--ledger", url, "--budget", "$1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "acme" in out
    assert "globex" in out
    assert "$0.0075" in out  # spent: 1000 x $2.50 + 500 x $10 per million
    assert "$1.00" in out  # the limit given
    assert "seats" in out
    assert "a:1" in out  # unescaped
    assert "\x1b[" not in out


def test_status_as_json(url: str, tmp_path: Path) -> None:
    result = run_cli(
        "status", "--ledger", url, "--budget", "$1", "--format", "json", cwd=tmp_path
    )
    rows = {(r["dimension"], r["value"]): r for r in json.loads(result.stdout)}
    acme = rows["tenant", "acme"]
    assert acme["spent"] == 7500
    assert acme["reserved"] > 0
    assert acme["limit"] == 1_000_000
    assert acme["window"].startswith("day ")
    seats = rows["user", "g 2"]
    assert seats["name"] == "seats"
    assert seats["unit"] == "tokens"
    assert seats["spent"] == 1500
    assert seats["limit"] is None  # --budget is in USD


def test_status_filters_by_prefix_and_dimension(url: str, tmp_path: Path) -> None:
    result = run_cli(
        "status", "--ledger", url, "--per", "user", "--format", "json", cwd=tmp_path
    )
    assert {r["dimension"] for r in json.loads(result.stdout)} == {"user"}
    result = run_cli("status", "--ledger", url, "--prefix", "nothing", cwd=tmp_path)
    assert "No budget counters under 'nothing'." in result.stdout


def test_split_key() -> None:
    assert split_key("team/usd:tenant=a%3Ab:day=2026-11-22") == {
        "name": "team",
        "unit": "usd",
        "dimension": "tenant",
        "value": "a:b",
        "window": "day 2026-11-22",
    }
    assert split_key("tokens:session=s")["name"] == ""


def test_reset_refuses_without_a_terminal(url: str, tmp_path: Path) -> None:
    result = run_cli("reset", "--ledger", url, cwd=tmp_path)
    assert result.returncode == 2
    assert "--yes" in result.stderr
    ledger = open_ledger(url)
    try:
        counters = ledger.keys()
        assert counters
        for key in counters:  # the counters it would delete, named
            assert key in result.stderr
    finally:
        ledger.close()


def test_reset_with_yes_keeps_the_call_log(url: str, tmp_path: Path) -> None:
    result = run_cli(
        "reset", "--ledger", url, "--prefix", "usd:tenant=acme", "--yes", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "Reset 1 counter" in result.stdout
    ledger = open_ledger(url)
    try:
        keys = ledger.keys()
        assert not any(k.startswith("usd:tenant=acme") for k in keys)
        assert any(k.startswith("usd:tenant=globex") for k in keys)
        assert len(ledger.calls()) == 2
    finally:
        ledger.close()


def _reset_on_a_terminal(url: str, tmp_path: Path, answer: bytes) -> tuple[int, str]:
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "allowance._cli", "reset", "--ledger", url],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(secondary)
    output = b""
    try:
        while b"?" not in output:
            chunk = os.read(primary, 1024)
            if not chunk:
                break
            output += chunk
        os.write(primary, answer)
        code = process.wait(timeout=60)
        while True:
            try:
                chunk = os.read(primary, 1024)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
    return code, output.decode(errors="replace")


def test_reset_asks_on_a_terminal(url: str, tmp_path: Path) -> None:
    code, shown = _reset_on_a_terminal(url, tmp_path, b"n\n")
    assert "Delete 4 counters" in shown
    assert code == 1
    assert "Nothing deleted." in shown
    code, shown = _reset_on_a_terminal(url, tmp_path, b"y\n")
    assert code == 0, shown
    ledger = open_ledger(url)
    try:
        assert ledger.keys() == {}
    finally:
        ledger.close()


ODD = ("acme[/]", "team[eu]", "[admin]", "x:fire:")
"""Legal scope values that rich would read as markup or an emoji code."""


def test_status_and_reset_show_counters_as_written(tmp_path: Path) -> None:
    # 'acme[/]' ended status with a MarkupError (exit 1), 'team[eu]' showed
    # as 'team' and '[admin]' as nothing.
    url = f"sqlite:///{tmp_path / 'odd[/b].db'}"
    guard = Guard(Policy([Budget("$1", per="tenant")]), ledger=url)
    for tenant in ODD:
        with scope(tenant=tenant):
            guard.begin(Estimate("openai", "gpt-4o", 10, 10)).commit(Usage(10, 10))
    guard.close()
    status = run_cli("status", "--ledger", url, "--budget", "$1", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    for text in ODD:
        assert text in status.stdout
    assert "odd[/b].db" in "".join(status.stdout.split())  # the title, folded
    none = run_cli("status", "--ledger", url, "--prefix", "[/]", cwd=tmp_path)
    assert "No budget counters under '[/]'." in none.stdout
    refused = run_cli("reset", "--ledger", url, cwd=tmp_path)
    assert refused.returncode == 2
    assert "usd:tenant=[admin], usd:tenant=acme[%2F]" in refused.stderr
    done = run_cli("reset", "--ledger", url, "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usd:tenant=[admin]" in done.stdout
    assert "odd[/b].db" in done.stdout


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["report", "--since", "[/]"], "time='[/]'"),  # was a MarkupError
        (["report", "--since", "[b]oops"], "time='[b]oops'"),  # was 'oops'
        (["status", "--ledger", "sqlite:///[/x].db"], "no file '[/x].db'"),
    ],
)
def test_an_error_quotes_the_value_as_typed(
    url: str, tmp_path: Path, args: list[str], shown: str
) -> None:
    result = run_cli(
        *args, *([] if "--ledger" in args else ["--ledger", url]), cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ")
    assert shown in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("width", [44, 60, 80, 120])
@pytest.mark.parametrize("tokens", [False, True])
def test_a_narrow_terminal_cuts_no_amount(
    tmp_path: Path, width: int, tokens: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    # At 60 columns amounts were cut to '$0.…' and '1,5… tok…'. They fold,
    # and stay on one line while the ids keep room.
    url = f"sqlite:///{tmp_path / 'narrow.db'}"
    budgets = [Budget("$1", per="tenant", window="day")]
    if tokens:
        budgets.append(Budget(100_000, per="user", name="seats"))
    guard = Guard(Policy(budgets), ledger=url)
    with scope(tenant="acme", user="u-1"):
        guard.begin(Estimate("openai", "gpt-4o", 1000, 500)).commit(Usage(1000, 500))
    guard.close()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("COLUMNS", str(width))
        assert main(["status", "--ledger", url, "--budget", "$1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= width
    rows = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
    assert not [row for row in rows if "…" in "".join(row)]
    columns = ["".join(column).replace(" ", "") for column in zip(*rows, strict=True)]
    assert "$0.0075" in columns[4]
    assert "$1.00" in columns[6]
    if tokens:
        assert "1,500tokens" in columns[4]
    if width >= 80 or (width >= 60 and not tokens):
        assert "$0.0075" in [cell.strip() for row in rows for cell in row]
