"""A fake OpenAI and Anthropic server on 127.0.0.1 for offline tests and benchmarks.

:class:`FakeProvider` is a real HTTP/1.1 server (standard library only): an
asyncio server in a daemon thread with its own event loop, so sync and async
tests can both drive the real ``openai`` and ``anthropic`` SDKs (and the
frameworks built on them) against it. The wire formats live in
:mod:`allowance.testing._fake_wire`.

Routes, each with or without the ``/v1`` prefix (query strings are ignored):

- ``POST /chat/completions``: OpenAI Chat Completions, JSON or SSE chunks.
- ``POST /completions``: OpenAI (legacy) Completions, JSON or SSE chunks
  (one choice; ``max_tokens`` 16 when absent, as the API).
- ``POST /responses``: OpenAI Responses, JSON or typed SSE events.
- ``POST /responses/compact``: OpenAI's compaction, JSON only.
- ``POST /messages``: Anthropic Messages (beta too), JSON or SSE events.
- ``POST /messages/count_tokens`` and ``POST /responses/input_tokens``.
- ``GET /models``, ``GET /models/{id}`` and ``POST /embeddings``.

Anything else answers 404 with a JSON error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import parse_qsl

from allowance._errors import ConfigurationError, UsageError
from allowance.testing._fake_models import (
    DEFAULT_TEXT,
    FakeReply,
    FakeRequest,
    FakeUsage,
    Generation,
)
from allowance.testing._fake_wire import (
    Frame,
    chat_completion,
    chat_stream,
    compacted_response,
    completion,
    completion_stream,
    embeddings,
    error_body,
    message,
    message_stream,
    models,
    response,
    response_stream,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["FakeProvider"]

Latency = float | tuple[float, float]
UsageSetting = FakeUsage | Callable[[FakeRequest], FakeUsage] | None

_HOST = "127.0.0.1"
_BACKLOG = 4096
_READ_LIMIT = 1 << 20
_MAX_HEADERS = 200
_TOO_MANY = 429
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


class _BadRequestError(Exception):
    """The bytes on the connection are not an HTTP/1.x request we can parse."""


@dataclass(frozen=True, slots=True)
class _Received:
    request: FakeRequest
    keep_alive: bool
    chunked: bool
    bad_json: bool


@dataclass(frozen=True, slots=True)
class _Json:
    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class _Stream:
    frames: list[Frame]
    truncate_after: int | None


@dataclass(frozen=True, slots=True)
class _Drop:
    """Close the connection without answering."""


_Answer = _Json | _Stream | _Drop


class FakeProvider:
    """A fake OpenAI and Anthropic API server on ``127.0.0.1`` (an ephemeral port).

    Generation requests answer ``text`` (one word per stream chunk), cut to the
    request's max tokens. Unless ``usage`` says otherwise the reported usage is
    ``input_tokens = max(1, ceil(utf8_bytes(request text) / 4))`` (see
    :attr:`FakeRequest.text`) and ``output_tokens`` = the words sent.
    Replies queued with :meth:`enqueue` override this, one per generation
    request, first in first out.

    Args:
        text: The default answer.
        usage: A fixed :class:`FakeUsage` to report, a callable computing one
            from the :class:`FakeRequest`, or ``None`` for the rule above.
        latency: Seconds to wait before each answer: a float, or a
            ``(low, high)`` range drawn uniformly from a seeded generator.
        error_rate: Probability that an unscripted generation request gets an
            HTTP 500 (seeded), for load tests.
        seed: Seed of the generator behind ``latency`` ranges and ``error_rate``.

    Settings may be changed on a running server (``fake.latency = 0.02``).

    Example:
        >>> with FakeProvider(text="Hi there") as fake:  # doctest: +SKIP
        ...     client = openai.OpenAI(base_url=fake.openai_base_url, api_key="test")
        ...     client.chat.completions.create(model="gpt-4o-mini", messages=[...])
        ...     assert fake.generation_count == 1
    """

    __module__ = "allowance.testing"

    def __init__(
        self,
        *,
        text: str = DEFAULT_TEXT,
        usage: UsageSetting = None,
        latency: Latency = 0.0,
        error_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        """Configure the server; it starts with ``start()`` or ``with``."""
        self.text = text
        self.usage: UsageSetting = usage
        self.latency = latency
        self.error_rate = error_rate
        self._seed = seed
        self._lock = threading.Lock()
        self._rng = random.Random(seed)  # noqa: S311 - test data, not secrets
        self._ids = itertools.count(1)
        self._log: list[FakeRequest] = []
        self._queue: deque[FakeReply] = deque()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._port: int | None = None
        self._connections: set[asyncio.Task[None]] = set()

    # -- settings ---------------------------------------------------------------

    @property
    def latency(self) -> Latency:
        """Seconds to wait before each answer, or a ``(low, high)`` range."""
        return self._latency

    @latency.setter
    def latency(self, value: Latency) -> None:
        if isinstance(value, tuple):
            low, high = value
            if not 0 <= low <= high:
                raise ConfigurationError(
                    what="latency",
                    value=value,
                    expected="(low, high) with 0 <= low <= high",
                )
        elif not value >= 0:
            raise ConfigurationError(
                what="latency",
                value=value,
                expected="seconds >= 0 or a (low, high) tuple",
            )
        self._latency: Latency = value

    @property
    def error_rate(self) -> float:
        """Probability of an HTTP 500 for an unscripted generation request."""
        return self._error_rate

    @error_rate.setter
    def error_rate(self, value: float) -> None:
        if not 0 <= value <= 1:
            raise ConfigurationError(
                what="error_rate", value=value, expected="a probability in [0, 1]"
            )
        self._error_rate = value

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> Self:
        """Start serving in a daemon thread; a no-op if already running.

        Returns:
            The provider itself, so ``fake = FakeProvider().start()`` works.

        Raises:
            OSError: The listening socket could not be opened.
        """
        if self._thread is not None:
            return self
        ready = threading.Event()
        failures: list[BaseException] = []
        thread = threading.Thread(
            target=self._run,
            args=(ready, failures),
            name="allowance-fake-provider",
            daemon=True,
        )
        thread.start()
        if not ready.wait(_START_TIMEOUT):  # pragma: no cover - a wedged machine
            msg = "the fake provider did not start within 10 s"
            raise RuntimeError(msg)
        if failures:
            thread.join(_STOP_TIMEOUT)
            raise failures[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Close every connection and stop the server; a no-op if stopped."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stopping.set)
        thread.join(_STOP_TIMEOUT)
        self._thread = self._loop = self._stopping = None
        self._port = None

    def __enter__(self) -> Self:
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    @property
    def is_running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._thread is not None

    @property
    def port(self) -> int:
        """The TCP port the server listens on.

        Raises:
            UsageError: The server is not running.
        """
        if self._port is None:
            msg = "the fake provider is not running: use `with FakeProvider() as fake:`"
            raise UsageError(msg, value=self, expected="a started FakeProvider")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{_HOST}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The ``base_url`` for ``openai.OpenAI`` (``url + "/v1"``)."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The ``base_url`` for ``anthropic.Anthropic`` (``url``)."""
        return self.url

    # -- scripting and the request log -------------------------------------------

    def enqueue(self, *replies: FakeReply) -> None:
        """Queue replies for the next generation requests, first in first out.

        Only generation requests (Chat Completions, Completions, Responses,
        ``/responses/compact`` and Messages) take a reply; when the queue is
        empty the provider's settings apply.
        """
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Clear the request log and the reply queue and re-seed the generator."""
        with self._lock:
            self._log.clear()
            self._queue.clear()
            self._rng.seed(self._seed)

    @property
    def requests(self) -> list[FakeRequest]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    @property
    def last_request(self) -> FakeRequest | None:
        """The latest request, or ``None`` before any."""
        with self._lock:
            return self._log[-1] if self._log else None

    def count(self, path: str | None = None) -> int:
        """Count requests, optionally those whose path ends with ``path``.

        Args:
            path: A suffix such as ``"/chat/completions"``; ``None`` counts all.
        """
        with self._lock:
            if path is None:
                return len(self._log)
            return sum(1 for r in self._log if r.path.endswith(path))

    @property
    def generation_count(self) -> int:
        """Requests to the generation endpoints (``GENERATION_ROUTES``)."""
        with self._lock:
            return sum(1 for r in self._log if r.is_generation)

    # -- the server thread --------------------------------------------------------

    def _run(self, ready: threading.Event, failures: list[BaseException]) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as err:  # noqa: BLE001 - reported by start()
            failures.append(err)
        finally:
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._on_connection, _HOST, 0, backlog=_BACKLOG, limit=_READ_LIMIT
        )
        self._port = int(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await stopping.wait()
            # Let connections accepted just now become transports and start
            # their handler before closing: on Python 3.11 an accept that lands
            # after server.close() fails inside asyncio and leaks its socket,
            # and a task cancelled before its first step never runs its
            # finally (both a ResourceWarning at exit).
            await _settle_loop()
            server.close()
            await _settle_loop()
            tasks = list(self._connections)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (_BadRequestError, asyncio.LimitOverrunError) as err:
            status = 431 if isinstance(err, asyncio.LimitOverrunError) else 400
            answer = _Json(status, error_body("openai", status, "malformed request"))
            with contextlib.suppress(ConnectionError):
                await _write_json(writer, answer, keep_alive=False)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-request
        except asyncio.CancelledError:
            # stop() cancels connections. Ending normally keeps Python 3.11's
            # connection callback from logging the cancellation as an error.
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            received = await _read_request(reader, writer)
            if received is None:  # the client closed an idle connection
                return
            request, keep_alive = received.request, received.keep_alive
            with self._lock:
                self._log.append(request)
            answer, latency = self._answer(request, bad_json=received.bad_json)
            if latency > 0:
                await asyncio.sleep(latency)
            if isinstance(answer, _Drop):
                return
            if isinstance(answer, _Json):
                await _write_json(writer, answer, keep_alive=keep_alive)
            elif not await _write_stream(
                writer, answer, keep_alive=keep_alive, chunked=received.chunked
            ):
                return
            if not keep_alive:
                return

    # -- routing --------------------------------------------------------------------

    def _answer(self, request: FakeRequest, *, bad_json: bool) -> tuple[_Answer, float]:
        with self._lock:
            reply = None
            if request.is_generation:
                reply = self._queue.popleft() if self._queue else None
                if reply is None and self._error_rate and self._draw_error():
                    reply = FakeReply(status=HTTPStatus.INTERNAL_SERVER_ERROR)
            if reply is not None and reply.latency is not None:
                latency = reply.latency
            else:
                latency = self._draw_latency()
            ident = f"fake{next(self._ids):08d}"
        flavor = _flavor(request)
        if bad_json:
            text = "the request body is not valid JSON"
            return _Json(400, error_body(flavor, 400, text)), latency
        if request.is_generation:
            return self._generate(request, reply, ident), latency
        found = self._other(request, flavor)
        if found is not None:
            return found, latency
        text = f"no route for {request.method} {request.path} on the fake provider"
        return _Json(404, error_body(flavor, 404, text)), latency

    def _draw_error(self) -> bool:
        return self._rng.random() < self._error_rate

    def _draw_latency(self) -> float:
        if isinstance(self._latency, tuple):
            return self._rng.uniform(*self._latency)
        return self._latency

    def _generate(
        self, request: FakeRequest, reply: FakeReply | None, ident: str
    ) -> _Answer:
        if reply is not None and reply.status not in (None, HTTPStatus.OK):
            status = int(reply.status or HTTPStatus.OK)
            text = f"fake provider: HTTP {status} as scripted"
            extra = (("retry-after", "0"),) if status == _TOO_MANY else ()
            return _Json(status, error_body(_flavor(request), status, text), extra)
        cut = reply.truncate_after if reply is not None else None
        if cut is not None and not request.stream:
            return _Drop()
        gen = Generation.resolve(
            request,
            reply=reply,
            text=self.text,
            usage=self.usage,
            ident=ident,
            created=int(time.time()),
        )
        return _render(gen, request, cut)

    def _other(
        self, request: FakeRequest, flavor: Literal["openai", "anthropic"]
    ) -> _Answer | None:
        route, method = request.route, request.method
        body: Any
        if method == "GET" and route == "/models":
            body = models(flavor)
        elif method == "GET" and route.startswith("/models/"):
            body = models(flavor, route.removeprefix("/models/"))
        elif method == "POST" and route == "/embeddings":
            body = embeddings(request)
        elif method == "POST" and route == "/messages/count_tokens":
            body = {"input_tokens": self._input_tokens(request)}
        elif method == "POST" and route == "/responses/input_tokens":
            tokens = self._input_tokens(request)
            body = {"object": "response.input_tokens", "input_tokens": tokens}
        else:
            return None
        return _Json(200, body)

    def _input_tokens(self, request: FakeRequest) -> int:
        """Count input tokens as a generation request with this body would."""
        usage = self.usage
        if isinstance(usage, FakeUsage):
            return usage.input_tokens
        if usage is not None:
            return usage(request).input_tokens
        return request.input_tokens


def _render(gen: Generation, request: FakeRequest, cut: int | None) -> _Answer:
    """The answer of a generation route, in its API's shape."""
    route = request.route
    if request.stream and route != "/responses/compact":  # compact never streams
        options = request.json.get("stream_options")
        include = isinstance(options, dict) and bool(options.get("include_usage"))
        if route == "/chat/completions":
            frames = chat_stream(gen, include_usage=include)
        elif route == "/completions":
            frames = completion_stream(gen, request, include_usage=include)
        elif route == "/responses":
            frames = response_stream(gen, request)
        else:
            frames = message_stream(gen)
        return _Stream(frames, cut)
    body: dict[str, Any]
    if route == "/chat/completions":
        body = chat_completion(gen)
    elif route == "/completions":
        body = completion(gen, request)
    elif route == "/responses":
        body = response(gen, request)
    elif route == "/responses/compact":
        body = compacted_response(gen, request)
    else:
        body = message(gen)
    return _Json(200, body)


