"""What each framework adapter adds to a call: raw framework vs guarded, interleaved A/B.

Usage: ``uv run noxfile.py -s "bench_frameworks(framework='langchain')"``, or in
an environment with the framework and its integration installed:
``python benchmarks/frameworks.py --framework langchain|crewai|llamaindex -n 500``.

The same method as ``overhead.py`` (whose helpers this imports): the fake
provider in a child process with no delay, one process, interleaved rounds
(alternating which side goes first), medians of the per-round differences of
wall and thread CPU time, each side's p99; memory ledger, ``budget="$1000"`` so
nothing is refused. Each row also counts, free of the machine's noise, the
bytecodes one guarded call runs beyond one raw call (``overhead.bytecodes``;
for CrewAI in every thread): in the whole process (what the adapter makes the
framework do included), and in allowance's own code. The guarded side is the
framework's own call with the adapter in force:

- langchain: ``ChatOpenAI.invoke`` (``ainvoke``, ``stream``; and
  ``ChatAnthropic.invoke``) with an ``AllowanceCallbackHandler`` in
  ``config["callbacks"]`` (built once);
- llamaindex: ``OpenAI.chat`` (``achat``, a query engine) with
  ``instrument(guard=...)`` in force; it is process-wide, so it is toggled
  between calls;
- crewai: ``Crew.kickoff`` of one agent with one task, with
  ``allowance_crewai.install(guard)`` in force, toggled between kickoffs.

Each adapter routes the call to the SDK layer beneath, which hooks the openai
SDK class-wide on first use and stays hooked, passing other calls through,
after the adapter is removed. The raw side here is the framework with that hook
removed too (switching happens outside the timed region), so "added" is the
whole cost of guarding; the "SDK hook left in pass-through" row is what the
hook alone costs a call nobody guards.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).parent))

from overhead import (
    WARMUP,
    RemoteProvider,
    bytecodes,
    everything,
    is_allowance,
    quantile,
)
from rich.console import Console
from rich.table import Table

import allowance
from allowance import plugins
from allowance.integration import SDK_PROVIDERS

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

PROMPT = "Say hello in five words."
STREAM_TOKENS = 200  # the fake answers one word per chunk, cut to max_tokens
BUDGET = "$1000"
LEDGER = "memory://"

Row = tuple[str, "dict[str, float] | None", str]


def measure(
    raw: Callable[[], Callable[[], Any]],
    guarded: Callable[[], Callable[[], Any]],
    rounds: int,
    warmup: int = WARMUP,
    *,
    all_threads: bool = False,
) -> dict[str, float]:
    """``overhead.measure``, but each side is a factory run outside the timed region.

    A factory switches the process to its side (adapter on or off: each switch
    is idempotent) and returns the call to time, so a process-wide adapter can
    be toggled per round without timing the toggle. ``all_threads``: the
    framework works on other threads too (CrewAI): CPU time is the process's,
    not the calling thread's, and bytecodes are counted in every thread.

    Then it counts instead of timing: the bytecodes one guarded call runs in
    the whole process (every frame: the framework's, the SDK's, allowance's)
    less one raw call's, and the same in allowance's frames alone
    (``overhead.bytecodes``), free of the machine's noise. (A CrewAI
    kickoff's process count moves by ~1,000 between kickoffs: its threads.)
    """
    cpu_clock = time.process_time_ns if all_threads else time.thread_time_ns
    for _ in range(warmup):
        raw()()
        guarded()()
    wall: dict[Any, list[float]] = {raw: [], guarded: []}
    cpu: dict[Any, list[float]] = {raw: [], guarded: []}
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            for side in (raw, guarded) if i % 2 else (guarded, raw):
                fn = side()
                start, start_cpu = time.perf_counter_ns(), cpu_clock()
                fn()
                cpu[side].append((cpu_clock() - start_cpu) / 1000)
                wall[side].append((time.perf_counter_ns() - start) / 1000)
    finally:
        gc.enable()

    def added(times: dict[Any, list[float]]) -> float:
        return statistics.median(
            y - x for x, y in zip(times[raw], times[guarded], strict=True)
        )

    process: dict[Any, int] = {}
    ours: dict[Any, int] = {}
    for side in (raw, guarded):
        for counts, frames in ((process, everything), (ours, is_ours)):
            side()()  # warm; then a fresh call from the factory (a fresh crew)
            counts[side] = bytecodes(
                side(), frames, all_threads=all_threads, warm=False
            )
    return {
        "raw": statistics.median(wall[raw]),
        "guarded": statistics.median(wall[guarded]),
        "added": added(wall),
        "added_cpu": added(cpu),
        "p99": quantile(wall[guarded], 0.99),
        "raw_p99": quantile(wall[raw], 0.99),
        "bytecodes": process[guarded] - process[raw],
        "ours": ours[guarded] - ours[raw],
    }


def is_ours(frame: FrameType) -> bool:
    """Allowance's code, its framework integrations' included."""
    return is_allowance(frame) or f"{os.sep}allowance_" in frame.f_code.co_filename


class SdkHook:
    """An SDK layer's class-wide hook (openai's unless said), switched between calls."""

    def __init__(self, provider: str = "openai") -> None:
        self.adapter: Any = plugins.adapters()[SDK_PROVIDERS[provider]]

    def on(self) -> None:
        self.adapter.hook()

    def off(self) -> None:
        self.adapter.uninstall()

    @property
    def hooked(self) -> bool:
        return bool(self.adapter._originals)  # noqa: SLF001 - a benchmark's probe


def toggled(
    on: Callable[[], None], off: Callable[[], None]
) -> Callable[[Callable[[], Any], Callable[[], Any]], tuple[Any, Any]]:
    """Factories for ``measure``: ``raw`` runs with ``off()``, ``guarded`` with ``on()``."""

    def sides(raw: Callable[[], Any], guarded: Callable[[], Any]) -> tuple[Any, Any]:
        def raw_side() -> Callable[[], Any]:
            off()
            return raw

        def guarded_side() -> Callable[[], Any]:
            on()
            return guarded

        return raw_side, guarded_side

    return sides


def per_chunk(result: dict[str, float], chunks: int) -> dict[str, float]:
    return {key: value / chunks for key, value in result.items()}


def passthrough_row(sdk: SdkHook, call: Callable[[], Any], rounds: int) -> Row:
    """The same unguarded call with the SDK layer's hook off, then on (not routed)."""
    raw, hooked = toggled(sdk.on, sdk.off)(call, call)
    return (
        "SDK hook left in pass-through, no adapter",
        measure(raw, hooked, rounds),
        "what a call nobody guards pays once an adapter has run",
    )


