"""Queries, streams, agents and indexing under budgets, against the fake provider."""

from __future__ import annotations

import asyncio
import gc
import json
from collections import Counter
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.node_parser import TokenTextSplitter
from llama_index.core.tools import FunctionTool
from tests.llamaindex.conftest import HttpLLM, openai_llm

import allowance
from allowance.integration import current_route
from allowance.testing import FakeReply, FakeUsage
from allowance_llamaindex import instrument, uninstrument

if TYPE_CHECKING:
    from llama_index.llms.openai import OpenAI

    from allowance.testing import FakeProvider
    from allowance.typing import CallRecord

DOCS = [
    "Allowance keeps agents inside their budgets.",
    "Budgets are enforced before the request reaches the provider.",
    "One shared ledger records every call.",
]


def index() -> VectorStoreIndex:
    """A small index embedded through the fake provider."""
    return VectorStoreIndex.from_documents([Document(text=t) for t in DOCS])


def chats(guard: allowance.Guard) -> list[CallRecord]:
    """The guard's chat calls (not embeddings)."""
    return [r for r in guard.ledger.calls() if r.usage.output_tokens > 0]


def test_query_over_budget_is_blocked_before_any_request(
    fake_provider: FakeProvider,
) -> None:
    idx = index()
    instrument(budget=50, per="query", ledger="memory://")
    with pytest.raises(allowance.BudgetExceeded):
        idx.as_query_engine().query("What does allowance do?")
    assert fake_provider.generation_count == 0
    assert current_route() is None
    assert "query" not in allowance.current_scope()


def test_token_counting_handler_only_counts_after_paying(
    fake_provider: FakeProvider,
) -> None:
    """Contrast: llama-index's own handler sees the tokens once they are spent."""
    counter = TokenCountingHandler()
    llm = openai_llm(fake_provider, callback_manager=CallbackManager([counter]))
    llm.complete("Say hello.")
    assert fake_provider.generation_count == 1
    assert counter.total_llm_token_count > 0


def test_each_query_has_its_own_budget_covering_every_call(
    fake_provider: FakeProvider,
) -> None:
    idx = VectorStoreIndex.from_documents(
        [Document(text=" ".join(DOCS * 4))],
        transformations=[TokenTextSplitter(chunk_size=32, chunk_overlap=0)],
    )
    guard = instrument(budget="$0.25", per="query", ledger="memory://")
    engine = idx.as_query_engine(response_mode="refine", similarity_top_k=3)
    engine.query("What does allowance do?")
    engine.query("Where is the ledger?")
    calls = chats(guard)
    assert len(calls) >= 4  # refine: one call per chunk, per query
    queries = {r.scope["query"] for r in calls}
    assert len(queries) == 2  # nested spans never started another query
    embeds = [r for r in guard.ledger.calls() if r.scope.get("stage") == "embed"]
    assert {r.scope["query"] for r in embeds} == queries  # the query's own embedding
    assert {r.scope["stage"] for r in calls} == {"synthesize"}
    assert all("llamaindex" in r.adapters for r in guard.ledger.calls())
    for status in guard.status():
        assert status.reserved == 0


def test_a_refine_query_stops_at_its_budget_with_nothing_sent_past_it(
    fake_provider: FakeProvider,
) -> None:
    idx = VectorStoreIndex.from_documents(
        [Document(text=" ".join(DOCS * 4))],
        transformations=[TokenTextSplitter(chunk_size=32, chunk_overlap=0)],
    )
    probe = instrument(budget=10**6, per="query", ledger="memory://")
    engine = idx.as_query_engine(response_mode="refine", similarity_top_k=3)
    engine.query("What does allowance do?")
    first = [r.estimate_tokens for r in chats(probe)]
    uninstrument()
    sent = fake_provider.generation_count
    # Room for the embedding and the first refine step only.
    instrument(budget=first[0] + 200, per="query", ledger="memory://")
    with pytest.raises(allowance.BudgetExceeded):
        engine.query("What does allowance do?")
    assert fake_provider.generation_count - sent < len(first) + 1