def _flavor(request: FakeRequest) -> Literal["openai", "anthropic"]:
    """Whose error and model-list shapes to use for ``request``."""
    if request.route.startswith("/messages") or "anthropic-version" in request.headers:
        return "anthropic"
    return "openai"


# -- HTTP/1.1 ------------------------------------------------------------------------


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError as err:
        raise _BadRequestError(lines[0]) from err
    if not version.startswith("HTTP/1."):
        raise _BadRequestError(version)
    headers: dict[str, str] = {}
    for line in itertools.islice((x for x in lines[1:] if x), _MAX_HEADERS):
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequestError(line)
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return method.upper(), target, version, headers


async def _settle_loop() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> _Received | None:
    """Read one request; ``None`` when the client closed the connection cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if err.partial.strip():
            raise _BadRequestError(err.partial[:80]) from err
        return None
    method, target, version, headers = _parse_head(head)
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await _read_body(reader, headers)
    tokens = {t.strip() for t in headers.get("connection", "").lower().split(",")}
    legacy = version == "HTTP/1.0"
    keep_alive = "keep-alive" in tokens if legacy else "close" not in tokens
    path, _, query = target.partition("?")
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    request = FakeRequest(
        method=method,
        path=path,
        query=dict(parse_qsl(query, keep_blank_values=True)),
        headers=headers,
        json=payload,
    )
    return _Received(
        request,
        # HTTP/1.0 has no chunked encoding: its streams end with the connection.
        keep_alive=keep_alive and not (legacy and request.stream),
        chunked=not legacy,
        bad_json=bool(body) and payload is None,
    )


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError as err:
                raise _BadRequestError(size_line) from err
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise _BadRequestError(length)
    return await reader.readexactly(int(length)) if int(length) else b""


def _status_line(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n"


def _head(status: int, headers: list[tuple[str, str]], *, keep_alive: bool) -> bytes:
    request_id = f"req_fake{time.monotonic_ns():x}"
    lines = [
        _status_line(status),
        *(f"{k}: {v}\r\n" for k, v in headers),
        f"x-request-id: {request_id}\r\nrequest-id: {request_id}\r\n",
        "server: allowance-fake-provider\r\n",
        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n",
    ]
    return "".join(lines).encode("latin-1")


async def _write_json(
    writer: asyncio.StreamWriter, answer: _Json, *, keep_alive: bool
) -> None:
    body = json.dumps(answer.body, separators=(",", ":")).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        *answer.headers,
    ]
    writer.write(_head(answer.status, headers, keep_alive=keep_alive) + body)
    await writer.drain()


async def _write_stream(
    writer: asyncio.StreamWriter, answer: _Stream, *, keep_alive: bool, chunked: bool
) -> bool:
    """Send an SSE stream; return False when it was cut (close the connection)."""
    headers = [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("cache-control", "no-cache"),
    ]
    if chunked:
        headers.append(("transfer-encoding", "chunked"))
    writer.write(_head(200, headers, keep_alive=keep_alive and chunked))
    sent = 0
    for frame in answer.frames:
        if answer.truncate_after is not None and (
            frame.kind == "final"
            or (frame.kind == "content" and sent >= answer.truncate_after)
        ):
            await writer.drain()
            return False
        sent += frame.kind == "content"
        writer.write(
            b"%x\r\n%s\r\n" % (len(frame.data), frame.data) if chunked else frame.data
        )
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True
