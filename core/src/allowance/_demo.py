"""``allowance demo``: the library at work on the real SDKs, offline.

Starts the fake provider on 127.0.0.1 and runs five short scenes against one
SQLite ledger, then one scene per installed framework integration (LangChain,
CrewAI, LlamaIndex: the ``allowance_demo_scenes`` hook) on the same ledger,
printing what happens as it goes, then the report.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allowance._budget import Budget, Threshold, format_amount
from allowance._errors import BudgetExceeded, BudgetThresholdWarning
from allowance._guard import Guard
from allowance._policy import Policy
from allowance._scope import budget, scope
from allowance._wrap import wrap

if TYPE_CHECKING:
    from rich.console import Console

    from allowance.testing import FakeProvider

__all__ = ["run_demo"]

QUESTION = [{"role": "user", "content": "Summarise the quarterly report in two lines."}]
ANSWER = (
    "Revenue grew eleven percent on stronger subscriptions while costs held flat, "
    "so margins widened; the board expects the same pace next quarter if churn "
    "stays low and the new region opens on time as planned."
)


def _openai(fake: FakeProvider, *, asynchronous: bool = False) -> Any:
    import openai  # noqa: PLC0415 - the demo needs the SDK, the library does not

    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=fake.openai_base_url, api_key="demo", max_retries=0)


def _anthropic(fake: FakeProvider) -> Any:
    import anthropic  # noqa: PLC0415

    return anthropic.Anthropic(
        base_url=fake.anthropic_base_url, api_key="demo", max_retries=0
    )


def _scene(console: Console, number: int, title: str, what: str) -> None:
    console.print()
    console.rule(f"[bold]{number}. {title}")
    console.print(what, style="dim")


def scene_agents(console: Console, fake: FakeProvider, ledger: str) -> None:
    """Three agents on two SDKs: a budget each, and one shared tenant budget."""
    _scene(
        console,
        1,
        "Agents with their own budgets and a shared tenant budget",
        "researcher, writer (OpenAI) and critic (Anthropic) work for tenant acme: "
        "each agent may spend $0.003, the tenant $0.006 a day. "
        "They loop until refused.",
    )
    guard = Guard(
        Policy(
            [
                Budget("$0.003", per="agent", name="agent"),
                Budget("$0.006", per="tenant", window="day", name="tenant_daily"),
            ]
        ),
        ledger=ledger,
    )
    clients = {
        "researcher": (wrap(_openai(fake), guard=guard), "gpt-4o"),
        "writer": (wrap(_openai(fake), guard=guard), "gpt-4o"),
        "critic": (wrap(_anthropic(fake), guard=guard), "claude-sonnet-4-5"),
    }
    calls = dict.fromkeys(clients, 0)
    stopped: dict[str, str] = {}
    with scope(tenant="acme"):
        for _round in range(40):
            for agent, (client, model) in clients.items():
                if agent in stopped:
                    continue
                with scope(agent=agent):
                    try:
                        if model.startswith("claude"):
                            client.messages.create(
                                model=model, max_tokens=64, messages=QUESTION
                            )
                        else:
                            client.chat.completions.create(
                                model=model, max_tokens=64, messages=QUESTION
                            )
                        calls[agent] += 1
                    except BudgetExceeded as err:
                        stopped[agent] = err.violations[0].budget
            if len(stopped) == len(clients):
                break
    for agent in clients:
        spent = guard.status({"tenant": "acme", "agent": agent})
        console.print(
            f"  {agent:<10} {calls[agent]:>2} calls, "
            f"agent spent {format_amount(spent[0].spent, 'usd')}, "
            f"stopped by the [bold]{stopped.get(agent, '-')}[/] budget"
        )
    tenant = guard.status({"tenant": "acme"})[0]
    console.print(
        f"  tenant acme: {format_amount(tenant.spent, 'usd')} of "
        f"{format_amount(tenant.limit, 'usd')}, nothing held in flight "
        f"(reserved {format_amount(tenant.reserved, 'usd')})"
    )
    guard.close()


def scene_burst(console: Console, fake: FakeProvider, ledger: str) -> None:
    """100 concurrent async calls against a budget that fits exactly 10."""
    from allowance._sdk.openai import CODEC  # noqa: PLC0415

    body = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": QUESTION}
    worst = CODEC.estimate("/chat/completions", body).total_tokens
    _scene(
        console,
        2,
        "A burst: 100 concurrent calls, a budget that fits 10",
        f"asyncio.gather of 100 calls; each may cost {worst} tokens at worst; "
        f"the budget is {10 * worst} tokens. "
        "A check-then-add guard lets them all through.",
    )
    from allowance.testing import FakeUsage  # noqa: PLC0415

    fake.usage = FakeUsage(input_tokens=worst - 16, output_tokens=16)
    client = wrap(
        _openai(fake, asynchronous=True),
        budget=10 * worst,
        ledger=ledger,
        session="burst",
    )
    before = fake.generation_count

    async def one() -> bool:
        try:
            await client.chat.completions.create(**body)
        except BudgetExceeded:
            return False
        return True

    async def burst() -> list[bool]:
        try:
            return await asyncio.gather(*(one() for _ in range(100)))
        finally:
            await client.close()

    started = time.perf_counter()
    results = asyncio.run(burst())
    elapsed = time.perf_counter() - started
    fake.usage = None
    status = client.allowance.status()[0]
    console.print(
        f"  admitted {sum(results)}, refused {results.count(False)}; "
        f"requests that reached the provider: "
        f"[bold]{fake.generation_count - before}[/]; "
        f"spent {status.spent} of {status.limit} tokens, reserved {status.reserved} "
        f"({elapsed * 1000:.0f} ms)"
    )


def scene_thresholds(console: Console, fake: FakeProvider, ledger: str) -> None:
    """Warn at 50%, degrade to a cheaper model at 80%, then block."""
    _scene(
        console,
        3,
        "Warn, degrade, block",
        "One session with $0.005: warn at 50%, switch gpt-4o -> gpt-4o-mini at 80% "
        "(or sooner, when gpt-4o's worst case no longer fits), "
        "block when nothing fits.",
    )
    warned: list[str] = []
    session_budget = Budget(
        "$0.005",
        per="session",
        thresholds=[
            Threshold(
                0.5, "warn", callback=lambda e: warned.append(f"{e.data['at']:.0%}")
            ),
            Threshold(0.8, "degrade", to="gpt-4o-mini"),
        ],
    )
    client = wrap(_openai(fake), session_budget, ledger=ledger, session="thresholds")
    last_model = ""
    for number in range(1, 200):
        try:
            reply = client.chat.completions.create(
                model="gpt-4o", max_tokens=48, messages=QUESTION
            )
        except BudgetExceeded as err:
            console.print(
                f"  call {number:>3}: [red]blocked[/]: {err.violations[0].describe()}"
            )
            break
        status = client.allowance.status()[0]
        notes = []
        if warned:
            notes.append(f"[yellow]warning: crossed {warned.pop()}[/]")
        if reply.model != last_model:
            notes.append(f"[cyan]now answered by {reply.model}[/]")
            last_model = reply.model
        if notes or number == 1:
            console.print(
                f"  call {number:>3}: spent {format_amount(status.spent, 'usd')}"
                f" ({status.spent / status.limit:.0%}) {'; '.join(notes)}"
            )


def scene_per_request(console: Console, fake: FakeProvider, ledger: str) -> None:
    """@allowance.budget: every request handled gets its own fresh budget."""
    _scene(
        console,
        4,
        "A budget per request",
        "@allowance.budget('$0.002') on a request handler: one shared client, "
        "each request may spend $0.002 whatever the others did.",
    )
    client = wrap(_openai(fake), ledger=ledger, session="requests")

    @budget("$0.002")
    def handle(request_id: int) -> int:
        answered = 0
        for _ in range(20):
            try:
                client.chat.completions.create(
                    model="gpt-4o",
                    max_tokens=16,
                    messages=QUESTION,
                    user=f"req-{request_id}",
                )
            except BudgetExceeded:
                break
            answered += 1
        return answered

    for request_id in range(1, 4):
        console.print(
            f"  request {request_id}: {handle(request_id)} model calls "
            "before its budget ran out"
        )


def scene_stop(console: Console, fake: FakeProvider, ledger: str) -> None:
    """on_limit='stop': an empty answer of the SDK's own type, not an exception."""
    _scene(
        console,
        5,
        "Stop instead of raise",
        "on_limit='stop' returns an empty ChatCompletion marked allowance-stop: "
        "an agent loop ends quietly, nothing is sent.",
    )
    client = wrap(
        _openai(fake), budget=200, ledger=ledger, on_limit="stop", session="stop"
    )
    before = fake.generation_count
    reply = client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=400, messages=QUESTION
    )
    console.print(
        f"  got {type(reply).__name__} id={reply.id!r}, "
        f"content={reply.choices[0].message.content!r}; "
        f"requests sent: {fake.generation_count - before}"
    )


