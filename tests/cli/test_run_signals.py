"""``allowance run`` passes SIGTERM, SIGHUP and SIGINT on to the program it runs.

Real processes: ``allowance run`` in a subprocess (or on a pseudo-terminal),
the program a Python child that says when it is ready to be signalled.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

RUN = [sys.executable, "-m", "allowance._cli", "run", "--ledger", "memory://", "--"]

WAIT = """
import os, time
print("ready", os.getpid(), flush=True)
time.sleep(30)
print("never signalled", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_sent_to_allowance_run_alone_reaches_the_program(
    tmp_path: Path, signum: signal.Signals
) -> None:
    # Before, SIGTERM and SIGHUP ended allowance run and left the program
    # running (and spending); a SIGINT sent with kill was ignored.
    if signal.getsignal(signum) is signal.SIG_IGN:
        pytest.skip(f"{signum.name} is ignored here, so allowance run keeps it so")
    run = subprocess.Popen(
        [*RUN, sys.executable, "-c", WAIT],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,  # no terminal: the signal reaches run alone
    )
    assert run.stdout is not None
    ready, child = run.stdout.readline().split()
    try:
        assert ready == "ready"
        run.send_signal(signum)
        assert run.wait(timeout=20) == 128 + signum  # the program died of it
        assert run.stdout.read() == ""
    finally:
        run.kill()
        run.wait(timeout=20)
        if run.returncode != 128 + signum:
            os.kill(int(child), signal.SIGKILL)
        run.stdout.close()


def test_a_program_that_handles_sigterm_gives_its_own_exit_code(
    tmp_path: Path,
) -> None:
    handles = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n" + WAIT
    )
    run = subprocess.Popen(
        [*RUN, sys.executable, "-c", handles], stdout=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    _, child = run.stdout.readline().split()
    try:
        run.terminate()
        assert run.wait(timeout=20) == 7
    finally:
        run.kill()
        run.wait(timeout=20)
        if run.returncode != 7:
            os.kill(int(child), signal.SIGKILL)
        run.stdout.close()


COUNT = """
import time
seen = 0
try:
    print("ready", flush=True)
    time.sleep(10)
except KeyboardInterrupt:
    seen += 1
    try:
        time.sleep(1)  # the cleanup a second SIGINT would cut short
    except KeyboardInterrupt:
        seen += 1
print("interrupts:", seen, flush=True)
"""


def test_ctrl_c_at_a_terminal_interrupts_the_program_once(tmp_path: Path) -> None:
    # Before, the program inherited allowance run's ignored SIGINT: Ctrl-C did
    # nothing. The terminal sends SIGINT to the program itself: allowance run
    # does not send it a second.
    pid, terminal = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes allowance run
        os.chdir(tmp_path)
        os.execv(sys.executable, [*RUN, sys.executable, "-c", COUNT])  # noqa: S606
    output = b""
    try:
        while b"ready" not in output:
            output += os.read(terminal, 1024)
        os.write(terminal, b"\x03")
        while True:
            try:
                chunk = os.read(terminal, 1024)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert b"interrupts: 1" in output


def test_a_signal_ignored_when_run_starts_stays_ignored_in_the_program(
    tmp_path: Path,
) -> None:
    # nohup ignores SIGHUP: the program must keep ignoring it. SIGINT was
    # ignored in every program (run ignored it before starting it).
    shows = (
        "import signal\n"
        "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN,"
        " signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    nohup = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "os.execv(sys.executable, sys.argv[1:])"
    )
    result = subprocess.run(
        [sys.executable, "-c", nohup, *RUN, sys.executable, "-c", shows],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
