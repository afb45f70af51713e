"""What the guard adds to a call: raw SDK vs guarded, interleaved A/B, one process.

Usage: ``uv run noxfile.py -s bench`` (or ``python benchmarks/overhead.py -n 3000``).

Each round times one raw call and one guarded call (alternating which goes
first) against the fake provider with no delay, so both see the same machine
state. "added" is the median of the per-round differences of wall time,
"added CPU" the same for the calling thread's CPU time (``thread_time``: what
the guard itself costs, without the scheduling noise of a shared machine); p99
is each side's 99th percentile. The Redis row runs against a throwaway
``redis-server`` on a free local port (skipped when none is installed): its
"added" is two round trips (reserve, commit) plus the client's work. The fake
provider runs in its own process: in this one its server thread would compete
with the client for the GIL and blur the figures.

The memory, SQLite and SQLite write-behind (``?write_behind=0.05``: slices
admitted in memory, charges written by a thread) chat rows are measured
twice: in this process, and as the median of several fresh processes
(``--processes``, alternating ledgers), since one process's figure moves by
tens of µs between runs.

One table holds every scenario: chat on each ledger, a 200-chunk stream (whole
call, and per chunk), estimating a 100k-token prompt, 1,000 concurrent async
calls with 20 ms provider latency, then the same chat and stream scenarios
through the peers tokencap, tokenfence and llm-toll (installed only in the
``bench`` dependency group); a peer that cannot run a scenario offline gets a
row saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
from rich.console import Console
from rich.table import Table

import allowance
import allowance.telemetry
from allowance._cli import positive_int as positive  # the CLI's argparse type
from allowance.testing import RedisServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import CodeType, FrameType

    from openai.types.chat import ChatCompletionMessageParam
    from rich.console import JustifyMethod

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello in five words."}
]
STREAM_CHUNKS = 200  # words of the streamed answer, one chunk each
TEXT = " ".join(["word"] * STREAM_CHUNKS)
CONCURRENT_LABEL = "1,000 concurrent async, 20 ms latency (wall ms)"


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


WARMUP = 200


class RoundTrips:
    """Count the requests this process sends to Redis (pipelines count once).

    Counted in the client, since the server's statistics also count the
    commands run inside the ledger's Lua scripts.
    """

    def __init__(self) -> None:
        import redis.connection

        self.count = 0
        self._cls: Any = redis.connection.AbstractConnection
        self._send: Callable[..., Any] = self._cls.send_packed_command

    def __enter__(self) -> RoundTrips:  # noqa: PYI034 - Python 3.10 has no Self
        send = self._send

        def counted(connection: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return send(connection, *args, **kwargs)

        self._cls.send_packed_command = counted
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.send_packed_command = self._send


def measure(
    raw: Callable[[], Any], guarded: Callable[[], Any], rounds: int
) -> dict[str, float]:
    for _ in range(WARMUP):  # warm up connections, caches, pricing lookups
        raw()
        guarded()
    wall: dict[Any, list[float]] = {raw: [], guarded: []}
    cpu: dict[Any, list[float]] = {raw: [], guarded: []}
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            for fn in (raw, guarded) if i % 2 else (guarded, raw):
                start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
                fn()
                cpu[fn].append((time.thread_time_ns() - start_cpu) / 1000)
                wall[fn].append((time.perf_counter_ns() - start) / 1000)
    finally:
        gc.enable()

    def added(times: dict[Any, list[float]]) -> float:
        return statistics.median(
            y - x for x, y in zip(times[raw], times[guarded], strict=True)
        )

    return {
        "raw": statistics.median(wall[raw]),
        "guarded": statistics.median(wall[guarded]),
        "added": added(wall),
        "added_cpu": added(cpu),
        "p99": quantile(wall[guarded], 0.99),
        "raw_p99": quantile(wall[raw], 0.99),
    }


def chat(client: Any) -> Callable[[], Any]:
    def call() -> Any:
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
        )

    return call


def stream(client: Any, *, usage: bool = True) -> Callable[[], Any]:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}

    def call() -> Any:
        return list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                max_tokens=STREAM_CHUNKS,
                stream=True,
                **extra,
            )
        )

    return call


def sdk_client(fake: RemoteProvider) -> Any:
    """A plain OpenAI client of the fake provider (no retries: one request per call)."""
    return openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0)


def guarded(fake: RemoteProvider, ledger: str, **options: Any) -> Any:
    """``sdk_client`` under a $1000 budget on ``ledger``, with ``wrap``'s options."""
    return allowance.wrap(sdk_client(fake), budget="$1000", ledger=ledger, **options)


