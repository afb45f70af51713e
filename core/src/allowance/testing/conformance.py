"""Conformance suites third-party code subclasses: ledgers and adapters.

- ``LedgerConformance``: every ``allowance.typing.Ledger`` backend.
- ``AdapterConformance``: every adapter, through its real framework or SDK
  against ``FakeProvider``.

Both fail ``test_no_overrides_DO_NOT_OVERRIDE`` when a test is overridden or
deleted without ``pytest.mark.xfail(reason=...)``.
"""

from __future__ import annotations

from allowance.testing._adapter_conformance import AdapterConformance
from allowance.testing._ledger_conformance import (
    LedgerConformance,
    ManualClock,
    hold_until_killed,
    run_reserve_commit_loop,
)

__all__ = [
    "AdapterConformance",
    "LedgerConformance",
    "ManualClock",
    "hold_until_killed",
    "run_reserve_commit_loop",
]
