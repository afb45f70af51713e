"""``allowance run``: any Python program under a budget, without touching its code.

Like ``opentelemetry-instrument``: the command is started with the directory of
``allowance/_bootstrap`` first on ``PYTHONPATH``, so Python imports its
``sitecustomize`` before the program's first line. That module calls
``bootstrap()``, which builds a guard from the ``ALLOWANCE_*`` environment
variables and applies ``allowance.patch()``. Child Python processes inherit
the variables, so they are guarded too, against the same run.

Environment (each ``allowance run`` option sets one; set them yourself to use
the bootstrap without the command):

================================  ================================================
``ALLOWANCE_BUDGET``              ``"$5"``, ``"50k tokens"``, or an int of tokens
``ALLOWANCE_PER``                 the budget's dimension (default ``run``)
``ALLOWANCE_WINDOW``              ``hour``, ``day``, ``week`` or ``month``
``ALLOWANCE_LEDGER``              ledger URL (default ``sqlite:///allowance.db``)
``ALLOWANCE_FALLBACK``            cheaper model to degrade to
``ALLOWANCE_THRESHOLD``           ratio at which to degrade (or warn)
``ALLOWANCE_ON_LIMIT``            ``raise`` (default), ``stop`` or ``warn``
``ALLOWANCE_FAIL``                ``closed`` (default) or ``open``
``ALLOWANCE_RUN_ID``              the run's id (default: a new one per command)
``ALLOWANCE_SESSION``             the session id (default: a new one)
``ALLOWANCE_SCOPE``               more dimensions: ``tenant=acme,user=u1``
``ALLOWANCE_ADAPTERS``            adapters to install (default every available)
================================  ================================================

A ``BudgetExceeded`` that ends the program prints one clear line on stderr and
exits with ``EXIT_BUDGET_EXCEEDED`` (3); any other exit code passes through.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allowance._errors import BudgetExceeded, ConfigurationError, UsageError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

    from allowance._guard import Guard

__all__ = [
    "BOOTSTRAP_DIR",
    "EXIT_BUDGET_EXCEEDED",
    "bootstrap",
    "child_env",
    "guard_from_env",
    "run_command",
]

EXIT_BUDGET_EXCEEDED = 3
"""The exit code of a program that ``BudgetExceeded`` ended."""

BOOTSTRAP_DIR = str(Path(__file__).parent / "_bootstrap")
_PREFIX = "ALLOWANCE_"
OPTIONS = (
    "budget",
    "per",
    "window",
    "ledger",
    "fallback",
    "threshold",
    "on_limit",
    "fail",
    "run_id",
    "session",
    "scope",
    "adapters",
)

_CHOICES: dict[str, tuple[str, ...]] = {
    "window": ("hour", "day", "week", "month"),
    "on_limit": ("raise", "stop", "warn"),
    "fail": ("closed", "open"),
}


def _env_name(option: str) -> str:
    return _PREFIX + option.upper()


def child_env(
    options: Mapping[str, str | None], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return the environment of the guarded command.

    Args:
        options: ``OPTIONS`` given on the command line (None: not given; the
            inherited ``ALLOWANCE_*`` variable, if any, stays).
        base: The environment to start from (default ``os.environ``).
    """
    env = dict(os.environ if base is None else base)
    for option, value in options.items():
        if option not in OPTIONS:
            raise UsageError(
                f"unknown allowance run option {option!r}",
                value=option,
                expected=", ".join(OPTIONS),
            )
        if value is not None:
            env[_env_name(option)] = value
    # One file for the whole run, whatever directory a process works in.
    from allowance._ledger import DEFAULT_LEDGER_URL, absolute_url  # noqa: PLC0415

    ledger = _env_name("ledger")
    env[ledger] = absolute_url(env.get(ledger) or DEFAULT_LEDGER_URL)
    if not env.get(_env_name("run_id")):
        from allowance._scope import new_id  # noqa: PLC0415

        env[_env_name("run_id")] = new_id()
    path = env.get("PYTHONPATH", "")
    parts = [p for p in path.split(os.pathsep) if p and p != BOOTSTRAP_DIR]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *parts])
    return env


def _parse_scope(text: str) -> dict[str, str]:
    from allowance._scope import check_name  # noqa: PLC0415

    scope: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigurationError(
                _env_name("scope"), text, "dimension=value pairs, comma-separated"
            )
        check_name(_env_name("scope"), name.strip())
        scope[name.strip()] = value.strip()
    return scope


def guard_from_env(env: Mapping[str, str] | None = None) -> Guard:
    """Build the guard that ``ALLOWANCE_*`` variables describe.

    Raises:
        ConfigurationError: A variable is malformed.
    """
    from allowance._budget import parse_limit  # noqa: PLC0415
    from allowance._guard import Guard  # noqa: PLC0415
    from allowance._scope import check_name  # noqa: PLC0415

    env = os.environ if env is None else env

    def get(option: str) -> str | None:
        value = env.get(_env_name(option), "").strip()
        return value or None

    budget: int | str | None = get("budget")
    if isinstance(budget, str) and budget.isdigit():
        budget = int(budget)
    if budget is not None:
        parse_limit(budget, what=_env_name("budget"))
    # Checked here, named, with or without a budget (none reads them then).
    check_name(_env_name("per"), get("per") or "run")
    for option, choices in _CHOICES.items():
        value = get(option)
        if value is not None and value not in choices:
            expected = ", ".join(choices[:-1]) + f" or {choices[-1]}"
            raise ConfigurationError(_env_name(option), value, expected)
    threshold_text = get("threshold")
    try:
        threshold = float(threshold_text) if threshold_text is not None else None
    except ValueError as err:
        raise ConfigurationError(
            _env_name("threshold"), threshold_text, "a ratio such as 0.8"
        ) from err
    defaults: dict[str, str | int] = {
        "run": get("run_id") or _new_id(),
        "session": get("session") or _new_id(),
    }
    defaults.update(_parse_scope(get("scope") or ""))
    kwargs: dict[str, Any] = {
        "budget": budget,
        "per": get("per") or "run",
        "window": get("window"),
        "fallback": get("fallback"),
        "threshold": threshold,
        "on_limit": get("on_limit") or "raise",
        "fail": get("fail") or "closed",
    }
    return Guard(ledger=get("ledger"), defaults=defaults, **kwargs)


