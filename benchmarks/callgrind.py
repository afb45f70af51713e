"""What the guard adds to a call, counted by a simulated CPU: no machine noise.

Usage: ``uv run noxfile.py -s bench_callgrind`` (or ``python
benchmarks/callgrind.py [scenario ...]``). Needs valgrind (Debian: ``apt-get
install valgrind``).

The timed table (``overhead.py``) moves by tens of µs between runs on a shared
machine, more than most changes to the hot path move it. Here each scenario
runs in its own process under callgrind, which executes the program on a
simulated CPU (instruction caches, data caches, a branch predictor) and counts
what it does: the same code gives the same counts, whatever else the machine
is doing.

Each process imports, warms up 30 rounds with callgrind's instrumentation off
(fast), then switches it on (``callgrind_control -i on``), runs 10 rounds to
fill the simulated caches, then ``--rounds`` rounds of one raw SDK call and
one guarded call against the fake provider (in another process, not
simulated), alternating which goes first, as the timed table does. Each raw
call runs inside ``operator.methodcaller``'s C function and each guarded call
inside ``operator.call``'s: callgrind collects only inside those two
(``--toggle-collect``), and their inclusive costs, divided by the rounds, are
a raw and a guarded call. "added" is their difference: the guarded call's
extra machine instructions, L1 cache misses (instruction and data), last-level
misses, and mispredicted branches (conditional and indirect), and
KCachegrind's cycle estimate over them (``Ir + 10 Bm + 10 L1m + 100 LLm``: a
rough model, not a clock; it overstates a raw call, whose work the CPU
overlaps well). Work on other threads (the write-behind ledger's writer) is
not collected. The simulated caches are fixed (``CACHES``), not the host's,
so the counts compare across machines.
"""

from __future__ import annotations

import argparse
import gc
import operator
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import overhead
from rich.console import Console
from rich.table import Table

from allowance._cli import positive_int  # the CLI's argparse type

if TYPE_CHECKING:
    from collections.abc import Iterable

# The simulated caches: a 32 KiB 8-way L1 for instructions and one for data,
# a 1 MiB 16-way last level (a server core's own L2: 512 KiB to 2 MiB), all
# with 64-byte lines. Between two SDK calls (~6.5M instructions) the guard's
# code and data fall out of L1 and partly out of L2, not out of a shared L3.
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=1048576,16,64")
RAW_WRAPPER = "methodcaller_call"  # the C function each raw call runs inside
GUARDED_WRAPPER = "_operator_call"  # and each guarded call
COLD_WARMUP = 30  # rounds before the simulation starts: imports, pools, caches
WARM_WARMUP = 10  # rounds under simulation before counting: filled caches


Factory = Callable[[overhead.RemoteProvider, Path], Any]


def _guarded(ledger: str, **options: Any) -> Factory:
    def build(fake: overhead.RemoteProvider, tmp: Path) -> Any:
        return overhead.guarded(fake, ledger.format(tmp=tmp), **options)

    return build


def _plain(factory: Callable[[overhead.RemoteProvider], Any]) -> Factory:
    return lambda fake, _: factory(fake)


# name: (label, the guarded client's factory: the fake provider, a directory)
SCENARIOS: dict[str, tuple[str, Factory]] = {
    "nothing": (
        "chat, a do-nothing wrapper (no allowance)",
        _plain(overhead.do_nothing),
    ),
    "least": (
        "chat, the least possible guard (no allowance)",
        _plain(overhead.least_guard),
    ),
    "yardstick": (
        "chat, 1,000 bytecodes of plain Python (no allowance)",
        _plain(overhead.plain_python),
    ),
    "memory": ("chat, memory ledger", _guarded("memory://")),
    "sqlite": ("chat, SQLite ledger", _guarded("sqlite:///{tmp}/bench.db")),
    "behind": (
        "chat, SQLite ledger, write_behind=0.05 (the writer thread not counted)",
        _guarded("sqlite:///{tmp}/bench.db?write_behind=0.05"),
    ),
    "degraded": (
        "chat, memory ledger, degraded (past the threshold)",
        _guarded("memory://", **overhead.DEGRADED),
    ),
}
DEFAULT = ("nothing", "least", "yardstick", "memory", "sqlite", "behind")
# callgrind's events, summed: instructions, L1 misses, last-level misses,
# mispredicted branches (conditional and indirect).
INSTRUCTIONS = ("Ir",)
L1_MISSES = ("I1mr", "D1mr", "D1mw")
LL_MISSES = ("ILmr", "DLmr", "DLmw")
BRANCH_MISSES = ("Bcm", "Bim")
# Columns of the table: (header, the events summed)
COLUMNS = (
    ("instructions", INSTRUCTIONS),
    ("L1 misses", L1_MISSES),
    ("of which instruction", ("I1mr",)),
    ("last-level misses", LL_MISSES),
    ("mispredicted branches", BRANCH_MISSES),
)


