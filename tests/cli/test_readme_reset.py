"""README, "``allowance status`` and ``allowance reset``": what a prefix deletes.

"``reset`` deletes counters (and threshold markers) whose key starts with a
prefix, keeping the call log: the prefix matches text, so ``usd:tenant=acme``
also matches ``usd:tenant=acme-corp``, and the counters it would delete are
named before it asks for confirmation."

The ``allowance`` command runs in a real process on a real SQLite file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import allowance
from allowance import Budget, Estimate, Guard, Policy, Threshold, Usage, open_ledger


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "allowance._cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def spend(url: str, tenants: tuple[str, ...]) -> None:
    guard = Guard(budget="$1", per="tenant", ledger=url)
    for tenant in tenants:
        with allowance.scope(tenant=tenant):
            guard.begin(Estimate("openai", "gpt-4o", 100, 10)).commit(Usage(100, 10))
    guard.close()


def counters(url: str) -> set[str]:
    ledger = open_ledger(url)
    try:
        return set(ledger.keys())
    finally:
        ledger.close()


def test_the_prefix_matches_text_so_acme_takes_acme_corp(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    spend(url, ("acme", "acme-corp", "globex"))
    assert counters(url) == {
        "usd:tenant=acme",
        "usd:tenant=acme-corp",
        "usd:tenant=globex",
    }
    asked = run_cli(
        "reset", "--ledger", url, "--prefix", "usd:tenant=acme", cwd=tmp_path
    )
    assert asked.returncode == 2  # no terminal, no --yes: refused
    assert "usd:tenant=acme-corp" in asked.stderr  # named before anything happens
    assert "globex" not in asked.stderr
    done = run_cli(
        "reset", "--ledger", url, "--prefix", "usd:tenant=acme", "--yes", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert counters(url) == {"usd:tenant=globex"}
    ledger = open_ledger(url)
    try:
        assert len(ledger.calls()) == 3  # the call log is kept
    finally:
        ledger.close()


def warn_guard(url: str) -> Guard:
    return Guard(
        Policy([Budget(1000, per="tenant", thresholds=[Threshold(0.5, "warn")])]),
        ledger=url,
    )


def cross(guard: Guard) -> list[warnings.WarningMessage]:
    """Spend 600 of 1000 tokens, then begin a call: past the 50% warning."""
    with warnings.catch_warnings(record=True) as caught, allowance.scope(tenant="a"):
        warnings.simplefilter("always")
        guard.begin(Estimate("openai", "gpt-4o", 600, 0)).commit(Usage(600, 0))
        guard.begin(Estimate("openai", "gpt-4o", 1, 0)).commit(Usage(1, 0))
    return [
        w for w in caught if issubclass(w.category, allowance.BudgetThresholdWarning)
    ]


def test_reset_deletes_the_threshold_markers_so_a_warning_fires_again(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    first = warn_guard(url)
    assert len(cross(first)) == 1
    first.close()
    again = warn_guard(url)  # another guard on the same file, same window
    with warnings.catch_warnings(record=True) as caught, allowance.scope(tenant="a"):
        warnings.simplefilter("always")
        again.begin(Estimate("openai", "gpt-4o", 1, 0)).commit(Usage(1, 0))
    assert not [
        w for w in caught if issubclass(w.category, allowance.BudgetThresholdWarning)
    ]  # the marker says it fired already
    again.close()
    done = run_cli(
        "reset", "--ledger", url, "--prefix", "tokens:tenant=a", "--yes", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert counters(url) == set()
    fresh = warn_guard(url)
    assert len(cross(fresh)) == 1, "the marker survived the reset"
    fresh.close()
