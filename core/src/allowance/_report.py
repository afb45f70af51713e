"""Spend reports from a ledger's call log (``allowance report``).

Calls are grouped by any scope dimensions (``--by tenant --by user``), by
``model`` or ``provider``, and optionally by calendar window (UTC ``hour``,
``day``, ``week``, ``month``). Output: rich tables (``table``), ``json`` or
``csv`` on stdout, and a self-contained HTML page (inline SVG charts, no
scripts, no network) with the spend over time of every budget dimension.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from allowance._budget import MICROS_PER_USD, format_amount
from allowance._errors import ConfigurationError
from allowance._ledger import open_ledger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from rich.console import Console

    from allowance.typing import CallRecord, Ledger

__all__ = [
    "Report",
    "Row",
    "build_report",
    "print_report",
    "read_calls",
    "render_csv",
    "render_html",
    "render_json",
    "summarise",
    "window_start",
]

Window = Literal["hour", "day", "week", "month"]
WINDOWS: tuple[Window, ...] = ("hour", "day", "week", "month")
Format = Literal["table", "json", "csv"]
_BLOCKED = frozenset({"blocked", "stopped"})
_MAX_LISTED = 100
_MAX_TABLE_ROWS = 50
"""Rows of a spend table in the terminal: the top spenders; csv/json list all."""
_MAX_SERIES = 8
_MAX_BUCKETS = 400
_PALETTE = (
    "#2563eb",
    "#dc2626",
    "#16a34a",
    "#d97706",
    "#7c3aed",
    "#0891b2",
    "#db2777",
    "#4b5563",
    "#9ca3af",
)


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
        if record.outcome in _BLOCKED:
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

    def as_dict(self) -> dict[str, Any]:
        """Return the totals, JSON-ready (USD as a float of dollars)."""
        return {
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_micros / MICROS_PER_USD,
            "unpriced": self.unpriced,
            "blocked": self.blocked,
            "degraded": self.degraded,
        }


def _value(record: CallRecord, dimension: str) -> str:
    if dimension == "model":
        return record.model
    if dimension == "provider":
        return record.provider
    if dimension == "requested_model":
        return record.requested_model
    return record.scope.get(dimension, "-")


def summarise(records: Iterable[CallRecord], by: str) -> list[Row]:
    """Group calls by a dimension, ``"model"`` or ``"provider"``; costliest first."""
    rows: dict[str, Row] = {}
    for record in records:
        name = _value(record, by)
        row = rows.get(name)
        if row is None:
            row = rows[name] = Row(name)
        row.add(record)
    return sorted(rows.values(), key=lambda r: (-r.cost_micros, r.name))


def window_start(ts: float, window: Window) -> datetime:
    """Return the start (UTC) of the calendar window holding ``ts``."""
    moment = datetime.fromtimestamp(ts, UTC)
    if window == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "day":
        return day
    if window == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _next_window(start: datetime, window: Window) -> datetime:
    if window == "hour":
        return start + timedelta(hours=1)
    if window == "day":
        return start + timedelta(days=1)
    if window == "week":
        return start + timedelta(days=7)
    if start.month == 12:  # noqa: PLR2004 - December
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def window_label(start: datetime, window: Window) -> str:
    """Name a window as ledger keys do: ``2026-11-22T10``, ``2026-W47``, ..."""
    if window == "hour":
        return start.strftime("%Y-%m-%dT%H")
    if window == "day":
        return start.strftime("%Y-%m-%d")
    if window == "week":
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}"
    return start.strftime("%Y-%m")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class Report:
    """Everything ``allowance report`` shows, computed once from the call log."""

    by: tuple[str, ...]
    window: Window | None
    records: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    total: Row = field(default_factory=lambda: Row("total"))
    groups: dict[tuple[str, ...], Row] = field(default_factory=dict)
    per_dimension: dict[str, dict[str, Row]] = field(default_factory=dict)
    models: dict[tuple[str, str], Row] = field(default_factory=dict)
    blocked: list[CallRecord] = field(default_factory=list)
    degraded: list[CallRecord] = field(default_factory=list)
    blocked_count: int = 0
    degraded_count: int = 0
    # dimension -> identifier -> window start -> cost (micros), for the charts
    series: dict[str, dict[str, dict[float, int]]] = field(default_factory=dict)
    chart_window: Window = "day"

    def group_columns(self) -> list[str]:
        """The key columns of ``groups``: the window (if any), then ``by``."""
        return (["window"] if self.window else []) + list(self.by)

    def sorted_groups(self) -> list[tuple[tuple[str, ...], Row]]:
        """Groups by window (oldest first), then costliest first."""
        if self.window:
            return sorted(
                self.groups.items(),
                key=lambda kv: (kv[0][0], -kv[1].cost_micros, kv[0]),
            )
        return sorted(self.groups.items(), key=lambda kv: (-kv[1].cost_micros, kv[0]))

    def top_models(self, top: int) -> list[tuple[tuple[str, str], Row]]:
        """The costliest ``top`` (provider, model) pairs."""
        ranked = sorted(
            self.models.items(),
            key=lambda kv: (-kv[1].cost_micros, -kv[1].calls, kv[0]),
        )
        return ranked[:top]


def _chart_window(first: float, last: float) -> Window:
    span = last - first
    if span <= 2 * 86_400:
        return "hour"
    if span <= 120 * 86_400:
        return "day"
    if span <= 2 * 365 * 86_400:
        return "week"
    return "month"


def build_report(  # noqa: C901, PLR0912, PLR0915 - one pass over the log
    records: Sequence[CallRecord],
    *,
    by: tuple[str, ...] = (),
    window: Window | None = None,
    advance: Callable[[int], object] | None = None,
) -> Report:
    """Aggregate ``records`` (oldest first) into a ``Report``.

    Args:
        records: The call log.
        by: Dimensions to group by; default every scope dimension seen (the
            ``invocation`` dimension aside), each on its own.
        window: Also group by this calendar window (UTC).
        advance: Called with a count of records done, for progress bars.
    """
    if window is not None and window not in WINDOWS:
        raise ConfigurationError("window", window, f"one of {', '.join(WINDOWS)}")
    dims = by or tuple(
        sorted({dim for r in records for dim in r.scope} - {"invocation"})
    )
    report = Report(by=tuple(by), window=window)
    if records:
        report.first_ts = min(r.ts for r in records)
        report.last_ts = max(r.ts for r in records)
        report.chart_window = window or _chart_window(report.first_ts, report.last_ts)
    per_dimension: dict[str, dict[str, Row]] = {d: {} for d in dims}
    series: dict[str, dict[str, dict[float, int]]] = {
        d: defaultdict(lambda: defaultdict(int)) for d in dims
    }
    step = max(1, len(records) // 100)
    for index, record in enumerate(records, 1):
        report.records += 1
        report.total.add(record)
        start = window_start(record.ts, report.chart_window).timestamp()
        cost = record.cost_micros or 0
        for dim in dims:
            value = _value(record, dim)
            row = per_dimension[dim].get(value)
            if row is None:
                row = per_dimension[dim][value] = Row(value)
            row.add(record)
            if record.outcome not in _BLOCKED:
                series[dim][value][start] += cost
        if by:
            key = tuple(_value(record, d) for d in by)
            if window:
                key = (window_label(window_start(record.ts, window), window), *key)
            group = report.groups.get(key)
            if group is None:
                group = report.groups[key] = Row(" / ".join(key))
            group.add(record)
        elif window:
            key = (window_label(window_start(record.ts, window), window),)
            group = report.groups.get(key)
            if group is None:
                group = report.groups[key] = Row(key[0])
            group.add(record)
        model_key = (record.provider, record.model)
        model_row = report.models.get(model_key)
        if model_row is None:
            model_row = report.models[model_key] = Row(record.model)
        model_row.add(record)
        if record.outcome in _BLOCKED:
            report.blocked_count += 1
            report.blocked.append(record)
            del report.blocked[:-_MAX_LISTED]
        elif record.model != record.requested_model:
            report.degraded_count += 1
            report.degraded.append(record)
            del report.degraded[:-_MAX_LISTED]
        if advance is not None and index % step == 0:
            advance(step)
    report.per_dimension = per_dimension
    report.series = {d: {k: dict(v) for k, v in s.items()} for d, s in series.items()}
    return report


def read_calls(
    ledger: str | Ledger, *, since: float | None = None, until: float | None = None
) -> list[CallRecord]:
    """Read the call log of ``ledger`` (a URL is opened and closed)."""
    opened = open_ledger(ledger)
    try:
        return opened.calls(since=since, until=until)
    finally:
        if isinstance(ledger, str):
            opened.close()


# -- text output --------------------------------------------------------------------


def _usd(row: Row) -> str:
    return format_amount(row.cost_micros, "usd") + ("*" if row.unpriced else "")


def _scope_text(record: CallRecord) -> str:
    return ", ".join(
        f"{k}={v}" for k, v in sorted(record.scope.items()) if k != "invocation"
    )


def print_report(
    console: Console,
    ledger: str | Ledger,
    *,
    by: tuple[str, ...] = (),
    window: Window | None = None,
    since: float | None = None,
    until: float | None = None,
    fmt: Format = "table",
    html_path: str | None = None,
    top: int = 10,
    status: Console | None = None,
) -> None:
    """Print a spend report of ``ledger``'s call log on ``console``.

    Args:
        console: Where the report goes (stdout).
        ledger: A ledger URL or object.
        by: Dimensions to group by (default every one seen, each on its own).
        window: Also group by this calendar window.
        since: Only calls at or after this Unix time.
        until: Only calls before this Unix time.
        fmt: ``table``, ``json`` or ``csv``.
        html_path: Also write a self-contained HTML page here.
        top: How many models to list.
        status: Where progress goes (stderr); shown only on a terminal.
    """
    if fmt not in {"table", "json", "csv"}:
        raise ConfigurationError("format", fmt, "table, json or csv")
    report = _build_with_progress(
        status=status, ledger=ledger, by=by, window=window, since=since, until=until
    )
    if html_path is not None:
        from pathlib import Path  # noqa: PLC0415 - loaded only when used

        try:
            Path(html_path).write_text(render_html(report, top=top), encoding="utf-8")
        except OSError as err:
            raise ConfigurationError(
                "--html", html_path, f"a file that can be written ({err.strerror})"
            ) from err
        if status is not None:
            status.print(f"wrote {html_path}", markup=False, emoji=False)
    if fmt == "json":
        console.out(render_json(report, top=top), highlight=False)
    elif fmt == "csv":
        console.out(render_csv(report), end="", highlight=False)
    else:
        _print_tables(console, report, top=top)


def _build_with_progress(
    *,
    status: Console | None,
    ledger: str | Ledger,
    by: tuple[str, ...],
    window: Window | None,
    since: float | None,
    until: float | None,
) -> Report:
    if status is None or not status.is_terminal:
        return build_report(
            read_calls(ledger, since=since, until=until), by=by, window=window
        )
    from rich.progress import (  # noqa: PLC0415 - loaded only when used
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=status,
        transient=True,
    ) as progress:
        reading = progress.add_task("reading the call log", total=None)
        records = read_calls(ledger, since=since, until=until)
        progress.update(reading, total=len(records), completed=len(records))
        task = progress.add_task("summarising calls", total=len(records))
        report = build_report(
            records,
            by=by,
            window=window,
            advance=lambda n: progress.advance(task, n),
        )
        progress.update(task, completed=len(records))
    return report


def _print_tables(  # noqa: C901 - tables of each kind
    console: Console, report: Report, *, top: int
) -> None:
    from rich.table import Table  # noqa: PLC0415 - loaded only when used
    from rich.text import Text  # noqa: PLC0415 - ids and models, never markup

    if not report.records:
        console.print("No calls recorded.")
        return
    columns = ("calls", "input tok", "output tok", "USD", "blocked", "degraded")

    def add_numbers(table: Table) -> None:
        for column in columns:  # a cell is never cut: digits fold, USD stays whole
            table.add_column(
                column, justify="right", no_wrap=column == "USD", overflow="fold"
            )

    def numbers(row: Row) -> list[str]:
        return [
            str(row.calls),
            f"{row.input_tokens:,}",
            f"{row.output_tokens:,}",
            _usd(row),
            str(row.blocked),
            str(row.degraded),
        ]

    if report.groups:
        keys = report.group_columns()
        title = "Spend by " + ", ".join(report.by or ("window",))
        if report.window and report.by:
            title += f" per {report.window}"
        table = Table(title=title, title_justify="left")
        for key in keys:
            table.add_column(key, overflow="fold")  # ids differ at the end
        add_numbers(table)
        groups = report.sorted_groups()
        for key_values, row in groups[:_MAX_TABLE_ROWS]:
            table.add_row(*map(Text, key_values), *numbers(row))
        console.print(table)
        _print_more(console, len(groups))
    else:
        for dimension, rows in report.per_dimension.items():
            table = Table(title=f"Spend by {dimension}", title_justify="left")
            table.add_column(dimension, overflow="fold")
            add_numbers(table)
            ranked = sorted(rows.values(), key=lambda r: (-r.cost_micros, r.name))
            for row in ranked[:_MAX_TABLE_ROWS]:
                table.add_row(Text(row.name), *numbers(row))
            console.print(table)
            _print_more(console, len(ranked))
    table = Table(title="Spend by model", title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("provider", overflow="fold")
    add_numbers(table)
    for (provider, model), row in report.top_models(top):
        table.add_row(Text(model), Text(provider), *numbers(row))
    console.print(table)
    _print_calls(console, report)
    console.print(
        f"{report.records} calls, {format_amount(report.total.cost_micros, 'usd')} "
        f"spent, {report.blocked_count} refused before sending"
        + (f", {report.degraded_count} degraded." if report.degraded_count else ".")
    )
    if report.total.unpriced:
        console.print("* some calls have no known price; they are counted as $0.")


def _print_more(console: Console, rows: int) -> None:
    """Say how many rows a table left out (the terminal shows the top spenders)."""
    if rows > _MAX_TABLE_ROWS:
        console.print(
            f"... and {rows - _MAX_TABLE_ROWS:,} more rows, smaller spenders"
            " (--format csv or json lists every row)."
        )


def _print_calls(console: Console, report: Report) -> None:
    from rich.table import Table  # noqa: PLC0415 - loaded only when used
    from rich.text import Text  # noqa: PLC0415

    for title, records, count in (
        ("Blocked calls", report.blocked, report.blocked_count),
        ("Degraded calls", report.degraded, report.degraded_count),
    ):
        if not records:
            continue
        shown = records[-5:]
        table = Table(
            title=f"{title} (latest {len(shown)} of {count})", title_justify="left"
        )
        for column in ("time (UTC)", "scope", "model", "outcome"):
            table.add_column(column, overflow="fold")
        for record in reversed(shown):
            model = (
                f"{record.requested_model} -> {record.model}"
                if record.model != record.requested_model
                else record.model
            )
            table.add_row(
                _iso(record.ts),
                Text(_scope_text(record)),
                Text(model),
                Text(record.outcome),
            )
        console.print(table)


def _call_dict(record: CallRecord) -> dict[str, Any]:
    return {
        "call_id": record.call_id,
        "time": _iso(record.ts),
        "scope": dict(record.scope),
        "provider": record.provider,
        "requested_model": record.requested_model,
        "model": record.model,
        "outcome": record.outcome,
    }


def render_json(report: Report, *, top: int = 10) -> str:
    """Return the report as JSON (USD as floats of dollars)."""
    keys = report.group_columns()
    payload: dict[str, Any] = {
        "window": report.window,
        "by": list(report.by),
        "first_call": _iso(report.first_ts) if report.first_ts is not None else None,
        "last_call": _iso(report.last_ts) if report.last_ts is not None else None,
        "totals": report.total.as_dict(),
        "groups": [
            {**dict(zip(keys, key, strict=True)), **row.as_dict()}
            for key, row in report.sorted_groups()
        ],
        "dimensions": {
            dim: [
                {"value": row.name, **row.as_dict()}
                for row in sorted(rows.values(), key=lambda r: (-r.cost_micros, r.name))
            ]
            for dim, rows in report.per_dimension.items()
        },
        "top_models": [
            {"provider": provider, "model": model, **row.as_dict()}
            for (provider, model), row in report.top_models(top)
        ],
        "blocked": {
            "count": report.blocked_count,
            "latest": [_call_dict(r) for r in report.blocked],
        },
        "degraded": {
            "count": report.degraded_count,
            "latest": [_call_dict(r) for r in report.degraded],
        },
    }
    return json.dumps(payload, indent=2)


def render_csv(report: Report) -> str:
    """Return the groups as CSV (one row per dimension value without ``--by``)."""
    out = io.StringIO()
    numbers = list(Row("").as_dict())
    writer = csv.writer(out, lineterminator="\n")
    if report.by or report.window:  # the columns asked for, even with no call
        writer.writerow([*report.group_columns(), *numbers])
        for key, row in report.sorted_groups():
            writer.writerow([*key, *_csv_numbers(row)])
    else:
        writer.writerow(["dimension", "value", *numbers])
        for dim, rows in report.per_dimension.items():
            for row in sorted(rows.values(), key=lambda r: (-r.cost_micros, r.name)):
                writer.writerow([dim, row.name, *_csv_numbers(row)])
    return out.getvalue()


def _csv_numbers(row: Row) -> list[object]:
    """``row.as_dict()``'s values, USD as exact decimal text (no 5e-05)."""
    numbers = row.as_dict()
    numbers["cost_usd"] = format_amount(row.cost_micros, "usd").replace("$", "")
    return list(numbers.values())


