"""Root-dispatcher span and event handlers: attribution, and the routing of calls.

``install(guard)`` adds one span handler and one event handler to
llama-index-core's root instrumentation dispatcher. Spans are entered and left
in the caller's context (sync and async), so the span handler can set context
variables that reach the HTTP request made inside:

- the outermost span of a call (``engine.query``, ``retriever.retrieve``, an
  agent run, ``index.from_documents``, a bare ``llm.chat``) gets a fresh
  ``query`` dimension, unless ``allowance.scope(query=...)`` names one: a
  ``per="query"`` budget then covers every model call the query makes; nested
  spans never start another query;
- ``stage`` records where a call was made (``retrieve``, ``synthesize``,
  ``agent``, ``embed``, ``query``, ``chat``);
- around a model or embedding call through a class whose SDK ``allowance``
  patches, ``allowance.seen_by("llamaindex", guard=guard, ...)``: the SDK layer
  beneath blocks, degrades and charges exact usage;
- around a chat/complete call through any other LLM class, a pending marker
  read by ``_callbacks.AllowanceCallbackHandler`` (added to that LLM's
  callback manager), which reserves and blocks, since the dispatcher swallows
  its handlers' exceptions.

A streaming call sends its request when the stream is iterated, after its span
has ended: the span's context then stays set until the event handler sees the
stream's first chunk (the request is sent: nothing more to route), its end, or
the ``ExceptionEvent`` of an abandoned stream; or until the stream is garbage
collected unread. So the consumer's code between chunks runs in its own
context, not the model call's. A ``StreamingResponse`` of a query is iterated
inside its query's context.

Until then, the route a model stream's span set is bound to the stream
(``seen_by.bind``): the caller's context keeps it, but it is in force only
while the stream runs, so a client the caller uses between ``stream_chat()``
and the first chunk is charged to its own guard (the query and stage
dimensions still read as the stream's there until its first chunk).

A stream may be read in another context than the one its span set (a chat
engine's writer thread runs a copy of the caller's context), where the
variables cannot be reset. So what a span sets carries the span itself
(``_Span.live``): once the span is over, in whatever context, every context
still holding its values reads them as unset, and its route is ended
(``seen_by.end``). A chat engine starts that writer (thread or task) inside its
span: when the span returns, the caller's context is reset at once, and calls
the caller makes while the writer waits for the first chunk are its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import types
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, cast

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.response.schema import (
    AsyncStreamingResponse,
    StreamingResponse,
)
from llama_index.core.chat_engine.types import (
    BaseChatEngine,
    StreamingAgentChatResponse,
)
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.exception import ExceptionEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
)
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.workflow import Workflow
from llama_index_instrumentation import get_dispatcher

import allowance
from allowance.integration import sdk_layer
from allowance_llamaindex import _compat
from allowance_llamaindex._callbacks import (
    NAME,
    AllowanceCallbackHandler,
    Pending,
    pending,
)

if TYPE_CHECKING:
    import inspect

    from llama_index.core.instrumentation.events import BaseEvent

__all__ = ["install", "uninstall"]

logger = logging.getLogger("allowance.llamaindex")

_STAGES: tuple[tuple[type, str], ...] = (
    (BaseSynthesizer, "synthesize"),
    (BaseRetriever, "retrieve"),
    (BaseQueryEngine, "query"),
    (BaseChatEngine, "chat"),
    (Workflow, "agent"),
    (BaseEmbedding, "embed"),
)

Exit = Callable[[], None]


class _Span:
    """What one span set, and whether it is still in force (in any context)."""

    __slots__ = ("exits", "live", "model_call", "routes")

    def __init__(self) -> None:
        self.live = True
        self.model_call = False
        self.exits: list[Exit] = []  # context resets, run in reverse
        # Its routes: ended in every context when it closes, bound to the
        # stream a model stream's span returns (``seen_by.end``, ``.bind``).
        self.routes: list[allowance.seen_by | _Charged] = []

    def close(self) -> None:
        """Undo what the span set: reset here if possible, end it everywhere."""
        _run(self.exits)
        self.live = False
        for route in self.routes:
            route.end()


_query: contextvars.ContextVar[tuple[str, bool, _Span] | None] = contextvars.ContextVar(
    "allowance_llamaindex_query", default=None
)
"""(query id, named by the caller, the span that set it)."""
_stage: contextvars.ContextVar[tuple[str, _Span] | None] = contextvars.ContextVar(
    "allowance_llamaindex_stage", default=None
)
_model_call: contextvars.ContextVar[tuple[int, str, _Span] | None] = (
    contextvars.ContextVar("allowance_llamaindex_model_call", default=None)
)
"""(id of the model object, id of its outermost span, that span) around a call."""


def _current_query() -> str | None:
    value = _query.get()
    return value[0] if value is not None and value[2].live else None


def _current_stage() -> str | None:
    value = _stage.get()
    return value[0] if value is not None and value[1].live else None


_GENERATORS: tuple[type, ...] = (types.GeneratorType, types.AsyncGeneratorType)
_RESPONSES: tuple[type, ...] = (
    StreamingResponse,
    AsyncStreamingResponse,
    StreamingAgentChatResponse,
)
# After these, a model stream's request has been sent (its first chunk came
# back) or the stream is over: its span's context is not needed any more.
_STREAM_ENDS: tuple[type, ...] = (
    LLMChatInProgressEvent,
    LLMCompletionInProgressEvent,
    LLMChatEndEvent,
    LLMCompletionEndEvent,
    ExceptionEvent,
)


# A span's or event's class decides what the handlers do with it, and never
# changes: asked once per class. (LlamaIndex's classes are pydantic models,
# whose ``isinstance`` runs ``ABCMeta.__instancecheck__`` in Python; a query
# enters ~20 spans and sends as many events.) At most ``_MAX_CLASSES`` each.
_MAX_CLASSES = 1024
_KINDS: dict[type, tuple[str | None, bool]] = {}
_ENDS: dict[type, bool] = {}


def _kind(cls: type) -> tuple[str | None, bool]:
    """The stage a span of ``cls`` starts, and whether it is a model's call.

    Callers read ``_KINDS`` first: this runs once per class.
    """
    stage = next((stage for base, stage in _STAGES if issubclass(cls, base)), None)
    kind = stage, issubclass(cls, BaseLLM | BaseEmbedding)
    if len(_KINDS) < _MAX_CLASSES:
        _KINDS[cls] = kind
    return kind


def _ends_stream(cls: type) -> bool:
    """Whether after an event of ``cls`` a model stream needs no context.

    Callers read ``_ENDS`` first: this runs once per class.
    """
    ends = issubclass(cls, _STREAM_ENDS)
    if len(_ENDS) < _MAX_CLASSES:
        _ENDS[cls] = ends
    return ends


def _model_of(instance: object) -> tuple[str, int | None]:
    metadata = getattr(instance, "metadata", None)
    model = getattr(instance, "model", None) or getattr(metadata, "model_name", None)
    cap = getattr(instance, "max_tokens", None)
    if cap is None:
        cap = getattr(metadata, "num_output", None)
    return str(model or "unknown"), cap if isinstance(cap, int) and cap > 0 else None


def _entered(context: contextlib.AbstractContextManager[Any]) -> Exit:
    """Enter ``context``; return its undo, which leaves a newer scope alone.

    A stream's span is undone late: by then the caller may have left a scope
    entered before it (``with allowance.scope(...): s = llm.stream_chat(...)``),
    and resetting ours would bring that scope back.
    """
    before = allowance.current_scope()
    context.__enter__()
    after = allowance.current_scope()

    def undo() -> None:
        if after is not before and allowance.current_scope() is not after:
            raise ValueError("the scope changed since")  # ended (routes) instead
        context.__exit__(None, None, None)

    return undo


def _reset_if_ours(var: contextvars.ContextVar[Any], value: object) -> Exit:
    """Set ``var`` to ``value``; return an undo that resets it if still ``value``."""
    token = var.set(value)

    def undo() -> None:
        if var.get() is value:
            var.reset(token)

    return undo


def _seen(
    guard: allowance.Guard, dims: dict[str, Any], *, charged: bool = False
) -> allowance.seen_by:
    return allowance.seen_by(NAME, guard=guard, charged=charged, **dims)


def _run(exits: list[Exit]) -> None:
    for undo in reversed(exits):
        try:
            undo()
        except (ValueError, RuntimeError):  # set in another context: cannot undo
            logger.debug(
                "allowance: a LlamaIndex span ended in another context or scope"
            )


def _enter_query(span: _Span, dims: dict[str, str]) -> None:
    """Start a query in ``span`` unless one is in force; its id goes in ``dims``.

    The caller's ``allowance.scope(query=...)`` names it; else a fresh id.
    """
    outer = _query.get()
    if outer is not None and outer[2].live:
        return
    named = allowance.current_scope().get("query")
    if named is not None and outer is not None and not outer[1] and named == outer[0]:
        # Our own query id, left in this context by a span that ended in
        # another one: not the caller's.
        named = None
    query = named or f"q-{os.urandom(8).hex()}"
    span.exits.append(_reset_if_ours(_query, (query, named is not None, span)))
    if named is None:
        dims["query"] = query


class _Runtime:
    """What the installed handlers share: the guard, open spans, callback managers."""

    def __init__(self) -> None:
        self.guard: allowance.Guard | None = None
        self.callbacks = AllowanceCallbackHandler()
        # The handler lists we appended to (managers built without handlers
        # share Settings' list, so lists, not managers, are what to undo).
        self.lists: dict[int, list[Any]] = {}
        self.open: dict[str, _Span] = {}
        self.streams: dict[str, _Span] = {}
        self.alias: dict[str, str] = {}
        self.wrapped: weakref.WeakSet[Any] = weakref.WeakSet()
        self.lock = threading.Lock()

    # -- spans ----------------------------------------------------------------

    def enter(self, id_: str, instance: object) -> None:
        guard = self.guard
        if guard is None:
            return
        span = _Span()
        exits = span.exits
        dims: dict[str, str] = {}
        _enter_query(span, dims)
        cls = type(instance)
        stage, is_model = _KINDS.get(cls) or _kind(cls)
        if stage is not None and stage != _current_stage():
            exits.append(_reset_if_ours(_stage, (stage, span)))
            dims["stage"] = stage
        context: contextlib.AbstractContextManager[Any] | None = None
        if is_model:
            outer = _model_call.get()
            if outer is not None and outer[2].live and outer[0] == id(instance):
                # A nested span of the same call (stream -> stream_chat).
                with self.lock:
                    self.alias[id_] = outer[1]
            else:
                model = cast("BaseLLM | BaseEmbedding", instance)
                context = self._model_context(model, guard, dims)
                exits.append(_reset_if_ours(_model_call, (id(instance), id_, span)))
                span.model_call = True
        elif dims:
            context = allowance.scope(**dims)
        if context is not None:
            exits.append(_entered(context))
            if isinstance(context, allowance.seen_by | _Charged):
                span.routes.append(context)
        if exits:
            with self.lock:
                self.open[id_] = span

    def _model_context(
        self,
        instance: BaseLLM | BaseEmbedding,
        guard: allowance.Guard,
        dims: dict[str, str],
    ) -> contextlib.AbstractContextManager[Any]:
        provider, via_sdk = _compat.provider_of(instance)
        if via_sdk and sdk_layer(provider):
            return _seen(guard, dict(dims))
        if not isinstance(instance, BaseLLM) or isinstance(
            getattr(instance, "llm", None), BaseLLM
        ):
            # Not charged here: an embedding class no SDK layer sees, or a
            # wrapper (StructuredLLM) whose inner LLM's own span charges.
            return allowance.scope(**dims)
        self._listen(instance)
        model, cap = _model_of(instance)
        call = Pending(guard=guard, provider=provider, model=model, max_tokens=cap)
        return _Charged(guard, call, dims)

    def _listen(self, llm: BaseLLM) -> None:
        handlers = llm.callback_manager.handlers
        if self.callbacks not in handlers:
            handlers.append(self.callbacks)
            with self.lock:
                self.lists[id(handlers)] = handlers

    def leave(self, id_: str, result: object) -> None:
        generator = isinstance(result, _GENERATORS)
        with self.lock:
            span = self.open.pop(id_, None)
            if not generator:
                self.alias.pop(id_, None)
        if span is None:
            return
        if isinstance(result, _RESPONSES):
            if isinstance(result, StreamingAgentChatResponse):
                self._hand_over(result)
            else:
                self._wrap_stream(
                    cast("StreamingResponse | AsyncStreamingResponse", result)
                )
        elif span.model_call and generator:
            # A model stream: its request is sent when it is iterated. Keep the
            # context until the event handler sees its first chunk or its end,
            # or the stream is dropped unread; its route is in force only
            # while the stream runs, so the caller's own calls meanwhile are
            # its own.
            stream = cast("Iterator[Any] | AsyncIterator[Any]", result)
            for route in span.routes:
                route.bind(stream)
            with self.lock:
                self.streams[id_] = span
            with contextlib.suppress(TypeError):
                weakref.finalize(result, self.stream_ended, id_).atexit = False
            return
        span.close()

    def drop(self, id_: str) -> None:
        with self.lock:
            self.alias.pop(id_, None)
            span = self.open.pop(id_, None)
        if span is not None:
            span.close()

    def stream_ended(self, span_id: str | None) -> None:
        if span_id is None:
            return
        with self.lock:
            target = self.alias.pop(span_id, span_id)
            span = self.streams.pop(target, None)
            if span is not None and self.alias:
                for nested in [k for k, v in self.alias.items() if v == target]:
                    del self.alias[nested]
        if span is not None:
            span.close()

    def _hand_over(self, response: StreamingAgentChatResponse) -> None:
        """Undo, in the caller's context, what a chat engine's model stream set.

        A chat engine starts the writer that reads its stream (a thread or a
        task) inside its span: the writer runs a copy of the context holding
        the stream's route until its request is sent. The caller's context
        needs none of it: calls made there meanwhile are the caller's own.
        """
        if (
            response.write_response_to_history_thread is None
            and response.awrite_response_to_history_task is None
        ):
            return  # read later in the caller's context: keep it there
        current = _model_call.get()
        if current is None or not current[2].live:
            return
        with self.lock:
            span = self.streams.get(current[1])
            if span is not current[2]:
                return
            exits, span.exits = span.exits, []  # ``close`` then ends it only
        _run(exits)

    def _wrap_stream(
        self, response: StreamingResponse | AsyncStreamingResponse
    ) -> None:
        guard = self.guard
        if guard is None or response.response_gen in self.wrapped:
            return
        dims = {
            k: v
            for k, v in (
                ("query", _current_query()),
                ("stage", _current_stage() or "synthesize"),
            )
            if v
        }

        query = dims.get("query")
        held = _Span()  # never closed: set only around each step of the stream

        @contextlib.contextmanager
        def context() -> Iterator[None]:
            # The scope and the query (the model stream inside sets its own
            # route); the query reads as the caller's in any context.
            token = None if query is None else _query.set((query, True, held))
            try:
                with allowance.scope(**dims):
                    yield
            finally:
                if token is not None:
                    _query.reset(token)

        if isinstance(response, StreamingResponse):
            response.response_gen = _in_context(response.response_gen, context)
        else:
            response.response_gen = _ain_context(response.response_gen, context)
        self.wrapped.add(response.response_gen)

    # -- install --------------------------------------------------------------

    def uninstall(self) -> None:
        self.guard = None
        with self.lock:
            for handlers in self.lists.values():
                while self.callbacks in handlers:
                    handlers.remove(self.callbacks)
            self.lists.clear()
            self.open.clear()
            self.streams.clear()
            self.alias.clear()


class _Charged(contextlib.AbstractContextManager[Any]):
    """Around a non-patched LLM's call: the pending marker and a charged route."""

    def __init__(
        self, guard: allowance.Guard, call: Pending, dims: dict[str, str]
    ) -> None:
        self._call = call
        self._seen = _seen(guard, dict(dims), charged=True)
        self._token: contextvars.Token[Pending | None] | None = None

    def __enter__(self) -> Pending:
        self._seen.__enter__()
        self._token = pending.set(self._call)
        return self._call

    def __exit__(self, *exc: object) -> None:
        try:
            if self._token is not None:
                pending.reset(self._token)
        finally:
            self._seen.__exit__()

    def end(self) -> None:
        """End the marker and the route in every context still holding them."""
        self._call.live = False
        self._seen.end()

    def bind(self, stream: Iterator[Any] | AsyncIterator[Any]) -> None:
        """Route only while ``stream`` runs (``seen_by.bind``)."""
        self._seen.bind(stream)