def _adapters(env: Mapping[str, str]) -> list[str] | None:
    """The adapters ``ALLOWANCE_ADAPTERS`` names (None: every available one)."""
    names = env.get(_env_name("adapters"), "").strip()
    return [n.strip() for n in names.split(",") if n.strip()] if names else None


def _check_adapters(env: Mapping[str, str]) -> None:
    """Refuse an adapter name that no installed plugin gives.

    Before the program starts: it may not be Python, and a Python one would
    end at its first line.
    """
    from allowance import plugins  # noqa: PLC0415

    known = plugins.adapters()
    for name in _adapters(env) or ():
        if name not in known:
            expected = f"adapter names, comma-separated: {', '.join(sorted(known))}"
            raise ConfigurationError(_env_name("adapters"), name, expected)


def _new_id() -> str:
    from allowance._scope import new_id  # noqa: PLC0415

    return new_id()


class _Exit:
    """Remembers that ``BudgetExceeded`` ended the program, to set the exit code."""

    def __init__(self) -> None:
        self.budget_exceeded = False
        self.previous = sys.excepthook

    def hook(
        self,
        kind: type[BaseException],
        error: BaseException,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(error, BudgetExceeded):
            self.budget_exceeded = True
            sys.stderr.write(
                f"allowance: budget exceeded, the program was stopped: {error}\n"
            )
            return
        self.previous(kind, error, traceback)

    def at_exit(self) -> None:
        if self.budget_exceeded:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(EXIT_BUDGET_EXCEEDED)


def bootstrap() -> None:
    """Guard this process from ``ALLOWANCE_*`` (called by the ``sitecustomize``).

    A malformed variable ends the process with exit code 2 and a message
    naming it, before the program starts: it must not run unguarded.
    """
    from allowance._wrap import patch  # noqa: PLC0415

    try:
        guard = guard_from_env()
        patch(guard=guard, adapters=_adapters(os.environ))
    except Exception as err:  # noqa: BLE001 - reported, then the process ends
        sys.stderr.write(f"allowance run: {err}\n")
        sys.stderr.flush()
        os._exit(2)
    state = _Exit()
    sys.excepthook = state.hook
    # Registered before the program's own handlers: runs after them (LIFO).
    atexit.register(state.at_exit)
    atexit.register(guard.close)


def run_command(command: Sequence[str], options: Mapping[str, str | None]) -> int:
    """Run ``command`` guarded; return its exit code (128 + signal if killed).

    Raises:
        UsageError: No command was given, or it cannot be started.
        ConfigurationError: An option is malformed (checked before starting).
    """
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(
            "allowance run needs a command",
            value=command,
            expected="allowance run [options] -- python agent.py [args]",
        )
    env = child_env(options)
    guard_from_env(env)  # a malformed option fails here, not in the program
    _check_adapters(env)
    if os.name != "posix":  # pragma: no cover - the console interrupts both
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = _start(argv, env).wait()
        finally:
            signal.signal(signal.SIGINT, previous)
    else:
        code = _wait_forwarding(argv, env)
    return 128 - code if code < 0 else code


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(argv, env=env)  # noqa: S603 - the user's command
    except OSError as err:
        raise UsageError(
            f"cannot start {argv[0]!r}: {err.strerror or err}",
            value=argv[0],
            expected="a command on PATH",
        ) from err


def _wait_forwarding(argv: list[str], env: dict[str, str]) -> int:
    """Start ``argv`` and wait for it, passing SIGTERM, SIGHUP and SIGINT on.

    Sent to this process alone (a service manager, ``timeout``, ``kill``),
    they would end it and leave the program running, spending. A signal
    ignored when we started stays ignored and the program inherits that, as
    ``nohup`` and a script's ``&`` mean it to. A Ctrl-C at the terminal
    reaches the program itself (its process group): it is not sent again, so
    a second KeyboardInterrupt cannot cut short the program's cleanup.
    """
    process: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if process is None:
            pending.append(signum)
        elif signum != signal.SIGINT or not _from_terminal(process.pid):
            process.send_signal(signum)

    previous: dict[signal.Signals, Any] = {}
    for forwarded in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(forwarded) is not signal.SIG_IGN:
            previous[forwarded] = signal.signal(forwarded, forward)
    try:
        process = _start(argv, env)
        for signum in pending:
            forward(signum, None)
        return process.wait()
    finally:
        for forwarded, handler in previous.items():
            # None: a handler set outside Python, which cannot be put back.
            signal.signal(forwarded, signal.SIG_DFL if handler is None else handler)


def _from_terminal(pid: int) -> bool:
    """Whether a SIGINT came from our terminal's Ctrl-C, which ``pid`` got too.

    It did if we are the terminal's foreground process group and ``pid`` is in
    it (it may have left it, or there may be no terminal: then it was sent to
    us alone). A ``kill -INT`` of this process alone while it is in the
    foreground is taken for a Ctrl-C: only a signal's sender could tell.
    """
    group = os.getpgrp()
    try:
        if os.getpgid(pid) != group:
            return False
        tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(tty) == group
    except OSError:
        return False
    finally:
        os.close(tty)