# -- HTML ---------------------------------------------------------------------------


def _buckets(report: Report) -> list[float]:
    if report.first_ts is None or report.last_ts is None:
        return []
    window = report.chart_window
    start = window_start(report.first_ts, window)
    end = window_start(report.last_ts, window)
    out: list[float] = []
    while start <= end and len(out) < _MAX_BUCKETS:
        out.append(start.timestamp())
        start = _next_window(start, window)
    return out


def _money(micros: float) -> str:
    dollars = micros / MICROS_PER_USD
    if dollars >= 100:  # noqa: PLR2004 - no cents past $100
        return f"${dollars:,.0f}"
    if dollars >= 1:
        return f"${dollars:,.2f}"
    return f"${dollars:.4f}".rstrip("0").rstrip(".")


def _nice_ceiling(value: float) -> float:
    """Round up to 1, 2, 2.5 or 5 times a power of ten (readable axis ticks)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power  # pragma: no cover - the loop always returns


def _svg_chart(  # noqa: C901 - one drawing
    report: Report, dimension: str, buckets: list[float]
) -> str:
    series = report.series.get(dimension, {})
    totals = sorted(
        ((sum(v.values()), name) for name, v in series.items()), reverse=True
    )
    named = [name for _, name in totals[:_MAX_SERIES]]
    lines: list[tuple[str, list[int]]] = []
    for name in named:
        running, points = 0, []
        for b in buckets:
            running += series[name].get(b, 0)
            points.append(running)
        lines.append((name, points))
    rest = [name for _, name in totals[_MAX_SERIES:]]
    if rest:
        running, points = 0, []
        for b in buckets:
            running += sum(series[n].get(b, 0) for n in rest)
            points.append(running)
        lines.append((f"{len(rest)} others", points))
    width, height, left, right, top, bottom = 960, 300, 70, 200, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = _nice_ceiling(max((p for _, pts in lines for p in pts), default=0))
    count = max(1, len(buckets) - 1)

    def xy(i: int, value: int) -> str:
        x = left + plot_w * (i / count if len(buckets) > 1 else 0.5)
        y = top + plot_h * (1 - value / peak)
        return f"{x:.1f},{y:.1f}"

    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="cumulative spend by {html.escape(dimension)}">'
        ),
        (
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
            'fill="#f9fafb" stroke="#e5e7eb"/>'
        ),
    ]
    for i in range(5):
        value = peak * i / 4
        y = top + plot_h * (1 - i / 4)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#e5e7eb"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" '
            f'class="axis">{_money(value)}</text>'
        )
    window = report.chart_window
    for i in sorted({0, len(buckets) // 2, len(buckets) - 1}):
        if not buckets:
            break
        label = window_label(datetime.fromtimestamp(buckets[i], UTC), window)
        x = float(xy(i, 0).split(",")[0])
        parts.append(
            f'<text x="{x:.1f}" y="{height - bottom + 18}" text-anchor="middle" '
            f'class="axis">{html.escape(label)}</text>'
        )
    for index, (name, points) in enumerate(lines):
        colour = _PALETTE[index % len(_PALETTE)]
        coords = " ".join(xy(i, p) for i, p in enumerate(points))
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2.5" '
            f'points="{coords}"><title>{html.escape(name)}: '
            f"{_money(points[-1] if points else 0)}</title></polyline>"
        )
        if len(points) == 1:
            parts.append(
                f'<circle cx="{xy(0, points[0]).split(",")[0]}" '
                f'cy="{xy(0, points[0]).split(",")[1]}" r="4" fill="{colour}"/>'
            )
        ly = top + 14 + index * 20
        parts.append(
            f'<rect x="{left + plot_w + 14}" y="{ly - 10}" width="12" height="12" '
            f'fill="{colour}"/><text x="{left + plot_w + 32}" y="{ly}" '
            f'class="legend">{html.escape(name[:18])} '
            f"{_money(points[-1] if points else 0)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _html_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;
color:#111827;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#6b7280;margin-bottom:16px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #e5e7eb;border-radius:8px;padding:10px 16px;min-width:140px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;margin:6px 0 12px}
th,td{border-bottom:1px solid #e5e7eb;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f3f4f6}
svg{max-width:100%;height:auto}
.axis{font-size:11px;fill:#6b7280}.legend{font-size:12px;fill:#111827}
"""


