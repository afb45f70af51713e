"""The ``allowance`` command: ``demo`` and ``report``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from allowance._errors import AllowanceError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="allowance", description="Keep AI agents inside their budgets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="run the offline demo (real SDKs against a fake provider on 127.0.0.1)",
    )
    report = commands.add_parser(
        "report", help="print spend by scope from a ledger's call log"
    )
    report.add_argument(
        "--ledger",
        default="sqlite:///allowance.db",
        help="ledger URL (default: %(default)s)",
    )
    report.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="DIMENSION",
        help="group by this dimension (repeatable; default: every one seen)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    from rich.console import Console  # noqa: PLC0415 - keep `import allowance` light

    args = _parser().parse_args(argv)
    console = Console()
    logging.basicConfig(
        level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "demo":
            from allowance._demo import run_demo  # noqa: PLC0415

            return run_demo(console)
        from allowance._report import print_report  # noqa: PLC0415

        print_report(console, args.ledger, by=tuple(args.by))
    except AllowanceError as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
