"""The SQLite ledger under faults: every failure raises, names the file, never
returns zero."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

from allowance import ConfigurationError, LedgerError, LedgerUnavailableError
from allowance._ledger import SQLiteLedger, open_ledger
from allowance.typing import KeyState, ReserveItem

PLAN = [[ReserveItem("k", 5, 100)]]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(path):
    ledger = SQLiteLedger(path, busy_timeout=0.1)
    yield ledger
    ledger.close()


def test_directory_that_cannot_be_created(tmp_path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a directory should be")
    target = blocker / "sub" / "x.db"
    with pytest.raises(LedgerUnavailableError) as caught:
        open_ledger(f"sqlite:///{target}")
    message = str(caught.value)
    assert str(target) in message
    assert "cannot create its directory" in message
    assert isinstance(caught.value.__cause__, OSError)


def test_file_that_cannot_be_opened(tmp_path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    target = blocker / "x.db"  # its parent exists, but is a file
    with pytest.raises(LedgerUnavailableError, match=str(target)) as caught:
        SQLiteLedger(target)
    assert isinstance(caught.value.__cause__, OSError | sqlite3.Error)


def test_a_directory_is_not_a_database(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="not a directory"):
        SQLiteLedger(tmp_path)


def test_corrupt_file(path) -> None:
    path.write_bytes(b"this is not a SQLite database, just bytes\n" * 200)
    with pytest.raises(LedgerUnavailableError) as caught:
        SQLiteLedger(path)
    message = str(caught.value)
    assert str(path) in message
    assert "not a database" in message
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


def test_schema_of_another_version(path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(LedgerUnavailableError, match="schema version 99"):
        SQLiteLedger(path)


def test_locked_longer_than_busy_timeout(path, ledger) -> None:
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(LedgerError) as caught:
            ledger.reserve(PLAN, reservation_id="r1", lease_seconds=60)
        message = str(caught.value)
        assert str(path) in message
        assert "locked" in message
        assert "busy_timeout=0.1" in message
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(LedgerError, match="locked"):
            ledger.commit("r0", {"k": 1})
        # Reads still work in WAL mode, and nothing was written.
        assert ledger.state(["k"])["k"] == KeyState()
    finally:
        other.execute("COMMIT")
        other.close()
    assert ledger.reserve(PLAN, reservation_id="r1", lease_seconds=60).admitted
    ledger.commit("r0", {"k": 1})
    assert ledger.state(["k"])["k"] == KeyState(spent=1, reserved=5)


async def test_locked_database_fails_the_async_twin_too(path, ledger) -> None:
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(LedgerError, match="locked"):
            await ledger.areserve(PLAN, reservation_id="r1", lease_seconds=60)
    finally:
        other.execute("COMMIT")
        other.close()
    assert (await ledger.areserve(PLAN, reservation_id="r1", lease_seconds=60)).admitted


def test_locked_while_opening(path) -> None:
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # a new file: rollback journal, no readers
        with pytest.raises(LedgerUnavailableError) as caught:
            SQLiteLedger(path, busy_timeout=0.1)
        assert str(path) in str(caught.value)
        assert "locked" in str(caught.value)
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_failed_write_rolls_back_and_raises(path, ledger) -> None:
    ledger.reserve(PLAN, reservation_id="r1", lease_seconds=60)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("ALTER TABLE counters RENAME TO counters_gone")
    other.close()
    with pytest.raises(LedgerError, match="no such table: counters") as caught:
        ledger.commit("r1", {"k": 5})
    assert str(path) in str(caught.value)
    other = sqlite3.connect(path, isolation_level=None)
    status = other.execute("SELECT status FROM reservations WHERE id = 'r1'").fetchone()
    other.execute("ALTER TABLE counters_gone RENAME TO counters")
    other.close()
    assert status == ("held",)  # the commit did not half-happen
    ledger.commit("r1", {"k": 5})
    assert ledger.state(["k"])["k"] == KeyState(spent=5)


def test_malformed_reservation_row(path, ledger) -> None:
    ledger.reserve(PLAN, reservation_id="r1", lease_seconds=60)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("UPDATE reservations SET items = '[1, 2' WHERE id = 'r1'")
    other.close()
    with pytest.raises(LedgerError, match="reservation row is malformed"):
        ledger.commit("r1", {"k": 5})
    assert ledger.state(["k"])["k"] == KeyState(reserved=5)


def test_malformed_call_log_row(path, ledger) -> None:
    other = sqlite3.connect(path, isolation_level=None)
    other.execute(
        "INSERT INTO calls (call_id, ts, scope, provider, model, requested_model,"
        " input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,"
        " reasoning_tokens, adapters, outcome, estimate_tokens, latency_ms)"
        " VALUES ('c', 1, '[]', 'p', 'm', 'm', 0, 0, 0, 0, 0, '[]', 'ok', 0, 0)"
    )
    other.close()
    with pytest.raises(LedgerError, match="call log row is malformed"):
        ledger.calls()


def test_reopening_keeps_everything(path) -> None:
    first = SQLiteLedger(path)
    first.reserve(PLAN, reservation_id="r1", lease_seconds=60)
    first.commit("r1", {"k": 4})
    first.reserve(PLAN, reservation_id="r2", lease_seconds=60)
    first.claim("m")
    first.close()
    second = SQLiteLedger(path)
    try:
        assert second.state(["k"])["k"] == KeyState(spent=4, reserved=5)
        assert not second.claim("m")
        second.commit("r1", {"k": 4})  # still idempotent across processes
        second.commit("r2", {"k": 1})
        assert second.state(["k"])["k"] == KeyState(spent=5, reserved=0)
    finally:
        second.close()


def test_usable_after_close(ledger) -> None:
    ledger.close()
    assert ledger.reserve(PLAN, reservation_id="r1", lease_seconds=60).admitted
    assert ledger.state(["k"])["k"] == KeyState(reserved=5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_its_own_connection(ledger) -> None:
    ledger.reserve(PLAN, reservation_id="parent", lease_seconds=60)
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            ledger.commit("parent", {"k": 2})
            ledger.reserve(PLAN, reservation_id="child", lease_seconds=60)
            ledger.commit("child", {"k": 3})
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ledger.state(["k"])["k"] == KeyState(spent=5, reserved=0)
    ledger.commit("parent", {"k": 2})  # settled by the child
    assert ledger.state(["k"])["k"] == KeyState(spent=5, reserved=0)


def test_read_only_directory_for_everyone() -> None:
    """/proc/self refuses new files even to root: a typed error, never a silent zero."""
    target = "/proc/self/allowance-ledger.db"
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    with pytest.raises(LedgerUnavailableError) as caught:
        open_ledger(f"sqlite:///{target}")
    assert target in str(caught.value)
    assert "cannot open the database" in str(caught.value)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes to read-only directories (the /proc test covers root)",
)
def test_read_only_directory(tmp_path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        with pytest.raises(LedgerUnavailableError, match=str(directory)):
            SQLiteLedger(directory / "x.db")
    finally:
        directory.chmod(0o755)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes to read-only files",
)
def test_database_that_became_read_only(path) -> None:
    ledger = SQLiteLedger(path)
    ledger.reserve(PLAN, reservation_id="r1", lease_seconds=60)
    ledger.close()
    for file in path.parent.iterdir():
        file.chmod(0o444)
    path.parent.chmod(0o555)

    def commit_again() -> None:
        again = SQLiteLedger(path)  # may already fail here
        try:
            again.commit("r1", {"k": 5})
        finally:
            again.close()

    try:
        with pytest.raises(LedgerError):
            commit_again()
    finally:
        path.parent.chmod(0o755)
        for file in path.parent.iterdir():
            file.chmod(0o644)


async def test_a_cancel_after_the_reserve_came_back_releases_it(path) -> None:
    """Cancelled after the worker delivered the reserve, before the task resumed.

    ``wait_for``'s timer can land there: the future holds the result, the
    task gets ``CancelledError``. The hold is released, not left to its lease.
    """
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Future[object]] = []

    class Cancelling(SQLiteLedger):
        def reserve(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            result = super().reserve(*args, **kwargs)  # type: ignore[arg-type]
            # On the worker thread, queued before its delivery: the cancel
            # is queued right after the delivery, before the task's wake-up.
            loop.call_soon_threadsafe(loop.call_soon, tasks[0].cancel)
            return result

    ledger = Cancelling(path)
    try:
        tasks.append(
            asyncio.ensure_future(
                ledger.areserve(PLAN, reservation_id="r-1", lease_seconds=600)
            )
        )
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        for _ in range(200):  # the release runs on the worker
            if ledger.state(["k"])["k"].reserved == 0:
                break
            await asyncio.sleep(0.01)
        assert ledger.state(["k"])["k"] == KeyState(0, 0)
    finally:
        ledger.close()


HELD_AT_EXIT = textwrap.dedent(
    """
    import sqlite3, sys
    import allowance

    path = sys.argv[1]
    guard = allowance.Guard(
        budget=1000, per="tenant", ledger=f"sqlite:///{path}?busy_timeout=0.2"
    )
    with allowance.scope(tenant="t"):
        ticket = guard.begin(allowance.Estimate("openai", "gpt-4o-mini", 100, 50))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
        ticket.commit(allowance.Usage(40, 10))  # fails: held in memory
        other.execute("ROLLBACK")
        other.close()
    print(len(guard._pending), flush=True)
    # exits without another call or guard.close()
    """
)


def test_a_charge_held_in_memory_is_written_at_exit(path) -> None:
    """A commit the file refused is held in memory; the process then exits
    without another call or ``close()``: the exit writes it.

    If this fails with ``spent=0``: only the next call or ``close()`` wrote
    held charges, and a process that ended first lost them.
    """
    done = subprocess.run(
        [sys.executable, "-c", HELD_AT_EXIT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "1", done.stderr  # held in memory at first
    ledger = SQLiteLedger(path)
    try:
        assert ledger.state(["tokens:tenant=t"])["tokens:tenant=t"] == KeyState(50, 0)
        assert len(ledger.calls()) == 1
    finally:
        ledger.close()


class _LostReply(SQLiteLedger):
    """A reserve that runs, then fails as if its reply were lost (once)."""

    lose = True

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        result = super().reserve(*args, **kwargs)
        if self.lose:
            self.lose = False
            raise LedgerUnavailableError("the reply was lost on its way back")
        return result


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_reserve_whose_reply_was_lost_gives_its_hold_back(path, kind: str) -> None:
    """fail="closed": the call raises and is not sent, but the reserve ran.

    Its hold is released once the ledger answers again (the next call), not
    kept until its lease ends (10 minutes), refusing calls that would fit.
    If this fails with 150 still reserved: nothing released the lost hold.
    """
    import asyncio

    from allowance import Estimate, Guard, Usage, scope

    ledger = _LostReply(path)
    guard = Guard(budget=200, per="tenant", ledger=ledger)
    estimate = Estimate("openai", "gpt-4o-mini", 100, 50)

    def begin() -> Any:
        if kind == "sync":
            return guard.begin(estimate)
        return asyncio.run(guard.abegin(estimate))

    try:
        with scope(tenant="t"):
            with pytest.raises(LedgerUnavailableError):
                begin()
            assert ledger.state(["tokens:tenant=t"])["tokens:tenant=t"].reserved == 150
            begin().commit(Usage(100, 50))  # 150 + 150 > 200 if the hold stayed
        assert ledger.state(["tokens:tenant=t"])["tokens:tenant=t"] == KeyState(150, 0)
    finally:
        ledger.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_fail_open_a_lost_reserve_then_a_failed_call_gives_its_hold_back(
    path, kind: str
) -> None:
    """fail="open": the call goes on unreserved, then the provider fails.

    Nothing charges it, and its lost reserve's hold is released once the
    ledger answers (the next call), not kept until its lease ends; the failed
    call is still logged. If this fails with 150 still reserved, or with the
    second call refused: only the call was logged, the hold left in place.
    """
    import asyncio

    from allowance import Estimate, Guard, Usage, scope

    ledger = _LostReply(path)
    guard = Guard(budget=200, per="tenant", ledger=ledger, fail="open")
    estimate = Estimate("openai", "gpt-4o-mini", 100, 50)

    async def lost_then_failed() -> None:
        ticket = await guard.abegin(estimate)
        await ticket.arelease()

    try:
        with scope(tenant="t"):
            if kind == "sync":
                guard.begin(estimate).release()
            else:
                asyncio.run(lost_then_failed())
            assert ledger.state(["tokens:tenant=t"])["tokens:tenant=t"].reserved == 150
            begin = guard.begin(estimate)
            assert not begin.violations
            begin.commit(Usage(100, 50))  # 150 + 150 > 200 if the hold stayed
        assert ledger.state(["tokens:tenant=t"])["tokens:tenant=t"] == KeyState(150, 0)
        assert [c.outcome for c in ledger.calls()] == ["error", "ok"]
    finally:
        ledger.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_release_the_ledger_failed_gives_its_hold_back_later(path, kind: str) -> None:
    """Another connection holds the write lock longer than busy_timeout.

    The release fails: its hold is given back once the ledger answers (the
    next call), not kept until its lease ends (10 minutes), refusing calls
    that fit. If this fails with 150 still reserved, or with the second call
    refused: the failed release was logged as "ignored" and dropped.
    """
    from allowance import Estimate, Guard, Usage, scope

    guard = Guard(
        budget=200, per="tenant", ledger=f"sqlite:///{path}?busy_timeout=0.05"
    )
    estimate = Estimate("openai", "gpt-4o-mini", 100, 50)
    key = "tokens:tenant=t"
    try:
        with scope(tenant="t"):
            ticket = guard.begin(estimate)
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
            try:
                if kind == "sync":
                    ticket.release()
                else:
                    asyncio.run(ticket.arelease())
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert guard.ledger.state([key])[key].reserved == 150
            second = guard.begin(estimate)  # 150 + 150 > 200 if the hold stayed
            assert not second.violations
            second.commit(Usage(100, 50))
        assert guard.ledger.state([key])[key] == KeyState(150, 0)
        assert len(guard.ledger.calls()) == 2  # the released call's row too
    finally:
        guard.close()
