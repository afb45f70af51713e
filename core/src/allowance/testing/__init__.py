"""Test doubles for code that uses allowance (and for allowance's own tests).

:class:`FakeProvider` is a real HTTP server on ``127.0.0.1`` that speaks the
OpenAI (Chat Completions, Responses, embeddings) and Anthropic (Messages)
wire formats, so the real SDKs can be driven offline, as ``httpx.MockTransport``
does for httpx. :class:`RedisServer` runs a throwaway ``redis-server`` on a
free local port for tests of the Redis ledger. The pytest fixtures live in
:mod:`allowance.testing.pytest_plugin`.

Example:
    >>> from allowance.testing import FakeProvider, FakeReply, FakeUsage
    >>> with FakeProvider(usage=FakeUsage(input_tokens=12, output_tokens=3)) as fake:
    ...     fake.enqueue(FakeReply(status=429))
    ...     fake.url.startswith("http://127.0.0.1:")
    True
"""

from __future__ import annotations

from allowance.testing._fake_models import FakeReply, FakeRequest, FakeUsage
from allowance.testing._fake_provider import FakeProvider
from allowance.testing._redis_server import RedisServer

__all__ = [
    "FakeProvider",
    "FakeReply",
    "FakeRequest",
    "FakeUsage",
    "RedisServer",
]