def _in_context(
    gen: Iterator[str], context: Callable[[], contextlib.AbstractContextManager[Any]]
) -> Generator[str, None, None]:
    try:
        while True:
            with context():
                try:
                    item = next(gen)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            with context():
                close()


async def _ain_context(
    gen: AsyncIterator[str],
    context: Callable[[], contextlib.AbstractContextManager[Any]],
) -> AsyncGenerator[str, None]:
    try:
        while True:
            with context():
                try:
                    item = await anext(gen)
                except StopAsyncIteration:
                    return
            yield item
    finally:
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            with context():
                await aclose()


_RUNTIME = _Runtime()


class AllowanceSpanHandler(BaseSpanHandler[Any]):
    """Root-dispatcher span handler: query ids, stages and call routing."""

    @classmethod
    def class_name(cls) -> str:
        """The handler's name in LlamaIndex."""
        return "AllowanceSpanHandler"

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,  # noqa: ARG002
        instance: Any | None = None,
        parent_id: str | None = None,  # noqa: ARG002
        tags: dict[str, Any] | None = None,  # noqa: ARG002
        **kwargs: Any,  # noqa: ARG002
    ) -> None:
        """Set the query, stage and route for what runs inside the span."""
        _RUNTIME.enter(id_, instance)

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,  # noqa: ARG002
        instance: Any | None = None,  # noqa: ARG002
        result: Any | None = None,
        **kwargs: Any,  # noqa: ARG002
    ) -> None:
        """Undo what ``span_enter`` set (later, for a model stream)."""
        _RUNTIME.leave(id_, result)

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,  # noqa: ARG002
        instance: Any | None = None,  # noqa: ARG002
        err: BaseException | None = None,  # noqa: ARG002
        **kwargs: Any,  # noqa: ARG002
    ) -> None:
        """Undo what ``span_enter`` set."""
        _RUNTIME.drop(id_)

    def new_span(self, *args: Any, **kwargs: Any) -> None:
        """Not used: spans are not stored."""

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        """Not used: spans are not stored."""

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        """Not used: spans are not stored."""