def test_scope_attributes_a_query_to_a_tenant(fake_provider: FakeProvider) -> None:
    idx = index()
    guard = instrument(budget="$1", per="tenant", ledger="memory://")
    with allowance.scope(tenant="acme"):
        idx.as_query_engine().query("Who keeps the budget?")
    assert {r.scope["tenant"] for r in guard.ledger.calls()} == {"acme"}
    with allowance.scope(tenant="acme"):
        (status,) = guard.status()
    assert status.spent > 0


def test_allowance_patch_installs_it_and_unpatch_removes_every_handler(
    fake_provider: FakeProvider,
) -> None:
    root = get_dispatcher()
    spans, events = len(root.span_handlers), len(root.event_handlers)
    guard = allowance.patch(budget="$1", per="query", ledger="memory://")
    assert len(root.span_handlers) == spans + 1
    index().as_query_engine().query("Who?")
    assert all("llamaindex" in r.adapters for r in guard.ledger.calls())
    allowance.unpatch()
    assert (len(root.span_handlers), len(root.event_handlers)) == (spans, events)


def test_instrument_refuses_bad_arguments() -> None:
    with pytest.raises(allowance.ConfigurationError, match="budget"):
        instrument()
    with pytest.raises(allowance.ConfigurationError):
        instrument(budget="$1", guard=allowance.Guard(budget=1, ledger="memory://"))
    with pytest.raises(allowance.ConfigurationError):
        instrument(budget="five dollars")


def test_streaming_query_is_charged_its_exact_usage(
    fake_provider: FakeProvider,
) -> None:
    idx = index()
    guard = instrument(budget="$0.25", per="query", ledger="memory://")
    fake_provider.usage = FakeUsage(input_tokens=120, output_tokens=9)
    response = idx.as_query_engine(streaming=True).query("Stream it.")
    assert current_route() is None  # nothing leaks into the caller's context
    text = "".join(response.response_gen)
    assert text
    body = fake_provider.last_request
    assert body is not None
    assert body.json["stream_options"] == {"include_usage": True}
    (call,) = chats(guard)
    assert (call.usage.input_tokens, call.usage.output_tokens) == (120, 9)
    assert call.scope["stage"] == "synthesize"
    assert call.scope["query"] == guard.ledger.calls()[0].scope["query"]
    assert current_route() is None
    assert "query" not in allowance.current_scope()


def test_llm_stream_chat_is_one_call_one_charge(fake_provider: FakeProvider) -> None:
    guard = instrument(budget="$0.25", per="query", ledger="memory://")
    fake_provider.usage = FakeUsage(input_tokens=30, output_tokens=6)
    llm = openai_llm(fake_provider)
    chunks = list(llm.stream_chat([ChatMessage(role="user", content="Hi")]))
    assert chunks
    (call,) = guard.ledger.calls()
    assert (call.usage.input_tokens, call.usage.output_tokens) == (30, 6)
    assert call.outcome == "ok"
    assert "llamaindex" in call.adapters
    assert current_route() is None


def test_an_abandoned_stream_is_charged_and_holds_nothing(
    fake_provider: FakeProvider,
) -> None:
    guard = instrument(budget="$0.25", per="session", ledger="memory://")
    fake_provider.enqueue(FakeReply(text="one two three four five six seven"))
    llm = openai_llm(fake_provider)
    stream = llm.stream_chat([ChatMessage(role="user", content="Count.")])
    next(stream)
    stream.close()
    del stream
    gc.collect()
    (call,) = guard.ledger.calls()
    assert call.outcome == "partial"
    assert call.usage.input_tokens > 0
    (status,) = guard.status()
    assert status.reserved == 0
    assert status.spent > 0
    assert current_route() is None


@pytest.mark.usefixtures("async_http")
async def test_async_streaming_query(fake_provider: FakeProvider) -> None:
    idx = index()
    guard = instrument(budget="$0.25", per="query", ledger="memory://")
    fake_provider.usage = FakeUsage(input_tokens=80, output_tokens=4)
    response = await idx.as_query_engine(streaming=True, use_async=True).aquery("Go.")
    text = "".join([t async for t in response.async_response_gen()])
    assert text
    (call,) = chats(guard)
    assert (call.usage.input_tokens, call.usage.output_tokens) == (80, 4)


