"""Run by Python at start-up under ``allowance run``: guard the program's calls.

``allowance run`` puts this directory first on ``PYTHONPATH``; Python imports
``sitecustomize`` before the program's first line, and this one applies
``allowance.patch()`` from the ``ALLOWANCE_*`` environment variables, then
hands over to any other ``sitecustomize`` on the path. A Python that cannot
import allowance ends with exit code 2 before the program starts, unless
``ALLOWANCE_FAIL=open``.
"""

from __future__ import annotations

import importlib
import os
import sys


def _chain() -> None:
    """Import the ``sitecustomize`` this one shadows, if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))  # noqa: PTH100, PTH120
    mine = sys.modules.pop("sitecustomize", None)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # noqa: PTH100
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        if mine is not None:
            sys.modules["sitecustomize"] = mine


def _guard() -> None:
    try:
        from allowance._run import bootstrap  # noqa: PLC0415
    except ImportError as err:
        # Another interpreter (a venv without allowance, a system Python): it
        # cannot be guarded. ``fail`` decides, as for a ledger that fails.
        where = f"allowance run: cannot import allowance in {sys.executable} ({err})"
        if os.environ.get("ALLOWANCE_FAIL", "").strip() == "open":
            sys.stderr.write(f"{where}; fail=open: it runs WITHOUT a budget\n")
            return
        sys.stderr.write(
            f"{where}: install allowance in this interpreter, or pass --fail open "
            "to run it without a budget\n"
        )
        sys.stderr.flush()
        os._exit(2)
    bootstrap()


_guard()
_chain()