class AllowanceEventHandler(BaseEventHandler):
    """Root-dispatcher event handler: ends a model stream's context."""

    @classmethod
    def class_name(cls) -> str:
        """The handler's name in LlamaIndex."""
        return "AllowanceEventHandler"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:  # noqa: ARG002
        """Undo a finished (or abandoned) model stream's context."""
        cls = type(event)
        ends = _ENDS.get(cls)
        if ends is None:
            ends = _ends_stream(cls)
        if ends:
            _RUNTIME.stream_ended(event.span_id)


class _Handlers:
    """The handlers on the root dispatcher, while installed."""

    def __init__(self) -> None:
        self.spans: AllowanceSpanHandler | None = None
        self.events: AllowanceEventHandler | None = None
        self.lock = threading.Lock()


_HANDLERS = _Handlers()


def install(guard: allowance.Guard) -> None:
    """Add the handlers to the root dispatcher (once) and route calls to ``guard``."""
    with _HANDLERS.lock:
        _RUNTIME.guard = guard
        if _HANDLERS.spans is not None:
            return
        root = get_dispatcher()
        _HANDLERS.spans = AllowanceSpanHandler()
        _HANDLERS.events = AllowanceEventHandler()
        root.add_span_handler(_HANDLERS.spans)
        root.add_event_handler(_HANDLERS.events)


def uninstall() -> None:
    """Remove every handler ``install`` added; a no-op when not installed."""
    with _HANDLERS.lock:
        spans, events = _HANDLERS.spans, _HANDLERS.events
        if spans is None:
            return
        root = get_dispatcher()
        root.span_handlers = [h for h in root.span_handlers if h is not spans]
        root.event_handlers = [h for h in root.event_handlers if h is not events]
        _HANDLERS.spans = _HANDLERS.events = None
        _RUNTIME.uninstall()