def behind_url(tmp: Path, name: str) -> str:
    """A write-behind SQLite ledger (0.05 s) on a file of its own in ``tmp``."""
    return f"sqlite:///{tmp / name}.db?write_behind=0.05"


def do_nothing(fake: RemoteProvider) -> Any:
    """A client under a wrapper around ``request`` that does nothing.

    The floor of any guard at the SDK layer. Between two SDK calls even this
    runs from cold CPU caches, so it shows what the harness cannot resolve.
    """
    client = sdk_client(fake)
    request = client.request

    def pass_through(*args: Any, **kwargs: Any) -> Any:
        return request(*args, **kwargs)

    client.__dict__["request"] = pass_through
    return client


def least_guard(fake: RemoteProvider) -> Any:
    """A client under the least a guard can do: the floor below allowance's row.

    One USD budget in a dict under a lock: bound the input by its bytes, price
    the worst case, hold it, call, price the usage, charge it, log a tuple.
    No scope, no ledger protocol, no call record, no thresholds, no streams,
    no errors handled. Between two SDK calls even this runs from cold CPU
    caches: what is left above it in allowance's row is allowance's features.
    """
    client = sdk_client(fake)
    request = client.request
    lock = threading.Lock()
    counter = [0, 0]  # spent, held (micro-dollars)
    log: list[tuple[Any, ...]] = []
    rates = {"gpt-4o-mini": (150, 600)}  # micro-dollars per 1,000 tokens

    def guarded(*args: Any, **kwargs: Any) -> Any:
        body = args[1].json_data
        messages = body["messages"]
        bound = 3 + 4 * len(messages)
        for message in messages:
            text = message["content"]
            bound += len(text) if text.isascii() else len(text.encode())
        per_input, per_output = rates[body["model"]]
        worst = -(-(bound * per_input + body["max_tokens"] * per_output) // 1000)
        with lock:
            if sum(counter) + worst > 10**12:
                raise RuntimeError("over budget")
            counter[1] += worst
        result = request(*args, **kwargs)
        usage = result.usage
        cost = -(
            -(usage.prompt_tokens * per_input + usage.completion_tokens * per_output)
            // 1000
        )
        with lock:
            counter[0] += cost
            counter[1] -= worst
            log.append((time.time(), result.model, usage.total_tokens, cost))
        return result

    client.__dict__["request"] = guarded
    return client


def plain_python(fake: RemoteProvider, count: int = 80) -> Any:
    """A client that calls ``count`` small functions in turn before each call.

    No allowance: a yardstick for the rows around it (80 functions: about
    1,000 bytecodes). Each function is its own code, as a guard's functions
    are, so between two SDK calls they run from cold CPU caches, as a guard's
    code does: the row shows what that much plain Python costs there,
    whatever it does.
    """
    functions = "".join(
        f"def f{i}(d):\n    x = d['a'] + 1\n    return x\n" for i in range(count)
    )
    calls = "".join(f"    f{i}(d)\n" for i in range(count))
    source = f"{functions}def run(d):\n{calls}    return 0\n"
    names: dict[str, Any] = {}
    exec(compile(source, "<plain>", "exec"), names)  # noqa: S102 - our own source
    run, data = names["run"], {"a": 1}
    client = sdk_client(fake)
    request = client.request

    def guarded(*args: Any, **kwargs: Any) -> Any:
        run(data)
        return request(*args, **kwargs)

    client.__dict__["request"] = guarded
    return client


@contextlib.contextmanager
def metrics_on() -> Iterator[None]:
    """OpenTelemetry metrics recorded: an SDK meter provider, an in-memory reader."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    allowance.telemetry.configure(meter_provider=provider)
    try:
        yield
    finally:
        allowance.telemetry.configure()
        provider.shutdown()


def is_opentelemetry(frame: FrameType) -> bool:
    """The OpenTelemetry SDK's and API's code."""
    return f"{os.sep}opentelemetry{os.sep}" in frame.f_code.co_filename


ALLOWANCE_DIR = str(Path(allowance.__file__).parent)


def is_allowance(frame: FrameType) -> bool:
    """Allowance's own code, and the ``__init__`` dataclasses generate for its types."""
    code = frame.f_code
    if code.co_filename.startswith(ALLOWANCE_DIR):
        return True
    if code.co_filename != "<string>" or code.co_name != "__init__":
        return False
    return type(frame.f_locals.get("self")).__module__.startswith("allowance")


def bytecodes(
    fn: Callable[[], Any],
    ours: Callable[[FrameType], bool],
    *,
    all_threads: bool = False,
    warm: bool = True,
) -> int:
    """The bytecodes frames that ``ours`` accepts run during one call of ``fn``.

    Counted (``f_trace_opcodes``), not timed: no machine noise, so a change of
    a few bytecodes shows. It depends on the Python version and, by a few
    bytecodes, on what the process imported (telemetry checks for
    OpenTelemetry). What it leaves out is code in C (the SDK's parsers,
    SQLite), which the timed table shows. ``all_threads``: also the threads
    ``fn`` starts (CrewAI runs an agent on a thread of its own); a thread
    that outlives the call stops counting with it. ``warm=False``: the caller
    has run a call like it already (``fn`` may run only once: a crew's
    kickoff).
    """
    if warm:
        fn()  # as before the timed rounds: caches filled, connections open
    ticks = itertools.count()  # next() is atomic: threads count into one counter
    tick = ticks.__next__
    counting = True

    def trace(frame: FrameType, event: str, _: object) -> Any:
        if not counting or not ours(frame):
            return None
        if event == "call":
            frame.f_trace_lines = False
            frame.f_trace_opcodes = True
        elif event == "opcode":
            tick()
        return trace

    sys.settrace(trace)
    if all_threads:
        threading.settrace(trace)
    try:
        fn()
    finally:
        counting = False
        sys.settrace(None)
        if all_threads:
            threading.settrace(None)  # the documented reset
    return next(ticks)


def everything(_: FrameType) -> bool:
    """Every frame: what the whole process runs."""
    return True


# A budget that degrades to a cheaper model at 80% (far from it in the bench).
DEGRADE: dict[str, Any] = {"fallback": "gpt-4.1-nano", "threshold": 0.8}
# One past its degrade threshold from the first call: every call degraded.
DEGRADED: dict[str, Any] = {"fallback": "gpt-4.1-nano", "threshold": 1e-9}


def counted_rows(fake: RemoteProvider, tmp: Path) -> list[tuple[str, str, str]]:
    """Bytecodes per call: the raw SDK, the least guard, allowance on each ledger."""

    least = least_guard(fake)
    least_code: CodeType = least.__dict__["request"].__code__
    memory = guarded(fake, "memory://")
    sqlite = guarded(fake, f"sqlite:///{tmp / 'counted.db'}")
    behind = guarded(fake, behind_url(tmp, "behind"))
    degrading = guarded(fake, "memory://", **DEGRADE)
    behind_degrading = guarded(fake, behind_url(tmp, "behind-degrade"), **DEGRADE)
    degraded = guarded(fake, "memory://", **DEGRADED)
    behind_degraded = guarded(fake, behind_url(tmp, "behind-degraded"), **DEGRADED)
    for client in (behind, behind_degrading, degraded, behind_degraded):
        chat(client)()  # a slice asked for; the gate passed: degraded from now
    time.sleep(0.05)  # the thread takes the slices
    chunks = len(stream(sdk_client(fake))())
    per_call = bytecodes(chat(memory), is_allowance)
    with metrics_on():
        observed = bytecodes(chat(memory), is_allowance)
        observed_sdk = bytecodes(chat(memory), is_opentelemetry)
    per_stream = bytecodes(stream(memory), is_allowance)
    rows: list[tuple[str, int | float, str]] = [
        (
            "chat, the raw SDK (all of its Python)",
            bytecodes(chat(sdk_client(fake)), bool),
            "",
        ),
        (
            "chat, the least possible guard (no allowance)",
            bytecodes(chat(least), lambda frame: frame.f_code is least_code),
            "",
        ),
        (
            "chat, 1,000 bytecodes of plain Python (no allowance)",
            bytecodes(
                chat(plain_python(fake)),
                lambda frame: frame.f_code.co_filename == "<plain>",
            ),
            "the yardstick",
        ),
        ("chat, memory ledger", per_call, ""),
        (
            "chat, SQLite ledger",
            bytecodes(chat(sqlite), is_allowance),
            "SQLite's own work is in C: not counted",
        ),
        (
            "chat, SQLite ledger, write_behind=0.05",
            bytecodes(chat(behind), is_allowance),
            "admitted and charged in memory; the thread writes",
        ),
        (
            "chat, memory ledger, degrade at 80%",
            bytecodes(chat(degrading), is_allowance),
            "far from 80%: the express lane, under a gate",
        ),
        (
            "chat, SQLite write-behind, degrade at 80%",
            bytecodes(chat(behind_degrading), is_allowance),
            "far from 80%: held on the slice, under a gate",
        ),
        (
            "chat, memory ledger, degraded (past the threshold)",
            bytecodes(chat(degraded), is_allowance),
            "every call to the fallback, by the express lane",
        ),
        (
            "chat, SQLite write-behind, degraded",
            bytecodes(chat(behind_degraded), is_allowance),
            "to the fallback by the lane, held on the slice",
        ),
        (
            "chat, memory ledger, OpenTelemetry metrics on",
            observed,
            f"and the OpenTelemetry SDK's own: {observed_sdk:,}",
        ),
        (
            "chat stream, memory: per chunk, beyond the per-call cost",
            (per_stream - per_call) / chunks,
            f"({per_stream:,} - {per_call:,}) / {chunks} chunks",
        ),
    ]
    for wrapped in (
        memory,
        sqlite,
        behind,
        degrading,
        behind_degrading,
        degraded,
        behind_degraded,
    ):
        wrapped.allowance.guard.close()
    return [
        (name, f"{value:,.1f}" if isinstance(value, float) else f"{value:,}", note)
        for name, value, note in rows
    ]


def per_chunk(result: dict[str, float], chunks: int) -> dict[str, float]:
    return {key: value / chunks for key, value in result.items()}


Row = tuple[str, "dict[str, float] | None", str]


def sync_scenarios(
    fake: RemoteProvider, rounds: int, tmp: Path, redis_url: str | None = None
) -> list[Row]:
    rows: list[Row] = []
    chat_memory: dict[str, float] = {}
    raw_client = sdk_client(fake)
    raw = chat(raw_client)
    rows.append(
        (
            "chat, a do-nothing wrapper (no allowance)",
            measure(raw, chat(do_nothing(fake)), rounds),
            "the floor: any wrapper at the SDK layer pays this",
        )
    )
    rows.append(
        (
            "chat, the least possible guard (no allowance)",
            measure(raw, chat(least_guard(fake)), rounds),
            "one budget in a dict: bound, hold, call, charge",
        )
    )
    rows.append(
        (
            "chat, 1,000 bytecodes of plain Python (no allowance)",
            measure(raw, chat(plain_python(fake)), rounds),
            "the yardstick: any 1,000 bytecodes between SDK calls",
        )
    )
    behind = behind_url(tmp, "behind")
    ledgers: list[tuple[str, str, dict[str, Any]]] = [
        ("chat, memory ledger", "memory://", {}),
        ("chat, SQLite ledger", f"sqlite:///{tmp / 'bench.db'}", {}),
        ("chat, SQLite ledger, write_behind=0.05", behind, {}),
        ("chat, memory ledger, degrade at 80%", "memory://", DEGRADE),
        ("chat, SQLite write-behind, degrade at 80%", behind, DEGRADE),
        ("chat, memory ledger, degraded (past the threshold)", "memory://", DEGRADED),
        ("chat, SQLite ledger, degraded", f"sqlite:///{tmp / 'bench.db'}", DEGRADED),
        ("chat, SQLite write-behind, degraded", behind, DEGRADED),
    ]
    if redis_url is not None:
        ledgers.append(("chat, Redis ledger (local server)", redis_url, {}))
    for name, ledger, options in ledgers:
        client = guarded(fake, ledger, **options)
        if ledger.startswith("redis"):
            with RoundTrips() as trips:
                result = measure(raw, chat(client), rounds)
            per_call = trips.count / (WARMUP + rounds)
            note = f"{per_call:.2f} round trips per call (reserve, commit)"
        else:
            result, note = measure(raw, chat(client), rounds), ""
        if ledger == "memory://" and not options:
            chat_memory = result
        rows.append((name, result, note))
        client.allowance.guard.close()
    if redis_url is None:
        rows.append(("chat, Redis ledger", None, "no redis-server on PATH"))
    with metrics_on():
        client = guarded(fake, "memory://")
        rows.append(
            (
                "chat, memory ledger, OpenTelemetry metrics on",
                measure(raw, chat(client), rounds),
                "an SDK meter provider: 4 points a call",
            )
        )
        client.allowance.guard.close()

    stream_client = guarded(fake, "memory://")
    chunks = len(stream(raw_client)())
    whole = measure(stream(raw_client), stream(stream_client), rounds // 4)
    rows.append((f"chat stream, {chunks} chunks, memory: whole call", whole, ""))
    rows.append(
        (
            "chat stream, memory: per chunk",
            per_chunk(whole, chunks),
            "upper bound: the whole call's added time / chunks",
        )
    )
    beyond = {
        key: (whole[key] - chat_memory[key]) / chunks for key in ("added", "added_cpu")
    }
    rows.append(
        (
            "chat stream, memory: per chunk, beyond the per-call cost",
            {**per_chunk(whole, chunks), **beyond},
            "(stream added - chat added) / chunks",
        )
    )
    return rows


def guard_alone_row(rounds: int) -> Row:
    """The guard's own work per call (begin + commit, memory ledger), no HTTP.

    In a hot loop its code and data stay in the CPU caches; between real SDK
    calls they do not, which is why the "chat, memory ledger" row adds more.
    """
    from allowance.typing import Estimate, Usage

    client = allowance.wrap(
        openai.OpenAI(base_url="http://127.0.0.1:9", api_key="x"),
        budget="$1000",
        ledger="memory://",
    )
    guard = client.allowance.guard  # type: ignore[attr-defined]  # set by wrap()
    estimate = Estimate("openai", "gpt-4o-mini", 30, 16)
    usage = Usage(12, 16)

    def one() -> None:
        guard.begin(estimate, adapters=("openai",)).commit(
            usage, response_model="gpt-4o-mini-2024-07-18"
        )

    for _ in range(WARMUP):
        one()
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        one()
        times.append((time.perf_counter_ns() - start) / 1000)
    median = statistics.median(times)
    return (
        "guard alone, memory: begin + commit, no HTTP",
        {
            "raw": 0.0,
            "guarded": median,
            "added": median,
            "added_cpu": median,
            "p99": quantile(times, 0.99),
            "raw_p99": 0.0,
        },
        "hot loop: the guard's code stays in the CPU caches",
    )


def estimate_row(rounds: int) -> Row:
    """Estimate a 100k-token prompt (~400 kB) through the SDK layer's codec."""
    from allowance._sdk.openai import OpenAICodec

    codec = OpenAICodec()
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "token " * 100_000}],
        "max_tokens": 100,
    }
    times = []
    for _ in range(rounds // 10):
        start = time.perf_counter_ns()
        codec.estimate("/chat/completions", body)
        times.append((time.perf_counter_ns() - start) / 1000)
    median = statistics.median(times)
    return (
        "estimate a 100k-token prompt (cheap bound)",
        {
            "raw": 0.0,
            "guarded": median,
            "added": median,
            "added_cpu": median,
            "p99": quantile(times, 0.99),
            "raw_p99": 0.0,
        },
        "no exact count: the budget is far from its limit",
    )


def peer_rows(fake: RemoteProvider, rounds: int, tmp: Path) -> list[Row]:
    """The same scenarios through tokencap, llm-toll and tokenfence."""
    raw_client = sdk_client(fake)
    rows: list[Row] = []

    def tokencap_client() -> Any:
        import tokencap
        from tokencap.backends.sqlite import SQLiteBackend

        tokencap.teardown()
        policy = tokencap.Policy(
            dimensions={"session": tokencap.DimensionPolicy(limit=10**15)}
        )
        tokencap.init(
            policy,
            backend=SQLiteBackend(str(tmp / "tokencap.db")),
            otel_enabled=False,
            quiet=True,
        )
        return tokencap.wrap(sdk_client(fake))

    def tokenfence_client() -> Any:
        import tokenfence

        return tokenfence.guard(sdk_client(fake), budget=1000.0, on_limit="raise")

    def llm_toll_client() -> Any:
        import llm_toll

        llm_toll.set_store(llm_toll.SQLiteStore(db_path=str(tmp / "llm_toll.db")))
        llm_toll.set_reporter(llm_toll.CostReporter(enabled=False))  # no line per call
        inner = sdk_client(fake)

        @llm_toll.track_costs(project="bench", max_budget=1000.0)  # type: ignore[untyped-decorator]
        def tracked(**kwargs: Any) -> Any:
            return inner.chat.completions.create(**kwargs)

        class Completions:
            create = staticmethod(tracked)

        class Chat:
            completions = Completions()

        class Client:
            chat = Chat()

        return Client()

    peers = [
        ("tokencap 0.2 (SQLite)", tokencap_client),
        ("tokenfence 0.3 (in memory)", tokenfence_client),
        ("llm-toll 0.13 (SQLite, decorator)", llm_toll_client),
    ]
    for name, make in peers:
        try:
            client = make()
        except Exception as err:  # noqa: BLE001 - a row says why
            rows.append((f"chat, {name}", None, f"cannot set up: {err!r:.60}"))
            continue
        for scenario, raw, guarded, scale in (
            ("chat", chat(raw_client), chat(client), 1),
            ("chat stream", stream(raw_client), stream(client), 4),
        ):
            label = f"{scenario}, {name}"
            try:
                guarded()
                rows.append((label, measure(raw, guarded, rounds // scale), ""))
            except Exception as err:  # noqa: BLE001 - a row says why
                rows.append((label, None, f"cannot run: {err!r:.60}"))
        rows.append(
            (
                f"{CONCURRENT_LABEL}, {name}",
                None,
                "not measured: sync scenarios only for peers",
            )
        )
    return rows


def concurrency(
    fake: RemoteProvider, calls: int, runs: int = 5
) -> tuple[float, float, float, float]:
    """Wall seconds of ``calls`` gathered calls, raw and guarded; and process CPU.

    Returns the medians of ``runs`` alternating runs of each: wall time, then
    the process's CPU time (``process_time``: the event loop's work, which is
    what the guard adds to; the fake provider runs in another process).
    """

    async def run(guarded: bool) -> tuple[float, float]:
        client = openai.AsyncOpenAI(
            base_url=fake.openai_base_url, api_key="x", max_retries=0
        )
        if guarded:
            allowance.wrap(client, budget="$1000", ledger="memory://")
        async with client:
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
                    )
                    for _ in range(50)
                )
            )
            start, start_cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
                    )
                    for _ in range(calls)
                )
            )
            return time.perf_counter() - start, time.process_time() - start_cpu

    # Alternate, median of several each: one run's wall time is noisy.
    raws: list[tuple[float, float]] = []
    guardeds: list[tuple[float, float]] = []
    for i in range(runs):
        for guarded in (False, True) if i % 2 else (True, False):
            (guardeds if guarded else raws).append(asyncio.run(run(guarded)))
    return (
        statistics.median(wall for wall, _ in raws),
        statistics.median(wall for wall, _ in guardeds),
        statistics.median(cpu for _, cpu in raws),
        statistics.median(cpu for _, cpu in guardeds),
    )


