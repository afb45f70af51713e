"""The ``allowance`` command: ``demo``, ``report``, ``run``, ``status``, ``reset``.

Output goes through rich: it follows the terminal's width and colour support,
and is plain text when piped. Progress and prompts go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from allowance._errors import AllowanceError, ConfigurationError, UsageError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console

    from allowance.typing import KeyState, Unit

__all__ = ["main"]

_LEDGER_HELP = "ledger URL (default: %(default)s)"
_DEFAULT_LEDGER = "sqlite:///allowance.db"
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([mhdw])$")
_SECONDS = {"m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="allowance", description="Keep AI agents inside their budgets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="run the offline demo (real SDKs against a fake provider on 127.0.0.1)",
    )
    _report_parser(commands)
    _run_parser(commands)
    status = commands.add_parser(
        "status", help="show live budget counters (spent, reserved) from a ledger"
    )
    status.add_argument("--ledger", default=_DEFAULT_LEDGER, help=_LEDGER_HELP)
    status.add_argument("--prefix", default="", help="only keys starting with this")
    status.add_argument(
        "--budget",
        help="the limit to show against matching counters ('$5', '50k tokens')",
    )
    status.add_argument("--per", help="with --budget: only counters of this dimension")
    status.add_argument("--format", choices=("table", "json"), default="table")
    reset = commands.add_parser(
        "reset", help="delete budget counters (the call log stays)"
    )
    reset.add_argument("--ledger", default=_DEFAULT_LEDGER, help=_LEDGER_HELP)
    reset.add_argument(
        "--prefix", default="", help="only keys starting with this (default: all)"
    )
    reset.add_argument(
        "--yes", "-y", action="store_true", help="do not ask for confirmation"
    )
    return parser


def _report_parser(commands: Any) -> None:
    report = commands.add_parser(
        "report", help="print spend by scope, window and model from the call log"
    )
    report.add_argument("--ledger", default=_DEFAULT_LEDGER, help=_LEDGER_HELP)
    report.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="DIMENSION",
        help="group by this dimension, or model/provider (repeatable or "
        "comma-separated; default: each dimension seen, on its own)",
    )
    report.add_argument(
        "--window",
        choices=("hour", "day", "week", "month"),
        help="also group by calendar window (UTC)",
    )
    report.add_argument(
        "--since", help="only calls from then: 2026-11-01, 2026-11-01T10:00, or 7d/12h"
    )
    report.add_argument("--until", help="only calls before then (same forms)")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")
    report.add_argument(
        "--html", metavar="PATH", help="also write a self-contained HTML report"
    )
    report.add_argument(
        "--top", type=positive_int, default=10, help="models to list (default 10)"
    )


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0 (argparse names the option)."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        msg = f"expected a whole number above 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return number


def _dimension(option: str, value: str) -> str:
    """A dimension name given on the command line (``--by``, ``--per``)."""
    from allowance._scope import check_name  # noqa: PLC0415

    check_name(option, value)
    return value


def _existing(url: str) -> None:
    """Refuse a SQLite ledger file that does not exist, or is not a ledger.

    ``status``, ``report`` and ``reset`` read what a guarded program wrote:
    opening a mistyped path would create an empty ledger there (and its
    directory) and report nothing; opening another program's database (or
    an empty file) would write a ledger's tables into it.
    """
    from pathlib import Path  # noqa: PLC0415

    from allowance._ledger import sqlite_file  # noqa: PLC0415
    from allowance._ledger._sqlite import is_foreign_database  # noqa: PLC0415

    path = sqlite_file(url)
    if path is None:
        return
    if not Path(path).exists():
        raise ConfigurationError(
            "--ledger",
            url,
            f"an existing ledger: there is no file {path!r} "
            "(status, report and reset read a ledger, and create none)",
        )
    if is_foreign_database(path):
        raise ConfigurationError(
            "--ledger",
            url,
            f"an allowance ledger: {path!r} is not one (a SQLite file without "
            "a ledger's tables; status, report and reset read a ledger, and "
            "create none)",
        )


def _run_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="run a Python program with allowance.patch() applied before it starts",
        description="Run COMMAND with every OpenAI/Anthropic client and installed "
        "framework under a budget. Options default to the ALLOWANCE_* "
        "environment variables. Exit code: the program's, or 3 when "
        "BudgetExceeded ended it.",
    )
    run.add_argument("--budget", help="'$5', '50k tokens' or an int of tokens")
    run.add_argument("--per", help="the budget's dimension (default: run)")
    run.add_argument("--window", choices=("hour", "day", "week", "month"))
    run.add_argument("--ledger", help=f"ledger URL (default: {_DEFAULT_LEDGER})")
    run.add_argument("--fallback", help="cheaper model to degrade to")
    run.add_argument("--threshold", help="ratio at which to degrade (e.g. 0.8)")
    run.add_argument("--on-limit", choices=("raise", "stop", "warn"))
    run.add_argument("--fail", choices=("closed", "open"))
    run.add_argument("--run-id", help="the run's id (default: a new one)")
    run.add_argument("--session", help="the session id (default: a new one)")
    run.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="DIM=VALUE",
        help="more scope dimensions (repeatable)",
    )
    run.add_argument("--adapters", help="adapters to install, comma-separated")
    run.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the program, e.g. -- python agent.py",
    )


def parse_time(text: str | None, *, now: float | None = None) -> float | None:
    """Parse ``--since``/``--until``: ISO date or time (UTC unless told), or ``7d``."""
    if text is None:
        return None
    value = text.strip()
    if match := _RELATIVE.match(value):
        current = time.time() if now is None else now
        return current - float(match.group(1)) * _SECONDS[match.group(2)]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as err:
        raise ConfigurationError(
            "time", text, "an ISO date or time (2026-11-01, 2026-11-01T10:00) or 7d/12h"
        ) from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


_LISTED = 10  # counters named in reset's confirmation


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    from rich.console import Console  # noqa: PLC0415 - keep `import allowance` light
    from rich.text import Text  # noqa: PLC0415

    args = _parser().parse_args(argv)
    console = Console()
    errors = Console(stderr=True)
    logging.basicConfig(
        level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "demo":
            from allowance._demo import run_demo  # noqa: PLC0415

            return run_demo(console)
        if args.command == "run":
            return _run(args)
        _existing(args.ledger)
        if args.command == "status":
            _status(console, args)
            return 0
        if args.command == "reset":
            return _reset(console, errors, args)
        from allowance._report import print_report  # noqa: PLC0415

        by = tuple(
            _dimension("--by", d.strip())
            for item in args.by
            for d in item.split(",")
            if d.strip()
        )
        now = time.time()  # one 'now': --since 1d --until 1d is empty
        since = parse_time(args.since, now=now)
        until = parse_time(args.until, now=now)
        if since is not None and until is not None and until <= since:
            raise ConfigurationError(
                "--until", args.until, f"a time later than --since={args.since}"
            )
        print_report(
            console,
            args.ledger,
            by=by,
            window=args.window,
            since=since,
            until=until,
            fmt=args.format,
            html_path=args.html,
            top=args.top,
            status=errors,
        )
    except AllowanceError as err:  # on stderr: stdout may be a report in a file
        # The message quotes what was typed: text, never markup.
        errors.print(Text.assemble(("error:", "red"), f" {err}"), soft_wrap=True)
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    from allowance._run import run_command  # noqa: PLC0415

    options = {
        "budget": args.budget,
        "per": args.per,
        "window": args.window,
        "ledger": args.ledger,
        "fallback": args.fallback,
        "threshold": args.threshold,
        "on_limit": args.on_limit,
        "fail": args.fail,
        "run_id": args.run_id,
        "session": args.session,
        "scope": ",".join(args.scope) if args.scope else None,
        "adapters": args.adapters,
    }
    return run_command(args.argv, options)


def split_key(key: str) -> dict[str, str]:
    """Split a ledger key into budget name, unit, dimension, value and window."""
    from urllib.parse import unquote  # noqa: PLC0415

    name, slash, rest = key.partition("/")
    if not slash or ":" in name:
        name, rest = "", key
    unit, _, rest = rest.partition(":")
    parts = rest.split(":")
    dimension, _, value = parts[0].partition("=")
    window = ":".join(parts[1:])
    return {
        "name": name,
        "unit": unit,
        "dimension": dimension,
        "value": unquote(value),
        "window": window.replace("=", " "),
    }


def _status(console: Console, args: argparse.Namespace) -> None:  # noqa: C901, PLR0912
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    from allowance._budget import format_amount, parse_limit  # noqa: PLC0415
    from allowance._ledger import open_ledger  # noqa: PLC0415

    limit: tuple[int, Unit] | None = None
    if args.budget is not None:
        limit = parse_limit(args.budget, what="--budget")
    if args.per is not None:
        _dimension("--per", args.per)
    ledger = open_ledger(args.ledger)
    try:
        keys: dict[str, KeyState] = ledger.keys(args.prefix)
    finally:
        ledger.close()
    rows: list[dict[str, Any]] = []
    for key, state in keys.items():
        parts = split_key(key)
        if args.per and parts["dimension"] != args.per:
            continue
        unit = parts["unit"]
        applies = limit is not None and limit[1] == unit
        row: dict[str, Any] = {
            "key": key,
            **parts,
            "spent": state.spent,
            "reserved": state.reserved,
            "used": state.used,
            "limit": limit[0] if applies and limit else None,
        }
        rows.append(row)
    if args.format == "json":
        console.out(json.dumps(rows, indent=2), highlight=False)
        return
    if not rows:
        console.print(
            "No budget counters" + (f" under {args.prefix!r}." if args.prefix else "."),
            markup=False,
            emoji=False,
        )
        return
    table = Table(
        title=Text(f"Budgets in {ledger.url}", style="table.title"),
        title_justify="left",
    )
    cells: list[tuple[Text, Text, Text, Text, str, str, str, str]] = []
    for row in rows:
        shown_unit: Unit = "usd" if row["unit"] == "usd" else "tokens"
        shown_limit = "-"
        used = "-"
        if row["limit"] is not None:
            shown_limit = format_amount(row["limit"], shown_unit)
            ratio = row["used"] / row["limit"] if row["limit"] else 1.0
            colour = "red" if ratio >= 1 else "yellow" if ratio >= 0.8 else "green"  # noqa: PLR2004
            used = f"[{colour}]{ratio:.0%}[/]"
        cells.append(
            (  # what the ledger holds is text, never markup
                Text(row["name"] or "-"),
                Text(row["dimension"]),
                Text(row["value"]),
                Text(row["window"] or "-"),
                format_amount(row["spent"], shown_unit),
                format_amount(row["reserved"], shown_unit),
                shown_limit,
                used,
            )
        )
    amounts = ("spent", "reserved", "limit")
    widths = [
        max(len(name), *(len(cell[4 + i]) for cell in cells))
        for i, name in enumerate(amounts)
    ]
    # No cell is cut ('$0.…'): everything folds, and the amounts stay on one
    # line while the 8 columns' frame (25) leaves the ids and "used" 3 each.
    whole = console.width >= 25 + 5 * 3 + sum(widths)
    for column in ("budget", "dimension", "value", "window"):
        table.add_column(column, overflow="fold")
    for column in (*amounts, "used"):
        no_wrap = whole and column != "used"
        table.add_column(column, justify="right", no_wrap=no_wrap, overflow="fold")
    for cell in cells:
        table.add_row(*cell)
    console.print(table)
    if limit is None:
        console.print(
            "Limits live in your policy, not in the ledger: "
            "pass --budget to compare counters with one.",
            style="dim",
        )


def _reset(console: Console, errors: Console, args: argparse.Namespace) -> int:
    from rich.text import Text  # noqa: PLC0415

    from allowance._ledger import open_ledger  # noqa: PLC0415

    ledger = open_ledger(args.ledger)
    try:
        keys = ledger.keys(args.prefix)
        what = f"{len(keys)} counter{'s' if len(keys) != 1 else ''}" + (
            f" under {args.prefix!r}" if args.prefix else ""
        )
        if not keys:
            console.print(
                f"Nothing to reset in {ledger.url}.", markup=False, emoji=False
            )
            return 0
        # The prefix matches text ('tenant=acme' matches 'tenant=acme-corp'
        # too): name what goes before anything goes.
        shown = list(keys)[:_LISTED]
        what += ": " + ", ".join(shown)
        if len(keys) > len(shown):
            what += f" and {len(keys) - len(shown)} more"
        if not args.yes:
            if not sys.stdin.isatty():
                raise UsageError(
                    f"reset would delete {what} in {ledger.url}; "
                    "not a terminal, so pass --yes to confirm",
                    value=args.prefix,
                    expected="--yes",
                )
            from rich.prompt import Confirm  # noqa: PLC0415

            if not Confirm.ask(
                Text(f"Delete {what} in {ledger.url}?"), console=errors, default=False
            ):
                console.print("Nothing deleted.")
                return 1
        ledger.reset(args.prefix)
    finally:
        ledger.close()
    console.print(
        f"Reset {what} in {ledger.url}. The call log is kept.",
        markup=False,
        emoji=False,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
