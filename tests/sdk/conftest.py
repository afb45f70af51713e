"""Shared helpers for the SDK-layer tests: real SDK clients on the fake provider.

Every test here drives the real ``openai`` and ``anthropic`` SDKs over loopback
HTTP against :class:`allowance.testing.FakeProvider`; nothing of the SDKs is
mocked or patched by the tests themselves. One test body serves the sync and the
async client: :func:`aw`, :func:`drain` and :func:`enter` await or iterate
whatever the client returned.
"""

from __future__ import annotations

import inspect
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

import anthropic
import openai
import pytest

import allowance
from allowance import prices
from allowance.testing import FakeProvider, FakeUsage

if TYPE_CHECKING:
    import contextlib
    from collections.abc import AsyncIterator, Callable

GPT = "gpt-4o"
MINI = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
EMBEDDING = "text-embedding-3-small"
USER: Any = [{"role": "user", "content": "Say hello."}]

USAGE = FakeUsage(
    input_tokens=1200,
    output_tokens=40,
    cached_tokens=300,
    cache_write_tokens=100,
    reasoning_tokens=10,
)
"""What the fake provider reports for generation calls (allowance's convention)."""


class Loopback:
    """An HTTP server on 127.0.0.1 whose answers a test writes.

    ``answer(path, body)`` returns ``(status, body)`` for each POST (a
    non-empty body is sent as JSON). For what the fake provider will not
    send (a body cut short, a usage that is not a count) and for webhook
    receivers. ``url`` has no path; ``stop()`` shuts it down.
    """

    def __init__(self, answer: Callable[[str, bytes], tuple[int, bytes]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                status, body = answer(
                    self.path, self.rfile.read(int(self.headers["content-length"]))
                )
                self.send_response(status)
                if body:
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


USD_BUDGET = "$5"
TOKEN_BUDGET = 1_000_000


def as_usage(fake: FakeUsage) -> allowance.Usage:
    """Return the usage allowance should read from a response reporting ``fake``."""
    return allowance.Usage(
        input_tokens=fake.input_tokens,
        output_tokens=fake.output_tokens,
        cache_read_tokens=fake.cached_tokens,
        cache_write_tokens=fake.cache_write_tokens,
        reasoning_tokens=fake.reasoning_tokens,
    )


def expected_charge(
    unit: str, provider: str, model: str, usage: allowance.Usage
) -> int:
    """Return what a budget of ``unit`` must be charged for ``usage``."""
    if unit == "usd":
        return prices.cost_micros(provider, model, usage)
    return usage.input_tokens + usage.output_tokens


def budget_for(unit: str) -> str | int:
    """Return a budget large enough for any single call of these tests."""
    return USD_BUDGET if unit == "usd" else TOKEN_BUDGET


async def aw(value: Any) -> Any:
    """Await ``value`` if the async client returned an awaitable."""
    return await value if inspect.isawaitable(value) else value


async def drain(stream: Any, limit: int = 1000) -> list[Any]:
    """Consume a sync or async stream to its end (bounded) and return its items."""
    items: list[Any] = []
    if hasattr(stream, "__aiter__"):
        async for item in stream:
            items.append(item)
            assert len(items) < limit, "unbounded stream"
    else:
        for item in stream:
            items.append(item)
            assert len(items) < limit, "unbounded stream"
    return items


async def take(stream: Any, count: int) -> list[Any]:
    """Read the first ``count`` items of a sync or async stream, then stop."""
    items: list[Any] = []
    if hasattr(stream, "__aiter__"):
        async for item in stream:
            items.append(item)
            if len(items) == count:
                break
    else:
        for item in stream:
            items.append(item)
            if len(items) == count:
                break
    return items


async def enter(stack: contextlib.AsyncExitStack, manager: Any) -> Any:
    """Enter a sync or async context manager on ``stack``."""
    if hasattr(manager, "__aenter__"):
        return await stack.enter_async_context(manager)
    return stack.enter_context(manager)


async def close(obj: Any) -> None:
    """Close a sync or async stream or client."""
    await aw(obj.close())


def only_record(guard: allowance.Guard) -> allowance.CallRecord:
    """Return the single call the guard's ledger logged."""
    calls = guard.ledger.calls()
    assert len(calls) == 1, calls
    return calls[0]


def assert_settled(guard: allowance.Guard) -> None:
    """Assert that no budget of ``guard`` still holds a reservation."""
    for status in guard.status():
        assert status.reserved == 0, status.describe()


@pytest.fixture(autouse=True)
def _always_unpatch() -> Any:
    """Leave the SDK classes as they were, whatever a test did."""
    yield
    allowance.unpatch()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    """Drive the sync or the async client."""
    return str(request.param)


@pytest.fixture(params=["wrap", "patch"])
def mode(request: pytest.FixtureRequest) -> str:
    """Guard the client with ``allowance.wrap`` or ``allowance.patch``."""
    return str(request.param)


@pytest.fixture(params=["usd", "tokens"])
def unit(request: pytest.FixtureRequest) -> str:
    """Budget in US dollars or in tokens."""
    return str(request.param)


@pytest.fixture
async def clients(fake_provider: FakeProvider) -> AsyncIterator[Callable[..., Any]]:
    """Build real SDK clients on the fake provider; all are closed at teardown.

    ``clients(sdk, kind, **options)``: ``sdk`` is ``"openai"``, ``"azure"`` or
    ``"anthropic"``; ``kind`` is ``"sync"`` or ``"async"``. Defaults: no
    retries, a 10 s timeout.
    """
    made: list[Any] = []

    def make(sdk: str, kind: str, **options: Any) -> Any:
        base_url = (
            fake_provider.anthropic_base_url
            if sdk == "anthropic"
            else fake_provider.openai_base_url
        )
        options = {
            "api_key": "test",
            "max_retries": 0,
            "timeout": 10.0,
            "base_url": base_url,
            **options,
        }
        if sdk == "anthropic":
            cls: Any = (
                anthropic.Anthropic if kind == "sync" else anthropic.AsyncAnthropic
            )
        elif sdk == "azure":
            cls = openai.AzureOpenAI if kind == "sync" else openai.AsyncAzureOpenAI
            options.setdefault("api_version", "2024-10-21")
        else:
            cls = openai.OpenAI if kind == "sync" else openai.AsyncOpenAI
        client = cls(**options)
        made.append(client)
        return client

    yield make
    for client in made:
        await close(client)


@pytest.fixture
def guarded(clients: Callable[..., Any]) -> Callable[..., tuple[Any, allowance.Guard]]:
    """Build a client and guard it by ``wrap`` or ``patch``: ``(client, guard)``.

    ``guarded(sdk, kind, mode, budget=..., **guard_options)`` with the client's
    own options under ``client_options``. The ledger is a fresh ``memory://``.
    """

    def make(
        sdk: str,
        kind: str,
        mode: str,
        budget: Any,
        *,
        client_options: dict[str, Any] | None = None,
        **guard_options: Any,
    ) -> tuple[Any, allowance.Guard]:
        client = clients(sdk, kind, **(client_options or {}))
        guard_options.setdefault("ledger", "memory://")
        if mode == "wrap":
            allowance.wrap(client, budget, **guard_options)
            return client, client.allowance.guard
        return client, allowance.patch(budget, **guard_options)

    return make