class RemoteProvider:
    """A FakeProvider in a child process; ``latency`` is set by restarting it."""

    def __init__(self, latency: float = 0.0) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.start(latency)

    def start(self, latency: float) -> None:
        self.stop()
        code = (
            "import sys, time\n"
            "from allowance.testing import FakeProvider\n"
            f"fake = FakeProvider(latency={latency!r}, text={TEXT!r}).start()\n"
            "print(fake.openai_base_url, flush=True)\n"
            "sys.stdin.read()\n"
        )
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self.openai_base_url = self._process.stdout.readline().strip()

    def stop(self) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            self._process.wait(timeout=10)
            self._process = None


PROCESS_LEDGERS = {
    "memory": "memory://",
    "SQLite": "sqlite:///{tmp}/process.db",
    "SQLite write-behind": "sqlite:///{tmp}/process.db?write_behind=0.05",
}


def one_process(ledger: str, rounds: int) -> None:
    """Measure one ledger's chat row in this (fresh) process; print it as JSON."""
    fake = RemoteProvider()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            client = guarded(fake, PROCESS_LEDGERS[ledger].format(tmp=tmp))
            result = measure(chat(sdk_client(fake)), chat(client), rounds)
            client.allowance.guard.close()
    finally:
        fake.stop()
    print(json.dumps(result))  # read by process_rows


