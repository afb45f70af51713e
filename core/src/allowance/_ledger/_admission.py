"""The admission rule every ledger backend applies, as pure functions.

The memory and SQLite backends call these inside their critical section; the
Redis backend mirrors them in Lua. Keep the three in step: the conformance
suite and the property tests compare the backends on the same steps.

Rule, for one plan: first fold its items per key (a key named twice in one
plan holds the sum of its amounts, under the smallest of its limits and the
smallest of its gates), then every folded key must satisfy
``spent + reserved + amount <= limit`` and, when it has a gate,
``spent + reserved <= gate``. The first plan (in order) that fits is chosen.
A plan with no items always fits; an empty list of plans never does.
"""

from __future__ import annotations

from math import isfinite
from typing import TYPE_CHECKING

from allowance._errors import ConfigurationError, UsageError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from allowance.typing import KeyState, ReserveItem

_AMOUNT = "an int >= 0 (tokens or micro-dollars)"

__all__ = [
    "check_amounts",
    "check_lease",
    "check_plans",
    "choose_plan",
    "fold_amounts",
    "fold_plan",
    "known_id",
    "plan_keys",
]


def known_id(reservation_id: str, url: str) -> UsageError:
    """The error of a reservation id the ledger at ``url`` already knows."""
    msg = (
        f"reservation_id={reservation_id!r} is already known to the"
        f" ledger {url}: every reservation needs a fresh id"
    )
    return UsageError(msg, value=reservation_id, expected="a fresh id")


def check_plans(plans: Sequence[Sequence[ReserveItem]]) -> None:
    """Reject plans a ledger cannot hold: amounts that are not ints >= 0.

    Args:
        plans: The plans given to ``Ledger.reserve``.

    Raises:
        ConfigurationError: An amount or limit is not an int, or an amount is
            negative.
    """
    for plan in plans:
        for item in plan:
            problem = _problem(item)
            if problem is not None:
                raise ConfigurationError(*problem)


def check_amounts(amounts: Mapping[str, int]) -> None:
    """Reject commit amounts that are not ints >= 0.

    Args:
        amounts: The per-key charges given to ``Ledger.commit``.

    Raises:
        ConfigurationError: An amount is not an int or is negative.
    """
    for key, amount in amounts.items():
        if type(amount) is not int or amount < 0:
            what = f"amount of {key!r}"
            raise ConfigurationError(what, amount, _AMOUNT)


def check_lease(lease_seconds: float) -> None:
    """Reject a lease that is not a finite number of seconds above zero.

    Raises:
        ConfigurationError: ``lease_seconds`` is not finite and positive.
    """
    # Callers are typed, but a ledger must never store a NaN expiry.
    valid = isinstance(lease_seconds, int | float)
    if not valid or not isfinite(lease_seconds) or lease_seconds <= 0:
        what, expected = "lease_seconds", "a finite number of seconds > 0"
        raise ConfigurationError(what, lease_seconds, expected)


def plan_keys(plans: Sequence[Sequence[ReserveItem]]) -> list[str]:
    """Return every key named in any plan, once each, in order of appearance."""
    return list(dict.fromkeys(item.key for plan in plans for item in plan))


def fold_plan(plan: Sequence[ReserveItem]) -> dict[str, tuple[int, int, int | None]]:
    """Fold one plan per key into ``(amount, limit, gate)``.

    Amounts of a key named twice add up; the smallest limit and the smallest
    gate apply (a missing gate imposes nothing).
    """
    folded: dict[str, tuple[int, int, int | None]] = {}
    for item in plan:
        seen = folded.get(item.key)
        if seen is None:
            folded[item.key] = (item.amount, item.limit, item.gate)
            continue
        amount, limit, gate = seen
        if item.gate is not None and (gate is None or item.gate < gate):
            gate = item.gate
        folded[item.key] = (amount + item.amount, min(limit, item.limit), gate)
    return folded


def fold_amounts(plan: Sequence[ReserveItem]) -> dict[str, int]:
    """Return what a plan holds per key (amounts of a repeated key add up)."""
    holds: dict[str, int] = {}
    for item in plan:
        holds[item.key] = holds.get(item.key, 0) + item.amount
    return holds


def choose_plan(
    plans: Sequence[Sequence[ReserveItem]], states: Mapping[str, KeyState]
) -> int | None:
    """Return the index of the first plan that fits, or None when none does.

    Args:
        plans: Alternatives in order of preference.
        states: The current state of every key the plans name; a key missing
            from the mapping counts as never used.

    Returns:
        The index of the chosen plan, or None.
    """
    for index, plan in enumerate(plans):
        if _fits(plan, states):
            return index
    return None


def _fits(plan: Sequence[ReserveItem], states: Mapping[str, KeyState]) -> bool:
    if len(plan) == 1:
        # The common case: one key, nothing to fold.
        item = plan[0]
        state = states.get(item.key)
        used = 0 if state is None else state.spent + state.reserved
        if used + item.amount > item.limit:
            return False
        return item.gate is None or used <= item.gate
    for key, (amount, limit, gate) in fold_plan(plan).items():
        state = states.get(key)
        used = 0 if state is None else state.spent + state.reserved
        if used + amount > limit:
            return False
        if gate is not None and used > gate:
            return False
    return True


def _problem(item: ReserveItem) -> tuple[str, object, str] | None:
    """Return what is wrong with an item as ConfigurationError arguments."""
    if type(item.amount) is not int or item.amount < 0:
        return f"amount of {item.key!r}", item.amount, _AMOUNT
    if type(item.limit) is not int:
        return f"limit of {item.key!r}", item.limit, "an int"
    if item.gate is not None and type(item.gate) is not int:
        return f"gate of {item.key!r}", item.gate, "an int or None"
    return None