def child(scenario: str, rounds: int) -> None:
    """One process's rounds; it waits on stdin while its parent starts the simulation.

    The garbage collector is off while counting, as in the timed table: a
    collection of the SDK's objects would land in whichever call triggered it.
    """
    fake = overhead.RemoteProvider()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = overhead.chat(overhead.sdk_client(fake))
            guarded = overhead.chat(SCENARIOS[scenario][1](fake, Path(tmp)))
            for _ in range(COLD_WARMUP):
                raw()
                guarded()
            print("ready", flush=True)
            sys.stdin.readline()
            for _ in range(WARM_WARMUP):
                raw()
                guarded()
            via = operator.methodcaller("__call__")
            gc.collect()
            gc.disable()
            try:
                for i in range(rounds):
                    if i % 2:
                        via(raw)
                        operator.call(guarded)
                    else:
                        operator.call(guarded)
                        via(raw)
            finally:
                gc.enable()
    finally:
        fake.stop()


@dataclass
class Profile:
    """The inclusive costs of functions in one callgrind output file."""

    events: list[str]
    costs: dict[str, list[int]]
    calls: dict[str, int]

    def per_call(self, function: str, names: Iterable[str]) -> float:
        """The events ``names`` summed, per call of ``function``."""
        total = sum(self.costs[function][self.events.index(n)] for n in names)
        return total / self.calls[function]

    def added(self, names: Iterable[str]) -> float:
        """The events ``names`` a guarded call runs beyond a raw one, per call."""
        return self.per_call(GUARDED_WRAPPER, names) - self.per_call(RAW_WRAPPER, names)

    def estimate(self, function: str) -> float:
        """KCachegrind's cycle estimate per call: Ir + 10 Bm + 10 L1m + 100 LLm."""
        return (
            self.per_call(function, INSTRUCTIONS)
            + 10 * self.per_call(function, BRANCH_MISSES)
            + 10 * self.per_call(function, L1_MISSES)
            + 100 * self.per_call(function, LL_MISSES)
        )


def parse(path: Path, functions: set[str]) -> Profile:  # noqa: C901 - one pass, one format
    """The inclusive costs and call counts of ``functions`` (callgrind's format).

    A function's block holds its self cost lines and, after each ``calls=``
    line, the inclusive cost of that call: their sum is its inclusive cost.
    Its call count is in its callers' ``calls=`` lines to it. Names may be
    compressed: ``fn=(12) name`` the first time, ``fn=(12)`` after.
    """
    names: dict[str, str] = {}
    events: list[str] = []
    positions = 1
    costs: dict[str, list[int]] = {}
    calls = dict.fromkeys(functions, 0)
    current = callee = ""
    after_calls = False

    def name(text: str) -> str:
        text = text.strip()
        if not text.startswith("("):
            return text
        key, _, rest = text[1:].partition(")")
        if rest.strip():
            names[key] = rest.strip()
        return names[key]

    with path.open() as lines:
        for line in lines:
            if line.startswith("events:"):
                events = line.split()[1:]
                costs = {f: [0] * len(events) for f in functions}
            elif line.startswith("positions:"):
                positions = len(line.split()) - 1
            elif line.startswith("fn="):
                current = name(line[3:])
            elif line.startswith("cfn="):
                callee = name(line[4:])
            elif line.startswith("calls="):
                after_calls = True
                if callee in calls:
                    calls[callee] += int(line[6:].split()[0])
            elif line[:1].isdigit() or line[:1] in "+-*":
                if current in costs:
                    values = line.split()[positions:]
                    for index, value in enumerate(values):
                        costs[current][index] += int(value)
                after_calls = False
            elif after_calls:
                msg = f"{path}: expected the cost of a call after calls=, got {line!r}"
                raise ValueError(msg)
    return Profile(events, costs, calls)