def process_rows(rounds: int, processes: int) -> list[Row]:
    """Each ledger's chat row in fresh processes, alternating ledgers; the median.

    One process's figure moves by tens of µs with what the machine does and
    where the process's code and data landed in memory; the median of several
    processes moves much less.
    """
    results: dict[str, list[dict[str, float]]] = {name: [] for name in PROCESS_LEDGERS}
    for _ in range(processes):
        for name in PROCESS_LEDGERS:
            out = subprocess.run(
                [sys.executable, __file__, "--one", name, "-n", str(rounds)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    rows: list[Row] = []
    for name, runs in results.items():
        added = [r["added"] for r in runs]
        rows.append(
            (
                f"chat, {name} ledger: median of {processes} processes",
                {key: statistics.median(r[key] for r in runs) for key in runs[0]},
                f"each process's added: {min(added):.0f}-{max(added):.0f}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--rounds", type=positive, default=2000)
    parser.add_argument("--concurrent", type=positive, default=1000)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument(
        "--processes",
        type=int,
        default=5,
        help="fresh processes for the per-process memory and SQLite rows (0: none)",
    )
    parser.add_argument("--one", choices=list(PROCESS_LEDGERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_process(args.one, args.rounds)
        return
    console = Console(width=max(140, Console().width))
    fake = RemoteProvider()
    # A throwaway redis-server on a free local port, when one is installed.
    redis = RedisServer().start() if RedisServer.available() else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = sync_scenarios(
                fake, args.rounds, Path(tmp), redis.url if redis else None
            )
            rows.extend(process_rows(args.rounds, args.processes))
            rows.append(guard_alone_row(args.rounds))
            rows.append(estimate_row(args.rounds))
            peers = [] if args.no_peers else peer_rows(fake, args.rounds, Path(tmp))
            counted = counted_rows(fake, Path(tmp))
        fake.start(latency=0.02)
        raw_wall, guarded_wall, raw_cpu, guarded_cpu = concurrency(
            fake, args.concurrent
        )
    finally:
        fake.stop()
        if redis is not None:
            redis.close()
    ms = 1000
    rows.append(
        (
            CONCURRENT_LABEL.replace("1,000", f"{args.concurrent:,}") + ", memory",
            {
                "raw": raw_wall * ms,
                "guarded": guarded_wall * ms,
                "added": (guarded_wall - raw_wall) * ms,
                "added_cpu": (guarded_cpu - raw_cpu) * ms,
                "p99": float("nan"),
                "raw_p99": float("nan"),
            },
            "median of 5 alternating runs each; added CPU: the whole process",
        )
    )
    table = Table(
        title=f"allowance overhead, N={args.rounds} interleaved rounds (µs unless said)"
    )
    for column in (
        "scenario",
        "raw",
        "guarded",
        "added",
        "added CPU",
        "ratio",
        "p99 raw",
        "p99 guarded",
        "note",
    ):
        justify: JustifyMethod = "left" if column in {"scenario", "note"} else "right"
        table.add_column(column, justify=justify)

    def number(value: float, digits: int = 0) -> str:
        return "" if math.isnan(value) else f"{value:.{digits}f}"  # NaN: not measured

    for name, r, note in rows + peers:
        if r is None:
            table.add_row(name, "", "", "", "", "", "", "", note)
            continue
        precise = 2 if "per chunk" in name else 1
        table.add_row(
            name,
            number(r["raw"], precise - 1),
            number(r["guarded"], precise - 1),
            number(r["added"], precise),
            number(r["added_cpu"], precise),
            f"{r['guarded'] / r['raw']:.3f}" if r["raw"] else "",
            number(r["raw_p99"]) if r["raw_p99"] else "",
            number(r["p99"]),
            note,
        )
    console.print(table)
    counts = Table(
        title="Bytecodes run per call: counted, not timed (no machine noise; "
        f"Python {sys.version_info.major}.{sys.version_info.minor})"
    )
    counts.add_column("scenario")
    counts.add_column("bytecodes", justify="right")
    counts.add_column("note")
    for row in counted:
        counts.add_row(*row)
    console.print(counts)


if __name__ == "__main__":
    main()
