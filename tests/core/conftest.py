"""Shared by the core tests: a real webhook receiver on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    path: str = ""


@dataclass
class Receiver:
    url: str
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answered in order, then 204
    hold: threading.Event | None = None

    def json(self, index: int = 0) -> Any:
        return json.loads(self.received[index].body)

    @property
    def bodies(self) -> list[bytes]:
        return [r.body for r in self.received]

    @property
    def headers(self) -> list[dict[str, str]]:
        """Each POST's headers, names in lower case."""
        return [{k.lower(): v for k, v in r.headers.items()} for r in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["content-length"])
            state.received.append(
                Received(self.rfile.read(length), dict(self.headers.items()), self.path)
            )
            if state.hold is not None:
                state.hold.wait(10)
            status = state.statuses.pop(0) if state.statuses else 204
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("location", "/elsewhere")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        yield state
    finally:
        if state.hold is not None:
            state.hold.set()
        server.shutdown()
        server.server_close()