def test_indexing_embeddings_are_charged_tokens_and_usd(
    fake_provider: FakeProvider,
) -> None:
    guard = instrument(budget="$1", per="query", ledger="memory://")
    index()
    embeds = guard.ledger.calls()
    assert embeds
    assert all(r.scope["stage"] == "embed" for r in embeds)
    assert sum(r.usage.input_tokens for r in embeds) > 0
    assert all(r.cost_micros is not None for r in embeds)
    assert len({r.scope["query"] for r in embeds}) == 1  # one build, one query


_PYDANTIC = "ignore::DeprecationWarning"  # llama-index agents on pydantic 2.12


@pytest.mark.filterwarnings(_PYDANTIC)
async def test_function_agent_loop_is_one_query(
    fake_provider: FakeProvider, async_http: httpx.AsyncClient
) -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(add)],
        llm=openai_llm(fake_provider, async_http_client=async_http),
    )
    guard = instrument(budget="$0.25", per="query", ledger="memory://")
    fake_provider.enqueue(
        FakeReply(tool_calls=[("add", '{"a": 1, "b": 2}')]), FakeReply(text="3")
    )

    assert "3" in str(await agent.run("What is 1 + 2?"))
    calls = guard.ledger.calls()
    assert len(calls) == 2
    assert len({r.scope["query"] for r in calls}) == 1
    assert all("llamaindex" in r.adapters for r in calls)


@pytest.mark.filterwarnings(_PYDANTIC)
async def test_an_agent_over_budget_is_blocked(
    fake_provider: FakeProvider, async_http: httpx.AsyncClient
) -> None:
    agent = FunctionAgent(
        tools=[], llm=openai_llm(fake_provider, async_http_client=async_http)
    )
    instrument(budget=10, per="query", ledger="memory://")

    with pytest.raises(allowance.BudgetExceeded):
        await agent.run("Hello?")
    assert fake_provider.generation_count == 0


@pytest.mark.usefixtures("async_http")
async def test_concurrent_queries_never_overspend(fake_provider: FakeProvider) -> None:
    idx = index()
    engine = idx.as_query_engine()
    probe = instrument(budget=10**6, per="tenant", ledger="memory://")
    with allowance.scope(tenant="probe"):
        await engine.aquery("How much?")
    worst = sum(r.estimate_tokens for r in probe.ledger.calls())
    uninstrument()
    guard = instrument(budget=3 * worst, per="tenant", ledger="memory://")

    async def one() -> bool:
        try:
            await engine.aquery("How much?")
        except allowance.BudgetExceeded:
            return False
        return True

    with allowance.scope(tenant="acme"):
        results = await asyncio.wait_for(
            asyncio.gather(*(one() for _ in range(8))), timeout=60
        )
    assert 1 <= sum(results) <= 8
    per_query = Counter(r.scope["query"] for r in guard.ledger.calls())
    assert len(per_query) == 8  # gathered queries never share a query id
    assert max(per_query.values()) <= 2  # its embedding and its answer
    with allowance.scope(tenant="acme"):
        (status,) = guard.status()
    assert status.spent <= status.limit
    assert status.reserved == 0


def test_non_patched_llm_in_a_query_is_blocked_by_the_callback_path(
    fake_provider: FakeProvider,
) -> None:
    idx = index()
    llm = HttpLLM(base_url=fake_provider.openai_base_url)
    sent = fake_provider.generation_count
    instrument(budget=50, per="query", ledger="memory://")
    with pytest.raises(allowance.BudgetExceeded):
        idx.as_query_engine(llm=llm).query("Blocked?")
    assert fake_provider.generation_count == sent
    uninstrument()
    guard = instrument(budget="$1", per="query", ledger="memory://")
    fake_provider.usage = FakeUsage(input_tokens=70, output_tokens=5)
    idx.as_query_engine(llm=llm).query("Charged?")
    (call,) = chats(guard)
    assert (call.usage.input_tokens, call.usage.output_tokens) == (70, 5)
    assert call.scope["stage"] == "synthesize"
    uninstrument()
    assert all(
        not type(h).__name__.startswith("Allowance")
        for h in llm.callback_manager.handlers
    )