def run(scenario: str, rounds: int, out: Path) -> Profile:
    """Run ``scenario`` in a process under callgrind; the profile of its rounds."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--collect-atstart=no",
        f"--toggle-collect={RAW_WRAPPER}",
        f"--toggle-collect={GUARDED_WRAPPER}",
        "--cache-sim=yes",
        "--branch-sim=yes",
        *CACHES,
        f"--callgrind-out-file={out}",
        sys.executable,
        __file__,
        "--child",
        scenario,
        "--rounds",
        str(rounds),
    ]
    log = out.with_suffix(".log")
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdin is not None
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.communicate()
        msg = f"{scenario}: the process under callgrind failed:\n{log.read_text()[-2000:]}"
        raise RuntimeError(msg)
    subprocess.run(
        ["callgrind_control", "--instr=on", str(process.pid)],  # noqa: S607
        check=True,
        capture_output=True,
    )
    process.communicate("go\n")
    if process.returncode != 0:
        msg = (
            f"{scenario}: exit {process.returncode} under callgrind:\n"
            f"{log.read_text()[-2000:]}"
        )
        raise RuntimeError(msg)
    profile = parse(out, {RAW_WRAPPER, GUARDED_WRAPPER})
    for function in (RAW_WRAPPER, GUARDED_WRAPPER):
        if profile.calls[function] != rounds:
            msg = (
                f"{scenario}: {function} ran {profile.calls[function]} times, "
                f"expected {rounds} (the SDK called it too?)"
            )
            raise RuntimeError(msg)
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        help=f"of {', '.join(SCENARIOS)} (default: {' '.join(DEFAULT)})",
    )
    parser.add_argument("-n", "--rounds", type=positive_int, default=100)
    parser.add_argument(
        "-j",
        "--jobs",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="processes under callgrind at once (the counts do not depend on it)",
    )
    parser.add_argument("--child", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rounds)
        return
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario {unknown[0]!r}: expected one of {', '.join(SCENARIOS)}"
        )
    missing = [
        tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)
    ]
    if missing:
        sys.exit(
            f"{' and '.join(missing)} not found: install valgrind "
            "(Debian: apt-get install valgrind)"
        )
    console = Console(width=max(180, Console().width))
    scenarios = args.scenarios or list(DEFAULT)
    console.print(
        f"[dim]{len(scenarios)} scenarios under callgrind, {args.jobs} at a time "
        f"(~1 min each per 50 rounds)...[/dim]"
    )
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        profiles = list(
            pool.map(
                lambda name: run(name, args.rounds, Path(tmp) / f"{name}.out"),
                scenarios,
            )
        )
    table = Table(
        title=(
            f"allowance overhead under callgrind, {args.rounds} interleaved rounds: "
            "per call, added by the guard (the first row: the whole raw call)"
        )
    )
    table.add_column("scenario", no_wrap=True)
    for header, _ in COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("cycle estimate", justify="right")
    table.add_column("of a raw call", justify="right")
    first = profiles[0]
    table.add_row(
        "chat, the raw SDK (the whole call)",
        *(f"{first.per_call(RAW_WRAPPER, names):,.0f}" for _, names in COLUMNS),
        f"{first.estimate(RAW_WRAPPER):,.0f}",
        "",
    )
    for scenario, profile in zip(scenarios, profiles, strict=True):
        raw_estimate = profile.estimate(RAW_WRAPPER)
        added = profile.estimate(GUARDED_WRAPPER) - raw_estimate
        table.add_row(
            SCENARIOS[scenario][0],
            *(f"{profile.added(names):,.0f}" for _, names in COLUMNS),
            f"{added:,.0f}",
            f"{added / raw_estimate:.2%}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
