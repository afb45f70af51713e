"""``allowance report`` from a real SQLite call log: windows, formats, HTML."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from allowance import CallRecord, Usage, open_ledger
from allowance._report import (
    Window,
    build_report,
    print_report,
    render_csv,
    render_html,
)

DAY1 = datetime(2026, 11, 20, 9, tzinfo=UTC).timestamp()
DAY2 = datetime(2026, 11, 21, 15, tzinfo=UTC).timestamp()


def record(
    n: int,
    ts: float,
    tenant: str,
    *,
    model: str = "gpt-4o",
    requested: str | None = None,
    cost: int = 10_000,
    outcome: str = "ok",
    usage: Usage | None = None,
) -> CallRecord:
    blocked = outcome == "blocked"
    return CallRecord(
        call_id=f"c{n}",
        ts=ts,
        scope={"tenant": tenant, "user": f"u{n % 2}", "session": "s"},
        provider="openai",
        model=model,
        requested_model=requested or model,
        usage=Usage() if blocked else usage or Usage(1000, 100),
        cost_micros=0 if blocked else cost,
        adapters=("openai",),
        outcome=outcome,  # type: ignore[arg-type]
    )


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    ledger = open_ledger(url)
    records = [
        record(1, DAY1, "acme"),
        record(2, DAY1 + 60, "acme", cost=20_000),
        record(3, DAY1 + 120, "globex"),
        record(4, DAY2, "acme", outcome="blocked"),
        record(
            5, DAY2 + 60, "globex", model="gpt-4o-mini", requested="gpt-4o", cost=1_000
        ),
        record(6, DAY2 + 120, "acme", cost=40_000),
    ]
    for item in records:
        ledger.record(item)
    ledger.close()
    return url


def run_cli(
    *args: str, cwd: Path, columns: int = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "allowance._cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )


def test_spend_by_tenant_per_day(ledger_url: str, tmp_path: Path) -> None:
    result = run_cli(
        "report",
        "--ledger",
        ledger_url,
        "--by",
        "tenant",
        "--window",
        "day",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Spend by tenant per day" in out
    assert "2026-11-20" in out
    assert "2026-11-21" in out
    assert "Spend by model" in out
    assert "Blocked calls (latest 1 of 1)" in out
    assert "Degraded calls (latest 1 of 1)" in out
    assert "gpt-4o -> gpt-4o-mini" in out
    assert "6 calls, $0.081 spent, 1 refused before sending, 1 degraded." in out
    assert "\x1b[" not in out  # piped: plain text


def test_output_follows_the_terminal_width(ledger_url: str, tmp_path: Path) -> None:
    narrow = run_cli("report", "--ledger", ledger_url, cwd=tmp_path, columns=60)
    wide = run_cli("report", "--ledger", ledger_url, cwd=tmp_path, columns=160)
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 60
    assert max(len(line) for line in wide.stdout.splitlines()) > 60


def test_json(ledger_url: str, tmp_path: Path) -> None:
    result = run_cli(
        "report",
        "--ledger",
        ledger_url,
        "--by",
        "tenant",
        "--window",
        "day",
        "--format",
        "json",
        cwd=tmp_path,
    )
    data = json.loads(result.stdout)
    groups = {(g["window"], g["tenant"]): g for g in data["groups"]}
    assert groups["2026-11-20", "acme"]["cost_usd"] == pytest.approx(0.03)
    assert groups["2026-11-20", "acme"]["calls"] == 2
    assert groups["2026-11-21", "acme"]["blocked"] == 1
    assert groups["2026-11-21", "globex"]["degraded"] == 1
    assert data["totals"]["calls"] == 6
    assert data["top_models"][0]["model"] == "gpt-4o"
    assert data["blocked"]["count"] == 1
    assert data["blocked"]["latest"][0]["scope"]["tenant"] == "acme"
    assert data["degraded"]["latest"][0]["requested_model"] == "gpt-4o"


def test_csv_by_two_dimensions(ledger_url: str, tmp_path: Path) -> None:
    result = run_cli(
        "report",
        "--ledger",
        ledger_url,
        "--by",
        "tenant,user",
        "--format",
        "csv",
        cwd=tmp_path,
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {(r["tenant"], r["user"]) for r in rows} == {
        ("acme", "u0"),
        ("acme", "u1"),
        ("globex", "u1"),
    }
    assert sum(int(r["calls"]) for r in rows) == 6
    assert list(rows[0])[:3] == ["tenant", "user", "calls"]


def test_since_and_until(ledger_url: str, tmp_path: Path) -> None:
    result = run_cli(
        "report",
        "--ledger",
        ledger_url,
        "--since",
        "2026-11-21",
        "--format",
        "json",
        cwd=tmp_path,
    )
    assert json.loads(result.stdout)["totals"]["calls"] == 3
    result = run_cli(
        "report",
        "--ledger",
        ledger_url,
        "--until",
        "2026-11-21T00:00Z",
        "--format",
        "json",
        cwd=tmp_path,
    )
    assert json.loads(result.stdout)["totals"]["calls"] == 3
    bad = run_cli("report", "--ledger", ledger_url, "--since", "soon", cwd=tmp_path)
    assert bad.returncode == 2
    assert "ISO date" in bad.stderr
    backwards = run_cli(
        "report",
        "--ledger",
        ledger_url,
        "--since",
        "2026-11-21",
        "--until",
        "2026-11-20",
        cwd=tmp_path,
    )
    assert backwards.returncode == 2  # was an empty report and exit 0
    assert "--until='2026-11-20'" in backwards.stderr
    assert "later than --since=2026-11-21" in backwards.stderr


def test_progress_is_shown_on_a_terminal_only(ledger_url: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    terminal = Console(file=err, force_terminal=True, width=100)
    print_report(Console(file=out, width=100), ledger_url, status=terminal)
    assert "summarising calls" in err.getvalue()
    piped = io.StringIO()
    print_report(Console(file=io.StringIO()), ledger_url, status=Console(file=piped))
    assert piped.getvalue() == ""


def test_html_is_self_contained(ledger_url: str, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    result = run_cli(
        "report",
        "--ledger",
        ledger_url,
        "--by",
        "tenant",
        "--html",
        str(page),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "<svg" in text
    assert "Spend over time by tenant" in text
    assert "<script" not in text
    assert "<link" not in text
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text
    assert "globex" in text


def test_html_escapes_scope_values(tmp_path: Path) -> None:
    hostile = record(1, DAY1, "<script>alert(1)</script>")
    text = render_html(build_report([hostile], by=("tenant",)))
    assert "<script>" not in text
    assert "&lt;script&gt;" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium): "
    "the HTML report cannot be rendered headless here",
)
def test_html_renders_in_headless_chromium(ledger_url: str, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    run_cli("report", "--ledger", ledger_url, "--html", str(page), cwd=tmp_path)
    shot = tmp_path / "report.png"
    assert CHROMIUM is not None
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG")
    assert len(png) > 10_000  # a blank page is a few kB; the charts are more


def test_a_long_table_lists_the_top_spenders_and_says_how_many_more(
    tmp_path: Path,
) -> None:
    """The terminal table stops at the top spenders; json keeps every row."""
    ledger = open_ledger(f"sqlite:///{tmp_path / 'many.db'}")
    for n in range(120):
        ledger.record(
            CallRecord(
                call_id=f"c{n}",
                ts=DAY1 + n,
                scope={"session": f"s{n:03}"},
                provider="openai",
                model="gpt-4o",
                requested_model="gpt-4o",
                usage=Usage(10, 1),
                cost_micros=1000 + n,
                adapters=("openai",),
                outcome="ok",
            )
        )
    out = io.StringIO()
    print_report(Console(file=out, width=120), ledger)
    text = out.getvalue()
    assert "s119" in text  # the largest spender
    assert "s000" not in text  # the smallest is left out
    assert "... and 70 more rows" in text
    out = io.StringIO()
    print_report(Console(file=out, width=120), ledger, fmt="json")
    assert "s000" in out.getvalue()
    # One decoded scope per distinct text, shared read-only by its records.
    calls = ledger.calls()
    assert calls[0].scope == {"session": "s000"}
    with pytest.raises(TypeError):
        calls[0].scope["session"] = "x"  # type: ignore[index]
    ledger.close()


@pytest.mark.parametrize("width", [60, 80])
def test_a_narrow_terminal_folds_ids_and_keeps_amounts_whole(
    tmp_path: Path, width: int
) -> None:
    # Ids that differ only at the end were cut to the same "tenant-…" text,
    # and at 60 columns an amount to "$0.01…".
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ids.db'}")
    long = "tenant-0123456789abcdef0123456789abcdef-"
    for n in range(2):
        ledger.record(record(n, DAY1 + n, f"{long}{n:04}", cost=10_000 + n))
    out = io.StringIO()
    print_report(Console(file=out, width=width), ledger, by=("tenant",))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= width
    tenants = lines[: lines.index("Spend by model".ljust(width))]
    rows = [line for line in tenants if line.startswith("│")]
    assert not [row for row in rows if "…" in row]  # headers may shorten, not cells
    first_cells = "".join(row.split("│")[1].strip() for row in rows)
    assert f"{long}0001{long}0000" in first_cells  # the larger spender first
    assert "$0.010001" in out.getvalue()
    ledger.close()


@pytest.mark.parametrize("width", [44, 60, 80])  # below 44, 8 columns do not fit
@pytest.mark.parametrize("by", [(), ("tenant",)])
def test_a_narrow_terminal_cuts_no_cell_of_any_table(
    tmp_path: Path, width: int, by: tuple[str, ...]
) -> None:
    # At 60 columns the model table cut token counts to "12…" and the
    # provider to "op…": every cell now folds (USD stays on one line).
    ledger = open_ledger(f"sqlite:///{tmp_path / 'wide.db'}")
    big = Usage(123_456_789, 12_345_678)
    model = "gpt-4o-mini-2024-07-18"
    for n in range(3):
        tenant = f"tenant-{n}"
        cost = 1_234_567_890
        ledger.record(record(n, DAY1 + n, tenant, model=model, cost=cost, usage=big))
    ledger.record(record(9, DAY1 + 9, "tenant-9", model=model, outcome="blocked"))
    out = io.StringIO()
    print_report(Console(file=out, width=width), ledger, by=by)
    text = out.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    cells = [line for line in lines if line.startswith("│")]
    assert cells
    assert not [line for line in cells if "…" in line], text
    models = lines[lines.index("Spend by model".ljust(width)) :]
    rows = [
        line.split("│")[1:-1]
        for line in models[
            : models.index(next(line for line in models if line.startswith("└")))
        ]
        if line.startswith("│")
    ]
    columns = [
        "".join(cell.strip() for cell in column) for column in zip(*rows, strict=True)
    ]
    assert columns[:5] == [model, "openai", "4", "370,370,367", "37,037,034"]
    assert rows[0][5].strip() == "$3703.70367"  # the amount on one line
    ledger.close()


BRACKETED = ("acme[/]", "team[eu]", "[admin]", "x:fire:")
"""Legal scope values that rich would read as markup or an emoji code."""


@pytest.mark.parametrize("by", [(), ("tenant",), ("tenant", "user")])
def test_scope_values_and_models_are_shown_as_written(
    tmp_path: Path, by: tuple[str, ...]
) -> None:
    # 'acme[/]' ended the report with a MarkupError (exit 1), 'team[eu]' showed
    # as 'team' and '[admin]' as nothing.
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    ledger = open_ledger(url)
    for n, tenant in enumerate(BRACKETED):
        ledger.record(record(n, DAY1 + n, tenant, model="m[/]"))
    ledger.record(record(8, DAY1 + 8, "[b]x", outcome="blocked"))
    ledger.record(record(9, DAY1 + 9, "[i]y", model="a[/]", requested="b[/]"))
    ledger.close()
    args = [a for d in by for a in ("--by", d)]
    result = run_cli("report", "--ledger", url, *args, cwd=tmp_path, columns=200)
    assert result.returncode == 0, result.stderr
    for text in (*BRACKETED, "m[/]", "tenant=[b]x", "tenant=[i]y", "b[/] -> a[/]"):
        assert text in result.stdout


@pytest.mark.parametrize(
    ("by", "window", "columns"),
    [
        (("tenant",), "day", ["window", "tenant"]),
        (("tenant", "user"), None, ["tenant", "user"]),
        ((), "month", ["window"]),
        ((), None, ["dimension", "value"]),
    ],
)
def test_csv_keeps_its_columns_when_no_call_is_in_range(
    by: tuple[str, ...], window: Window | None, columns: list[str]
) -> None:
    # With --by or --window and no call, the header was dimension,value,...
    calls = [record(1, DAY1, "acme")]
    for records in (calls, []):
        header = render_csv(build_report(records, by=by, window=window))
        assert header.splitlines()[0].split(",")[: len(columns) + 1] == [
            *columns,
            "calls",
        ]


def test_csv_gives_usd_as_exact_decimals() -> None:
    # Through a float: 5e-05, and 123456789012.34567 for ...012.345678.
    calls = [
        record(1, DAY1, "tiny", cost=50),
        record(2, DAY1, "huge", cost=123_456_789_012_345_678),
        record(3, DAY1, "round", cost=10_000),
    ]
    rows = csv.DictReader(io.StringIO(render_csv(build_report(calls, by=("tenant",)))))
    assert {r["tenant"]: r["cost_usd"] for r in rows} == {
        "tiny": "0.00005",
        "huge": "123456789012.345678",
        "round": "0.01",
    }