def test_a_query_id_from_the_caller_is_kept(fake_provider: FakeProvider) -> None:
    idx = index()
    guard = instrument(budget="$1", per="query", ledger="memory://")
    with allowance.scope(query="ticket-42"):
        idx.as_query_engine().query("One?")
        idx.as_query_engine().query("Two?")
    assert {r.scope["query"] for r in chats(guard)} == {"ticket-42"}


def test_a_second_instrument_swaps_the_guard(fake_provider: FakeProvider) -> None:
    llm = openai_llm(fake_provider)
    first = instrument(budget="$1", ledger="memory://")
    second = instrument(budget="$1", ledger="memory://")
    llm.complete("Hi")
    assert (len(first.ledger.calls()), len(second.ledger.calls())) == (0, 1)
    assert len(get_dispatcher().span_handlers) == len(
        {id(h) for h in get_dispatcher().span_handlers}
    )


def test_the_demo_scene_runs_offline(fake_provider: FakeProvider) -> None:
    from io import StringIO

    from rich.console import Console

    from allowance_llamaindex._plugin import allowance_demo_scenes

    (scene,) = allowance_demo_scenes()
    out = StringIO()
    scene(Console(file=out, width=200), fake_provider, "memory://", 7)
    text = out.getvalue()
    assert "7. LlamaIndex" in text
    assert "BudgetExceeded" in text
    assert "answered" in text
    assert current_route() is None


def test_sub_questions_are_one_query(fake_provider: FakeProvider) -> None:
    from llama_index.core.query_engine import SubQuestionQueryEngine
    from llama_index.core.question_gen import LLMQuestionGenerator
    from llama_index.core.tools import QueryEngineTool, ToolMetadata

    idx = index()
    guard = instrument(budget="$0.25", per="query", ledger="memory://")
    tool = QueryEngineTool(
        query_engine=idx.as_query_engine(),
        metadata=ToolMetadata(name="docs", description="the docs"),
    )
    engine = SubQuestionQueryEngine.from_defaults(
        query_engine_tools=[tool],
        question_gen=LLMQuestionGenerator.from_defaults(),
        use_async=False,  # its async path opens clients on a loop of its own
        verbose=False,
    )
    subs = [
        {"sub_question": "What is enforced?", "tool_name": "docs"},
        {"sub_question": "What is recorded?", "tool_name": "docs"},
    ]
    fake_provider.enqueue(
        FakeReply(text="```json\n" + json.dumps({"items": subs}) + "\n```")
    )
    engine.query("Compare enforcement and recording.")
    calls = chats(guard)
    assert len(calls) == 4  # the question generator, two sub-answers, the final one
    assert len({r.scope["query"] for r in guard.ledger.calls()}) == 1


def test_non_patched_llm_stream_dropped_early_holds_nothing(
    fake_provider: FakeProvider,
) -> None:
    guard = instrument(budget=10_000, per="session", ledger="memory://")
    llm = HttpLLM(base_url=fake_provider.openai_base_url)
    stream = llm.stream_complete("Count.")
    next(stream)
    stream.close()
    (call,) = guard.ledger.calls()
    assert call.outcome == "partial"
    (status,) = guard.status()
    assert status.reserved == 0
    assert status.spent == call.estimate_tokens
    assert current_route() is None
    finished = list(llm.stream_complete("Again."))
    assert len(finished) == 2
    assert guard.ledger.calls()[-1].outcome == "ok"


def test_the_sdk_layer_degrades_a_llamaindex_call(fake_provider: FakeProvider) -> None:
    idx = index()
    guard = instrument(
        budget="$1",
        per="query",
        fallback="gpt-4o-mini",
        threshold=0.000001,
        ledger="memory://",
    )
    idx.as_query_engine(llm=openai_llm(fake_provider, model="gpt-4o")).query("Who?")
    (call,) = chats(guard)
    assert (call.requested_model, call.model) == ("gpt-4o", "gpt-4o-mini")
    assert call.outcome == "degraded"
    last = fake_provider.last_request
    assert last is not None
    assert last.json["model"] == "gpt-4o-mini"


