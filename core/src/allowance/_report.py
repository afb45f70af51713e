"""Spend reports from a ledger's call log (``allowance report``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from allowance._budget import format_amount
from allowance._ledger import open_ledger

if TYPE_CHECKING:
    from collections.abc import Iterable

    from rich.console import Console

    from allowance.typing import CallRecord, Ledger

__all__ = ["Row", "print_report", "summarise"]


@dataclass(slots=True)
class Row:
    """Totals for one group of calls."""

    name: str
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    unpriced: int = 0
    blocked: int = 0
    degraded: int = 0
    models: set[str] = field(default_factory=set)

    def add(self, record: CallRecord) -> None:
        """Count one call."""
        self.calls += 1
        if record.outcome in {"blocked", "stopped"}:
            self.blocked += 1
            return
        if record.model != record.requested_model:
            self.degraded += 1
        self.input_tokens += record.usage.input_tokens
        self.output_tokens += record.usage.output_tokens
        if record.cost_micros is None:
            self.unpriced += 1
        else:
            self.cost_micros += record.cost_micros
        self.models.add(record.model)


def summarise(records: Iterable[CallRecord], by: str) -> list[Row]:
    """Group calls by a dimension, ``"model"`` or ``"provider"``; costliest first."""
    rows: dict[str, Row] = defaultdict(lambda: Row(""))
    for record in records:
        if by == "model":
            name = record.model
        elif by == "provider":
            name = record.provider
        else:
            name = record.scope.get(by, "-")
        row = rows[name]
        row.name = name
        row.add(record)
    return sorted(rows.values(), key=lambda r: (-r.cost_micros, r.name))


def print_report(
    console: Console,
    ledger: str | Ledger,
    *,
    by: tuple[str, ...] = (),
    since: float | None = None,
    until: float | None = None,
) -> None:
    """Print spend per dimension (every dimension seen, or ``by``) and per model."""
    from rich.table import Table  # noqa: PLC0415 - rich loads only for reports

    opened = open_ledger(ledger)
    try:
        records = opened.calls(since=since, until=until)
    finally:
        if isinstance(ledger, str):
            opened.close()
    if not records:
        console.print("No calls recorded.")
        return
    dimensions = by or tuple(
        sorted({dim for r in records for dim in r.scope} - {"invocation"})
    )
    for dimension in (*dimensions, "model"):
        table = Table(title=f"Spend by {dimension}", title_justify="left")
        table.add_column(dimension)
        for column in (
            "calls",
            "input tok",
            "output tok",
            "USD",
            "blocked",
            "degraded",
        ):
            table.add_column(column, justify="right")
        for row in summarise(records, dimension):
            usd = format_amount(row.cost_micros, "usd") + ("*" if row.unpriced else "")
            table.add_row(
                row.name,
                str(row.calls),
                f"{row.input_tokens:,}",
                f"{row.output_tokens:,}",
                usd,
                str(row.blocked),
                str(row.degraded),
            )
        console.print(table)
    total = summarise(records, "provider")
    cost = sum(r.cost_micros for r in total)
    blocked = sum(r.blocked for r in total)
    console.print(
        f"{len(records)} calls, {format_amount(cost, 'usd')} spent, "
        f"{blocked} refused before sending."
    )