# -- LangChain ---------------------------------------------------------------------


def langchain_rows(fake: RemoteProvider, rounds: int) -> list[Row]:
    from langchain_anthropic import ChatAnthropic
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    from allowance_langchain import AllowanceCallbackHandler

    def model(max_tokens: int) -> Any:
        # The fields by the names their types know (the aliases of max_tokens
        # and model): the same fields, the same request.
        return ChatOpenAI(
            base_url=fake.openai_base_url,
            api_key=SecretStr("x"),
            max_retries=0,
            max_completion_tokens=max_tokens,
            model="gpt-4o-mini",
        )

    llm, streaming = model(16), model(STREAM_TOKENS)
    handler = AllowanceCallbackHandler(budget=BUDGET, ledger=LEDGER)
    config: Any = {"callbacks": [handler]}
    sdk = SdkHook()
    # The handler is per call: only the SDK layer's hook needs switching.
    sides = toggled(sdk.on, sdk.off)
    rows: list[Row] = []

    raw, guarded = sides(
        lambda: llm.invoke(PROMPT), lambda: llm.invoke(PROMPT, config=config)
    )
    rows.append(("invoke", measure(raw, guarded, rounds), ""))
    claude = ChatAnthropic(
        base_url=fake.openai_base_url.removesuffix("/v1"),
        api_key=SecretStr("x"),
        max_retries=0,
        max_tokens_to_sample=16,
        model_name="claude-haiku-4-5",
        timeout=None,  # the defaults, which mypy sees as required
        stop=None,
    )
    anthropic_sdk = SdkHook("anthropic")
    raw, guarded = toggled(anthropic_sdk.on, anthropic_sdk.off)(
        lambda: claude.invoke(PROMPT), lambda: claude.invoke(PROMPT, config=config)
    )
    rows.append(("invoke, ChatAnthropic", measure(raw, guarded, rounds), ""))
    anthropic_sdk.off()
    # LangChain's own price for any handler: a handler that does nothing.
    noop: Any = {"callbacks": [BaseCallbackHandler()]}
    raw, guarded = toggled(sdk.off, sdk.off)(
        lambda: llm.invoke(PROMPT), lambda: llm.invoke(PROMPT, config=noop)
    )
    rows.append(
        (
            "invoke, a no-op callback handler instead",
            measure(raw, guarded, rounds),
            "LangChain's callback machinery alone, no allowance",
        )
    )

    loop = asyncio.new_event_loop()
    try:
        raw, guarded = sides(
            lambda: loop.run_until_complete(llm.ainvoke(PROMPT)),
            lambda: loop.run_until_complete(llm.ainvoke(PROMPT, config=config)),
        )
        rows.append(
            ("ainvoke", measure(raw, guarded, rounds), "one event loop, reused")
        )
    finally:
        loop.close()

    chunks = len(list(streaming.stream(PROMPT)))
    raw, guarded = sides(
        lambda: list(streaming.stream(PROMPT)),
        lambda: list(streaming.stream(PROMPT, config=config)),
    )
    whole = measure(raw, guarded, rounds // 4, min(WARMUP, rounds // 4))
    rows.append((f"stream, {chunks} chunks: whole call", whole, f"N={rounds // 4}"))
    rows.append(
        (
            "stream: per chunk",
            per_chunk(whole, chunks),
            "upper bound: the whole call's added time / chunks",
        )
    )
    raw, guarded = toggled(sdk.off, sdk.off)(
        lambda: list(streaming.stream(PROMPT)),
        lambda: list(streaming.stream(PROMPT, config=noop)),
    )
    noop_whole = measure(raw, guarded, rounds // 4, min(WARMUP, rounds // 4))
    rows.append(
        (
            "stream: per chunk, a no-op callback handler instead",
            per_chunk(noop_whole, chunks),
            "LangChain calls every handler on every chunk",
        )
    )
    rows.append(passthrough_row(sdk, lambda: llm.invoke(PROMPT), rounds))
    sdk.off()
    return rows


# -- LlamaIndex --------------------------------------------------------------------


def llamaindex_rows(fake: RemoteProvider, rounds: int) -> list[Row]:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAI

    from allowance_llamaindex import instrument, uninstrument

    llm = OpenAI(
        model="gpt-4o-mini",
        api_base=fake.openai_base_url,
        api_key="x",
        max_retries=0,
        max_tokens=16,
    )
    messages = [ChatMessage(role="user", content=PROMPT)]
    guard = allowance.Guard(budget=BUDGET, ledger=LEDGER)
    sdk = SdkHook()

    def on() -> None:
        sdk.on()
        instrument(guard=guard)

    def off() -> None:
        uninstrument()
        sdk.off()

    sides = toggled(on, off)
    # What uninstrument() leaves behind, checked rather than assumed.
    on()
    uninstrument()
    left = "SDK hook stays after uninstrument()" if sdk.hooked else ""
    sdk.off()
    rows: list[Row] = []

    raw, guarded = sides(lambda: llm.chat(messages), lambda: llm.chat(messages))
    rows.append(("chat", measure(raw, guarded, rounds), ""))

    loop = asyncio.new_event_loop()
    try:

        def achat() -> Any:
            return loop.run_until_complete(llm.achat(messages))

        raw, guarded = sides(achat, achat)
        rows.append(("achat", measure(raw, guarded, rounds), "one event loop, reused"))
    finally:
        loop.close()

    rows.append(query_engine_row(fake, llm, sides, rounds))
    # The adapter off (a query row's last side leaves it on): the SDK hook
    # alone, toggled by the row. With ``instrument()`` still in force, the raw
    # side's calls were the adapter's own to charge (no SDK layer beneath).
    off()
    rows.append(passthrough_row(sdk, lambda: llm.chat(messages), rounds))
    sdk.off()
    if left:
        name, result, note = rows[-1]
        rows[-1] = (name, result, f"{left}; {note}")
    return rows


def query_engine_row(fake: RemoteProvider, llm: Any, sides: Any, rounds: int) -> Row:
    """A VectorStoreIndex over a few documents: embed the query, retrieve, one chat."""
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.embeddings.openai import OpenAIEmbedding

    embed = OpenAIEmbedding(
        model="text-embedding-3-small",
        api_base=fake.openai_base_url,
        api_key="x",
        max_retries=0,
    )
    docs = [
        Document(text=f"Document {i}: the author wrote essay number {i}.")
        for i in range(5)
    ]
    index = VectorStoreIndex.from_documents(docs, embed_model=embed)
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)

    def query() -> Any:
        return engine.query("What did the author write?")

    raw, guarded = sides(query, query)
    n = rounds // 2
    return (
        "query engine: embed + retrieve + chat",
        measure(raw, guarded, n, min(WARMUP, n)),
        f"N={n}; 2 guarded calls per query (embedding, chat)",
    )


# -- CrewAI ------------------------------------------------------------------------

CREWAI_ENV = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TESTING": "true",
    "CREWAI_STORAGE_DIR": "allowance-crewai-bench",
}