@pytest.mark.parametrize(
    ("reported", "read"),
    [
        ({"prompt_tokens": 12, "completion_tokens": 5}, (12, 5)),
        ({"prompt_tokens": 12.0, "completion_tokens": 5.0}, (12, 5)),
        ({"completion_tokens": 5}, None),
        ({"prompt_tokens": None, "completion_tokens": 5}, None),
        ({"input_tokens": "12", "output_tokens": 5}, None),
    ],
)
def test_a_usage_count_that_cannot_be_read_is_not_zero(
    reported: dict[str, object], read: tuple[int, int] | None
) -> None:
    """``usage_of`` a real ``CompletionResponse``: a missing, null or text count
    makes the usage unknown (the caller keeps the worst case), not 0."""
    from llama_index.core.base.llms.types import CompletionResponse

    from allowance_llamaindex._callbacks import usage_of

    usage = usage_of(CompletionResponse(text="hi", raw={"usage": reported}))
    got = None if usage is None else (usage.input_tokens, usage.output_tokens)
    assert got == read


# -- a stream's context ends with its request, in every context ------------------


def _stream_chat_through_a_chat_engine(llm: OpenAI) -> str:
    """A ``SimpleChatEngine`` stream, read to its end (its writer thread joined)."""
    response = SimpleChatEngine.from_defaults(llm=llm).stream_chat("Hi")
    text = "".join(response.response_gen)
    assert response.write_response_to_history_thread is None  # joined at the end
    return text


def test_a_chat_engine_stream_leaves_no_route_behind(
    fake_provider: FakeProvider,
) -> None:
    """The writer thread reads the stream in a copy of the caller's context: the
    caller's context must not keep the model call's route, query or marker."""
    llm = openai_llm(fake_provider)
    first = instrument(budget="$1", per="query", ledger="memory://")
    assert _stream_chat_through_a_chat_engine(llm)
    assert current_route() is None
    llm.chat([ChatMessage(role="user", content="Again.")])
    llm.chat([ChatMessage(role="user", content="And again.")])
    calls = first.ledger.calls()
    assert len(calls) == 3
    assert len({r.scope.get("query") for r in calls} - {None}) == 3  # each its own
    uninstrument()
    second = instrument(budget=10, per="session", ledger="memory://")  # fits no call
    sent = fake_provider.generation_count
    with pytest.raises(allowance.BudgetExceeded):
        llm.chat([ChatMessage(role="user", content="Blocked.")])
    assert fake_provider.generation_count == sent
    assert len(first.ledger.calls()) == 3  # not charged to the old guard
    assert [r.outcome for r in second.ledger.calls()] == ["blocked"]


def test_a_per_query_budget_holds_after_a_chat_engine_stream(
    fake_provider: FakeProvider,
) -> None:
    llm = openai_llm(fake_provider)
    fake_provider.usage = FakeUsage(input_tokens=10, output_tokens=5)
    instrument(budget=100, per="query", ledger="memory://")  # one short call fits
    big = [ChatMessage(role="user", content="word " * 100)]  # estimated > 100
    assert _stream_chat_through_a_chat_engine(llm)
    sent = fake_provider.generation_count
    for _ in range(2):
        with pytest.raises(allowance.BudgetExceeded):
            llm.chat(big)
    assert fake_provider.generation_count == sent


def test_a_model_stream_never_read_leaves_no_route_behind(
    fake_provider: FakeProvider,
) -> None:
    guard = instrument(budget="$1", per="query", ledger="memory://")
    llm = openai_llm(fake_provider)
    stream = llm.stream_chat([ChatMessage(role="user", content="Never read.")])
    del stream
    gc.collect()
    assert current_route() is None
    assert "query" not in allowance.current_scope()
    llm.chat([ChatMessage(role="user", content="One.")])
    llm.chat([ChatMessage(role="user", content="Two.")])
    assert len({r.scope["query"] for r in guard.ledger.calls()}) == 2


def test_a_stream_read_after_its_scope_ended_does_not_bring_the_scope_back(
    fake_provider: FakeProvider,
) -> None:
    guard = instrument(budget="$1", per="tenant", ledger="memory://")
    llm = openai_llm(fake_provider)
    with allowance.scope(tenant="acme"):
        stream = llm.stream_chat([ChatMessage(role="user", content="Hi")])
    assert list(stream)
    assert dict(allowance.current_scope()) == {}
    assert current_route() is None
    assert len(guard.ledger.calls()) == 1