def render_html(report: Report, *, top: int = 10) -> str:
    """Return a self-contained HTML page: totals, spend-over-time charts, tables."""
    total = report.total
    span = (
        f"{_iso(report.first_ts)} to {_iso(report.last_ts)}"
        if report.first_ts is not None and report.last_ts is not None
        else "no calls"
    )
    cards = "".join(
        f'<div class="card">{html.escape(label)}<b>{html.escape(value)}</b></div>'
        for label, value in (
            ("spent", _usd(total)),
            ("calls", f"{total.calls:,}"),
            ("tokens", f"{total.input_tokens + total.output_tokens:,}"),
            ("blocked", f"{report.blocked_count:,}"),
            ("degraded", f"{report.degraded_count:,}"),
        )
    )
    sections: list[str] = []
    buckets = _buckets(report)
    for dimension in report.per_dimension:
        sections.append(
            f"<h2>Spend over time by {html.escape(dimension)} "
            f"(cumulative, per {report.chart_window}, UTC)</h2>"
            + _svg_chart(report, dimension, buckets)
        )
        rows = sorted(
            report.per_dimension[dimension].values(),
            key=lambda r: (-r.cost_micros, r.name),
        )
        sections.append(
            _html_table(
                [
                    dimension,
                    "calls",
                    "input tok",
                    "output tok",
                    "USD",
                    "blocked",
                    "degraded",
                ],
                (
                    [
                        r.name,
                        r.calls,
                        f"{r.input_tokens:,}",
                        f"{r.output_tokens:,}",
                        _usd(r),
                        r.blocked,
                        r.degraded,
                    ]
                    for r in rows
                ),
            )
        )
    if report.groups and (report.window or len(report.by) > 1):
        sections.append(
            "<h2>Groups</h2>"
            + _html_table(
                [*report.group_columns(), "calls", "tokens", "USD", "blocked"],
                (
                    [
                        *key,
                        r.calls,
                        f"{r.input_tokens + r.output_tokens:,}",
                        _usd(r),
                        r.blocked,
                    ]
                    for key, r in report.sorted_groups()
                ),
            )
        )
    sections.append(
        "<h2>Top models</h2>"
        + _html_table(
            ["model", "provider", "calls", "tokens", "USD", "degraded to"],
            (
                [
                    model,
                    provider,
                    r.calls,
                    f"{r.input_tokens + r.output_tokens:,}",
                    _usd(r),
                    r.degraded,
                ]
                for (provider, model), r in report.top_models(top)
            ),
        )
    )
    for title, records, count in (
        ("Blocked calls", report.blocked, report.blocked_count),
        ("Degraded calls", report.degraded, report.degraded_count),
    ):
        if records:
            sections.append(
                f"<h2>{title} ({count}, latest {len(records)} shown)</h2>"
                + _html_table(
                    ["time (UTC)", "scope", "requested", "model", "outcome"],
                    (
                        [
                            _iso(r.ts),
                            _scope_text(r),
                            r.requested_model,
                            r.model,
                            r.outcome,
                        ]
                        for r in reversed(records)
                    ),
                )
            )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        "<title>allowance spend report</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>allowance spend report</h1>"
        f'<div class="sub">{html.escape(span)} &middot; {report.records:,} calls'
        "</div>"
        f'<div class="cards">{cards}</div>' + "".join(sections) + "</body></html>\n"
    )
