"""A forked child leaves the streams it inherited to its parent.

A process reads one chunk of a guarded stream, then calls ``os.fork()``; the
child ends with ``sys.exit(0)``, which runs the finalizers (and closes the
async generators) it inherited. None of them may settle the parent's stream:
the parent reads on and is charged the whole usage, once.

Each case runs in a fresh interpreter (this file run as a script), so the
child really exits through ``sys.exit``; the fake provider serves it over
loopback HTTP from the test process, and the ledger is a SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import sys
import warnings
from typing import Any

import pytest

GPT = "gpt-4o"
USER: Any = [{"role": "user", "content": "Say hello."}]
INPUT_TOKENS = 40
OUTPUT_TOKENS = 9
BUDGET = 1_000_000  # tokens: a call is charged input + output tokens

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _status(guard: Any) -> list[int]:
    (status,) = guard.status()
    return [status.spent, status.reserved]


def _fork_and_exit_child() -> int:
    """Fork; the child exits normally at once. Return the child's exit code."""
    sys.stdout.flush()
    with warnings.catch_warnings():  # 3.12+: "multi-threaded, fork() may deadlock"
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        sys.exit(0)  # the child does nothing with the stream
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _guard(client: Any, mode: str, ledger: str) -> Any:
    import allowance

    if mode == "wrap":
        allowance.wrap(client, BUDGET, ledger=ledger)
        return client.allowance.guard
    return allowance.patch(BUDGET, ledger=ledger)


def _report(guard: Any, child: int, mid: list[int], after_child: list[int]) -> dict:
    calls = guard.ledger.calls()
    return {
        "child": child,
        "mid": mid,
        "after_child": after_child,
        "end": _status(guard),
        "calls": [
            [c.outcome, c.usage.input_tokens, c.usage.output_tokens] for c in calls
        ],
    }


def _run_sync(mode: str, base_url: str, ledger: str) -> dict:
    import openai

    client = openai.OpenAI(
        api_key="test", base_url=base_url, max_retries=0, timeout=10.0
    )
    guard = _guard(client, mode, ledger)
    stream = client.chat.completions.create(model=GPT, messages=USER, stream=True)
    events = iter(stream)
    next(events)
    mid = _status(guard)
    child = _fork_and_exit_child()
    after_child = _status(guard)
    for _ in events:
        pass
    report = _report(guard, child, mid, after_child)
    client.close()
    return report


def _run_async(mode: str, base_url: str, ledger: str) -> dict:
    import openai

    # The fork happens between two runs of the loop, and on poll(2): the child
    # closes its copy of the loop when it exits, which on epoll (a kernel
    # object the child shares) would deregister the parent's sockets too.
    loop = asyncio.SelectorEventLoop(selectors.PollSelector())
    client = openai.AsyncOpenAI(
        api_key="test", base_url=base_url, max_retries=0, timeout=10.0
    )
    guard = _guard(client, mode, ledger)

    async def first_chunk() -> Any:
        stream = await client.chat.completions.create(
            model=GPT, messages=USER, stream=True
        )
        events = stream.__aiter__()
        await events.__anext__()
        return events

    async def the_rest(events: Any) -> None:
        async for _ in events:
            pass
        await client.close()

    events = loop.run_until_complete(first_chunk())
    mid = _status(guard)
    child = _fork_and_exit_child()
    after_child = _status(guard)
    loop.run_until_complete(the_rest(events))
    loop.close()
    return _report(guard, child, mid, after_child)


def _main(kind: str, mode: str, base_url: str, ledger: str) -> None:
    if kind == "sync":
        report = _run_sync(mode, base_url, ledger)
    else:
        report = _run_async(mode, base_url, ledger)
    print(json.dumps(report), flush=True)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("mode", ["wrap", "patch"])
def test_forked_child_leaves_the_stream_to_its_parent(
    kind: str, mode: str, tmp_path: Any
) -> None:
    from allowance.testing import FakeProvider, FakeUsage

    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    usage = FakeUsage(input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS)
    with FakeProvider(usage=usage) as fake:
        done = subprocess.run(
            [sys.executable, __file__, kind, mode, fake.openai_base_url, ledger],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["child"] == 0
    spent, reserved = report["mid"]
    assert spent == 0
    assert reserved > 0
    # The child's exit settled nothing: the reservation still holds.
    assert report["after_child"] == report["mid"]
    # The parent read on: the whole usage, charged once.
    assert report["calls"] == [["ok", INPUT_TOKENS, OUTPUT_TOKENS]]
    assert report["end"] == [INPUT_TOKENS + OUTPUT_TOKENS, 0]


if __name__ == "__main__":
    _main(*sys.argv[1:])