# -- the consumer's code between chunks runs in its own context ----------------


def _own_client(fake: FakeProvider) -> openai.OpenAI:
    """The user's own client with its own budget: 20 tokens, fits no call."""
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0)
    return allowance.wrap(client, budget=20, ledger="memory://")


def _own_call(client: openai.OpenAI) -> str:
    try:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=64,
        )
    except allowance.BudgetExceeded:
        return "blocked"
    return "sent"


def test_a_client_called_between_stream_chunks_is_charged_to_its_own_budget(
    fake_provider: FakeProvider,
) -> None:
    guard = instrument(budget=10**6, per="session", ledger="memory://")
    own = _own_client(fake_provider)
    fake_provider.enqueue(FakeReply(text="one two three four five"))
    llm = openai_llm(fake_provider)
    seen = []
    for chunk in llm.stream_chat([ChatMessage(role="user", content="Count.")]):
        assert chunk is not None
        assert current_route() is None
        seen.append(_own_call(own))
    assert seen
    assert set(seen) == {"blocked"}
    assert fake_provider.generation_count == 1  # the stream's own request only
    (call,) = guard.ledger.calls()
    assert call.outcome == "ok"
    assert "llamaindex" in call.adapters


def test_a_client_called_while_reading_a_chat_engine_stream_is_its_own(
    fake_provider: FakeProvider,
) -> None:
    guard = instrument(budget=10**6, per="session", ledger="memory://")
    own = _own_client(fake_provider)
    fake_provider.enqueue(FakeReply(text="one two three four five"))
    response = SimpleChatEngine.from_defaults(
        llm=openai_llm(fake_provider)
    ).stream_chat("Count.")
    seen = [_own_call(own) for _ in response.response_gen]
    assert response.write_response_to_history_thread is None  # joined at the end
    assert seen
    assert set(seen) == {"blocked"}
    assert fake_provider.generation_count == 1
    assert len(guard.ledger.calls()) == 1


@pytest.mark.usefixtures("async_http")
async def test_an_async_stream_consumer_runs_in_its_own_context(
    fake_provider: FakeProvider,
) -> None:
    guard = instrument(budget=10**6, per="session", ledger="memory://")
    own = _own_client(fake_provider)
    fake_provider.enqueue(FakeReply(text="one two three four five"))
    from llama_index.core import Settings

    stream = await Settings.llm.astream_chat(
        [ChatMessage(role="user", content="Count.")]
    )
    seen = []
    async for _ in stream:
        assert current_route() is None
        seen.append(_own_call(own))
    assert seen
    assert set(seen) == {"blocked"}
    assert fake_provider.generation_count == 1
    (call,) = guard.ledger.calls()
    assert call.outcome == "ok"


# -- a non-patched LLM's failed call: released only when the provider did no work --


@pytest.mark.parametrize(
    ("reply", "timeout", "outcome", "charged"),
    [
        (FakeReply(status=500), 10.0, "error", False),
        (FakeReply(status=400), 10.0, "error", False),
        (FakeReply(truncate_after=0), 10.0, "error", True),  # dropped connection
        (FakeReply(latency=5), 0.2, "error", True),  # read timeout
    ],
    ids=["500", "400", "dropped", "timeout"],
)
def test_a_failed_non_patched_llm_call_is_released_only_if_no_work_was_done(
    fake_provider: FakeProvider,
    reply: FakeReply,
    timeout: float,
    outcome: str,
    charged: bool,
) -> None:
    guard = instrument(budget=10_000, per="session", ledger="memory://")
    fake_provider.enqueue(reply)
    llm = HttpLLM(base_url=fake_provider.openai_base_url, timeout=timeout)
    with pytest.raises(httpx.HTTPError):
        llm.complete("Say hello.")
    (call,) = guard.ledger.calls()
    assert call.outcome == outcome
    (status,) = guard.status()
    assert status.reserved == 0
    assert status.spent == (call.estimate_tokens if charged else 0)


# -- before a model stream is first read, the caller's context is its own -------

