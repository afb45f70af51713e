"""What the conformance suites share: the guard against silently skipped tests."""

from __future__ import annotations

__all__ = ["unmarked_overrides"]


def _is_xfail_with_reason(function: object) -> bool:
    marks = getattr(function, "pytestmark", [])
    return any(mark.name == "xfail" and mark.kwargs.get("reason") for mark in marks)


def unmarked_overrides(suite: type, subclass: type) -> list[str]:
    """Name the tests of ``suite`` that ``subclass`` deleted or overrode unmarked.

    An override is allowed when marked ``pytest.mark.xfail(reason=...)``.
    """
    problems = []
    for name, original in vars(suite).items():
        if not name.startswith("test_"):
            continue
        mine = getattr(subclass, name, None)
        if not callable(mine):
            problems.append(f"{name} was deleted")
        elif mine is not original and not _is_xfail_with_reason(mine):
            problems.append(f"{name} is overridden without xfail(reason=...)")
    return problems