def crewai_offline(home: Path) -> None:
    """Keep CrewAI offline and out of the home directory: before importing it."""
    os.environ.update(CREWAI_ENV)
    os.environ["HOME"] = str(home)
    for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        os.environ[name] = str(home / name.lower())


def crewai_rows(fake: RemoteProvider, rounds: int) -> list[Row]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import crewai

    logging.getLogger("crewai").setLevel(logging.ERROR)  # a warning per call
    import allowance_crewai

    llm = crewai.LLM(
        model="gpt-4o-mini", base_url=fake.openai_base_url, api_key="x", max_tokens=16
    )

    def crew() -> Any:
        agent = crewai.Agent(
            role="researcher",
            goal="Be a good researcher.",
            backstory="Terse.",
            llm=llm,
            max_iter=3,
            max_retry_limit=2,
            verbose=False,
        )
        task = crewai.Task(
            description="Say hello in one line.",
            expected_output="One line.",
            agent=agent,
        )
        return crewai.Crew(agents=[agent], tasks=[task], verbose=False)

    guard = allowance.Guard(budget=BUDGET, ledger=LEDGER)
    sdk = SdkHook()

    # A fresh crew per kickoff, built outside the timed region.
    def raw() -> Callable[[], Any]:
        allowance_crewai.uninstall()
        sdk.off()
        kickoff: Callable[[], Any] = crew().kickoff
        return kickoff

    def guarded() -> Callable[[], Any]:
        sdk.on()
        allowance_crewai.install(guard)
        kickoff: Callable[[], Any] = crew().kickoff
        return kickoff

    warmup = min(WARMUP, max(5, rounds // 5))
    # CrewAI works on other threads too (its event bus): count the process's CPU.
    result = measure(raw, guarded, rounds, warmup, all_threads=True)
    calls = len(guard.ledger.calls()) / (warmup + rounds)
    allowance_crewai.uninstall()
    left = "SDK hook stays after uninstall()" if sdk.hooked else ""
    note = f"N={rounds}; {calls:.2f} model calls/kickoff; CPU: all threads"
    rows: list[Row] = [("kickoff: 1 agent, 1 task (fresh crew)", result, note)]
    passthrough = passthrough_row(sdk, lambda: llm.call(PROMPT), rounds * 5)
    rows.append((passthrough[0] + ", LLM.call", passthrough[1], left))
    sdk.off()
    return rows


# -- table -------------------------------------------------------------------------


def print_table(title: str, rows: list[Row]) -> None:
    table = Table(title=title)
    for column in (
        "scenario",
        "raw",
        "guarded",
        "added",
        "added CPU",
        "added bytecodes",
        "allowance's",
        "ratio",
        "p99 raw",
        "p99 guarded",
        "note",
    ):
        table.add_column(
            column, justify="left" if column in {"scenario", "note"} else "right"
        )

    def number(value: float, digits: int = 0) -> str:
        return "" if math.isnan(value) else f"{value:.{digits}f}"

    for name, r, note in rows:
        if r is None:
            table.add_row(name, "", "", "", "", "", "", "", "", "", note)
            continue
        precise = 2 if "per chunk" in name else 1
        table.add_row(
            name,
            number(r["raw"], precise - 1),
            number(r["guarded"], precise - 1),
            number(r["added"], precise),
            number(r["added_cpu"], precise),
            number(r["bytecodes"], precise - 1),
            number(r["ours"], precise - 1),
            f"{r['guarded'] / r['raw']:.3f}" if r["raw"] else "",
            number(r["raw_p99"]),
            number(r["p99"]),
            note,
        )
    Console(width=max(140, Console().width)).print(table)


FRAMEWORKS = {
    "langchain": (langchain_rows, "langchain-openai", 2000),
    "llamaindex": (llamaindex_rows, "llama-index-llms-openai", 2000),
    "crewai": (crewai_rows, "crewai", 100),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--framework", choices=list(FRAMEWORKS), required=True)
    parser.add_argument("-n", "--rounds", type=int, default=None)
    args = parser.parse_args()
    rows_of, distribution, default_rounds = FRAMEWORKS[args.framework]
    rounds = args.rounds or default_rounds
    with tempfile.TemporaryDirectory() as tmp:
        if args.framework == "crewai":
            crewai_offline(Path(tmp))  # the fake provider's process inherits it
        fake = RemoteProvider()
        try:
            rows = rows_of(fake, rounds)
        finally:
            fake.stop()
    from importlib.metadata import version

    print_table(
        f"allowance {args.framework} adapter ({distribution} {version(distribution)}),"
        f" memory ledger, N={rounds} interleaved rounds (µs)",
        rows,
    )


if __name__ == "__main__":
    main()