def run_demo(console: Console, *, ledger_path: Path | None = None) -> int:
    """Run every scene and print the report; return the exit code."""
    from rich.markup import escape  # noqa: PLC0415

    from allowance._ledger import sqlite_url  # noqa: PLC0415
    from allowance._report import print_report  # noqa: PLC0415
    from allowance.testing import FakeProvider  # noqa: PLC0415

    path = ledger_path or Path.cwd() / "allowance-demo.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    ledger = sqlite_url(path)
    started = time.perf_counter()
    console.print(
        "[bold]allowance demo[/]: the real openai and anthropic SDKs "
        "against a fake provider "
        f"on 127.0.0.1, one ledger at {escape(str(path))}"
    )
    with (
        FakeProvider(text=ANSWER, latency=(0.002, 0.01), seed=7) as fake,
        warnings.catch_warnings(),
    ):
        # The scenes print what the warnings say; don't print it twice.
        warnings.simplefilter("ignore", BudgetThresholdWarning)
        for scene in (
            scene_agents,
            scene_burst,
            scene_thresholds,
            scene_per_request,
            scene_stop,
        ):
            scene(console, fake, ledger)
        failed = _framework_scenes(console, fake, ledger, first=6)
    console.print()
    console.rule("[bold]Report")
    # One dimension the scenes share (every id they record would be long).
    print_report(console, ledger, by=("agent",))
    console.print(
        f"\nDone in {time.perf_counter() - started:.1f} s. "
        f"See it again: [bold]allowance report --ledger {ledger}[/]"
    )
    return 1 if failed else 0


def _framework_scenes(
    console: Console, fake: FakeProvider, ledger: str, *, first: int
) -> list[str]:
    """Run the scenes installed integrations add; return the ones that failed."""
    from allowance import plugins  # noqa: PLC0415

    scenes = sorted(
        (
            scene
            for group in plugins.get_plugin_manager().hook.allowance_demo_scenes()
            for scene in group
        ),
        key=lambda scene: str(getattr(scene, "__module__", "")),
    )
    if not scenes:
        console.print(
            "\n[dim]No framework integration is installed "
            "(allowance-langchain, allowance-crewai, allowance-llamaindex): "
            "their scenes are skipped.[/]"
        )
    failed = []
    for number, scene in enumerate(scenes, start=first):
        try:
            scene(console, fake, ledger, number)
        except Exception:  # noqa: BLE001 - show it, finish the demo, exit non-zero
            name = getattr(scene, "__module__", repr(scene))
            console.print(f"[bold red]The scene from {name} failed:[/]")
            console.print_exception(max_frames=5)
            failed.append(name)
    return failed
