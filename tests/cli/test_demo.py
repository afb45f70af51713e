"""``allowance demo`` in a directory whose name a URL would misread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from allowance import open_ledger
from allowance._ledger import sqlite_file


def test_the_demo_ledger_is_where_it_says_whatever_the_directory(
    tmp_path: Path,
) -> None:
    # The URL was built from the working directory unescaped: under 'run#1'
    # the demo failed, under '100%25' and 'what?' the file went elsewhere.
    here = tmp_path / "run#1 100%25 what? [b]x"
    here.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "allowance._cli", "demo"],
        capture_output=True,
        text=True,
        cwd=here,
        env={**os.environ, "COLUMNS": "400"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    path = here / "allowance-demo.db"
    assert f"one ledger at {path}" in result.stdout
    url = result.stdout.rpartition("allowance report --ledger ")[2].split()[0]
    assert sqlite_file(url) == str(path)
    ledger = open_ledger(url)
    try:
        assert ledger.calls()
    finally:
        ledger.close()
    assert [p.name for p in tmp_path.iterdir()] == [here.name]
