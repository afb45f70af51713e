"""The conformance suites refuse a test overridden or deleted without a reason."""

from __future__ import annotations

import pytest

from allowance.testing._suite import unmarked_overrides
from allowance.testing.conformance import AdapterConformance, LedgerConformance


@pytest.mark.parametrize("suite", [AdapterConformance, LedgerConformance])
def test_unmarked_overrides_are_named(suite: type) -> None:
    name = next(
        n
        for n in vars(suite)
        if n.startswith("test_") and n != "test_no_overrides_DO_NOT_OVERRIDE"
    )

    def quiet(self: object) -> None:
        pass

    sloppy = type("Sloppy", (suite,), {name: quiet})
    assert unmarked_overrides(suite, sloppy) == [
        f"{name} is overridden without xfail(reason=...)"
    ]

    marked = type(
        "Marked", (suite,), {name: pytest.mark.xfail(reason="differs")(quiet)}
    )
    assert unmarked_overrides(suite, marked) == []

    deleted = type("Deleted", (suite,), {name: None})
    assert unmarked_overrides(suite, deleted) == [f"{name} was deleted"]