# ``llm.stream_chat()`` returns a generator that sends its request at its
# first ``next()``, in the caller's context, and nothing the adapter controls
# runs in between (the dispatcher returns the generator itself; no event
# comes before the request). The route its span set is bound to the stream
# (``seen_by.bind``): in force only while the stream runs. These three were
# strict xfails before.


def test_a_client_called_before_a_stream_is_read_is_charged_to_its_own_budget(
    fake_provider: FakeProvider,
) -> None:
    """The stream's request is sent at its first ``next()``: until then, calls
    the caller makes are not the stream's."""
    guard = instrument(budget=10**6, per="session", ledger="memory://")
    own = _own_client(fake_provider)
    llm = openai_llm(fake_provider)
    stream = llm.stream_chat([ChatMessage(role="user", content="Count.")])
    unsent = fake_provider.generation_count == 0
    route = current_route()
    mine = _own_call(own)  # its own 20-token budget: blocked, never sent
    assert list(stream)  # read first: nothing left behind, pass or fail
    assert (route, mine) == (None, "blocked")
    assert unsent
    assert fake_provider.generation_count == 1  # the stream's own request only
    (call,) = guard.ledger.calls()
    assert call.outcome == "ok"
    assert "llamaindex" in call.adapters
    assert current_route() is None


@pytest.mark.usefixtures("async_http")
async def test_a_client_called_before_an_async_stream_is_read_is_its_own(
    fake_provider: FakeProvider,
) -> None:
    from llama_index.core import Settings

    guard = instrument(budget=10**6, per="session", ledger="memory://")
    own = _own_client(fake_provider)
    stream = await Settings.llm.astream_chat(
        [ChatMessage(role="user", content="Count.")]
    )
    route = current_route()
    mine = _own_call(own)
    assert [chunk async for chunk in stream]
    assert (route, mine) == (None, "blocked")
    assert fake_provider.generation_count == 1
    (call,) = guard.ledger.calls()
    assert call.outcome == "ok"


def test_a_non_patched_llm_stream_route_is_not_in_force_before_it_is_read(
    fake_provider: FakeProvider,
) -> None:
    """A charged route in force in the caller's context passes the caller's own
    client through uncharged."""
    guard = instrument(budget=10_000, per="session", ledger="memory://")
    own = _own_client(fake_provider)
    stream = HttpLLM(base_url=fake_provider.openai_base_url).stream_complete("Hi.")
    route = current_route()
    mine = _own_call(own)
    assert len(list(stream)) == 2
    assert (route, mine) == (None, "blocked")
    assert len(guard.ledger.calls()) == 1


# -- a chat engine's writer reads its stream: the caller's context is its own -----


def test_a_client_called_while_a_chat_engine_stream_starts_is_its_own(
    fake_provider: FakeProvider,
) -> None:
    """The writer thread reads the stream in its own copy of the context, and its
    request takes a while: the caller's context is its own meanwhile."""
    guard = instrument(budget=10**6, per="session", ledger="memory://")
    own = _own_client(fake_provider)
    llm = openai_llm(fake_provider)
    fake_provider.enqueue(FakeReply(text="one two three", latency=0.5))
    response = SimpleChatEngine.from_defaults(llm=llm).stream_chat("Count.")
    assert current_route() is None
    assert "query" not in allowance.current_scope()
    assert _own_call(own) == "blocked"
    llm.chat([ChatMessage(role="user", content="Another question.")])
    assert "".join(response.response_gen)
    calls = guard.ledger.calls()
    assert len(calls) == 2
    assert len({r.scope["query"] for r in calls}) == 2  # not one query
    assert fake_provider.generation_count == 2


@pytest.mark.usefixtures("async_http")
async def test_a_client_called_before_an_async_chat_engine_stream_is_its_own(
    fake_provider: FakeProvider,
) -> None:
    from llama_index.core import Settings

    guard = instrument(budget=10**6, per="session", ledger="memory://")
    own = _own_client(fake_provider)
    response = await SimpleChatEngine.from_defaults(llm=Settings.llm).astream_chat(
        "Count."
    )
    assert current_route() is None
    assert _own_call(own) == "blocked"
    assert [t async for t in response.async_response_gen()]
    assert fake_provider.generation_count == 1
    (call,) = guard.ledger.calls()
    assert call.outcome == "ok"
    assert "llamaindex" in call.adapters
