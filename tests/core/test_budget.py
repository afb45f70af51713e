"""Budget limits, windows and ledger keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from allowance import Budget, Threshold
from allowance._budget import escape_value, format_amount, parse_limit


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$2.00", (2_000_000, "usd")),
        ("$2", (2_000_000, "usd")),
        ("$0.000001", (1, "usd")),
        ("$ 0.5", (500_000, "usd")),
        ("$.25", (250_000, "usd")),
        (50_000, (50_000, "tokens")),
        (0, (0, "tokens")),
        ("50k tokens", (50_000, "tokens")),
        ("1.5M tokens", (1_500_000, "tokens")),
        ("2m", (2_000_000, "tokens")),
        ("1 token", (1, "tokens")),
        ("  750 tokens ", (750, "tokens")),
    ],
)
def test_limits_parse_to_integers(value: object, expected: tuple[int, str]) -> None:
    assert parse_limit(value) == expected


def test_amounts_format_for_people() -> None:
    assert format_amount(2_500_000, "usd") == "$2.50"
    assert format_amount(1, "usd") == "$0.000001"
    assert format_amount(12_345, "tokens") == "12,345 tokens"


@pytest.mark.parametrize(
    ("micros", "shown"),
    [
        (0, "$0.00"),
        (50, "$0.00005"),
        (7_500, "$0.0075"),
        (1_000_000, "$1.00"),
        (3_703_703_670, "$3703.70367"),
        (-500_000, "$-0.50"),
        # Through a float these were $123456789012.345673 and $100000000000.00
        (123_456_789_012_345_678, "$123456789012.345678"),
        (99_999_999_999_999_999, "$99999999999.999999"),
    ],
)
def test_usd_amounts_format_exactly(micros: int, shown: str) -> None:
    assert format_amount(micros, "usd") == shown


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("window", "moment", "label"),
    [
        ("hour", "2026-11-22T10:59:59", "hour=2026-11-22T10"),
        ("day", "2026-11-22T23:59:59", "day=2026-11-22"),
        ("week", "2026-11-22T12:00:00", "week=2026-W47"),  # a Sunday: ISO week 47
        ("week", "2026-11-23T00:00:00", "week=2026-W48"),
        ("month", "2026-12-31T23:00:00", "month=2026-12"),
        ("month", "2027-01-01T00:00:00", "month=2027-01"),
    ],
)
def test_windows_are_calendar_aligned_in_utc(
    window: str, moment: str, label: str
) -> None:
    budget = Budget("$1", per="tenant", window=window)  # type: ignore[arg-type]
    assert budget.key({"tenant": "acme"}, ts(moment)) == f"usd:tenant=acme:{label}"


def test_a_new_window_is_a_new_key_and_the_end_is_known() -> None:
    budget = Budget(100, per="user", window="day")
    before = budget.key({"user": "u"}, ts("2026-11-22T23:59:59"))
    after = budget.key({"user": "u"}, ts("2026-11-23T00:00:00"))
    assert before != after
    assert budget.window_end(ts("2026-11-22T05:00:00")) == ts("2026-11-23T00:00:00")
    assert Budget(100).window_end(0.0) is None


def test_time_zones_move_the_boundary_and_name_the_window() -> None:
    budget = Budget("$1", per="tenant", window="day", tz="Asia/Tokyo")
    # 16:00 UTC is 01:00 the next day in Tokyo.
    key = budget.key({"tenant": "a"}, ts("2026-11-22T16:00:00"))
    assert key == "usd:tenant=a:day@Asia/Tokyo=2026-11-23"


def test_a_dst_day_lasts_23_hours() -> None:
    budget = Budget("$1", per="t", window="day", tz="Europe/Paris")
    start = ts("2026-03-28T23:00:00")  # midnight in Paris, 29 March: clocks go forward
    assert budget.window_end(start + 1) - start == 23 * 3600  # type: ignore[operator]


def test_named_budgets_keep_separate_counters() -> None:
    scope = {"tenant": "acme"}
    assert Budget("$1", per="tenant", name="hard").key(scope, 0).startswith("hard/")
    assert Budget("$1", per="tenant").key(scope, 0) == "usd:tenant=acme"


def test_escaping_is_reversible_in_spirit_and_keeps_plain_values() -> None:
    assert escape_value("acme") == "acme"
    assert escape_value("a:b") == "a%3Ab"
    assert escape_value("a b") == "a%20b"
    assert escape_value("ü") == "ü"
    assert escape_value("%3A") != escape_value(":")


def test_thresholds_are_sorted_and_the_repr_reads_back() -> None:
    budget = Budget(
        "$2",
        per="run",
        window="day",
        thresholds=[Threshold(0.9, "block"), Threshold(0.5)],
    )
    assert [t.at for t in budget.thresholds] == [0.5, 0.9]
    assert repr(budget).startswith("Budget(\"$2.00\", per='run', window='day'")
    assert budget.label == "$2.00 per run per day"
