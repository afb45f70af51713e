"""Run by Python at start-up under ``allowance run``: guard the program's calls.

``allowance run`` puts this directory first on ``PYTHONPATH``; Python imports
``sitecustomize`` before the program's first line, and this one applies
``allowance.patch()`` from the ``ALLOWANCE_*`` environment variables, then
hands over to any other ``sitecustomize`` on the path.
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
        sys.stderr.write(
            f"allowance run: cannot import allowance in {sys.executable} ({err}); "
            "this program runs WITHOUT a budget\n"
        )
        return
    bootstrap()


_guard()
_chain()
