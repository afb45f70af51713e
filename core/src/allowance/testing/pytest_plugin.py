"""pytest plugin: a fake provider and real SDK clients pointed at it.

Load it with ``-p allowance.testing.pytest_plugin`` (or ``pytest_plugins =
["allowance.testing.pytest_plugin"]`` in a ``conftest.py``). Fixtures:

- ``hermetic_env`` (autouse, everywhere): removes every ``OPENAI_*``,
  ``ANTHROPIC_*`` and ``ALLOWANCE_*`` environment variable for the test.
- ``fake_provider``: a fresh, started :class:`~allowance.testing.FakeProvider`
  per test, with default settings.
- ``openai_client`` / ``async_openai_client`` and ``anthropic_client`` /
  ``async_anthropic_client``: real SDK clients on ``fake_provider`` with
  ``api_key="test"`` and ``max_retries=0``, closed at teardown. They skip the
  test when the SDK is not installed.

The async fixtures need pytest-asyncio. The server listens on ``127.0.0.1``:
with pytest-socket, allow it (``--allow-hosts=127.0.0.1``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

from allowance.testing._fake_provider import FakeProvider

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    import anthropic
    import openai

    _async_fixture = pytest.fixture
else:
    try:
        from pytest_asyncio import fixture as _async_fixture
    except ImportError:  # pragma: no cover - then async fixtures need another runner
        _async_fixture = pytest.fixture

__all__ = [
    "anthropic_client",
    "async_anthropic_client",
    "async_openai_client",
    "fake_provider",
    "hermetic_env",
    "openai_client",
]

_HERMETIC_PREFIXES = ("OPENAI_", "ANTHROPIC_", "ALLOWANCE_")
_API_KEY = "test"


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove ``OPENAI_*``, ``ANTHROPIC_*`` and ``ALLOWANCE_*`` variables for a test.

    So no test reads a developer's real API key, base URL or allowance
    settings; restored at teardown.
    """
    for name in list(os.environ):
        if name.startswith(_HERMETIC_PREFIXES):
            monkeypatch.delenv(name)


@pytest.fixture
def fake_provider() -> Iterator[FakeProvider]:
    """Yield a started fake provider with default settings, stopped at teardown.

    Example:
        >>> def test_counts(fake_provider, openai_client):  # doctest: +SKIP
        ...     openai_client.chat.completions.create(model="m", messages=[])
        ...     assert fake_provider.count("/chat/completions") == 1
    """
    with FakeProvider() as fake:
        yield fake


def _client_options(base_url: str) -> dict[str, Any]:
    return {"api_key": _API_KEY, "base_url": base_url, "max_retries": 0}


@pytest.fixture
def openai_client(fake_provider: FakeProvider) -> Iterator[openai.OpenAI]:
    """Yield an ``openai.OpenAI`` client on the fake provider (no retries)."""
    sdk = pytest.importorskip("openai")
    client: openai.OpenAI = sdk.OpenAI(**_client_options(fake_provider.openai_base_url))
    yield client
    client.close()


@_async_fixture
async def async_openai_client(
    fake_provider: FakeProvider,
) -> AsyncIterator[openai.AsyncOpenAI]:
    """Yield an ``openai.AsyncOpenAI`` client on the fake provider (no retries)."""
    sdk = pytest.importorskip("openai")
    options = _client_options(fake_provider.openai_base_url)
    client: openai.AsyncOpenAI = sdk.AsyncOpenAI(**options)
    yield client
    await client.close()


@pytest.fixture
def anthropic_client(fake_provider: FakeProvider) -> Iterator[anthropic.Anthropic]:
    """Yield an ``anthropic.Anthropic`` client on the fake provider (no retries)."""
    sdk = pytest.importorskip("anthropic")
    options = _client_options(fake_provider.anthropic_base_url)
    client: anthropic.Anthropic = sdk.Anthropic(**options)
    yield client
    client.close()


@_async_fixture
async def async_anthropic_client(
    fake_provider: FakeProvider,
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """Yield an ``anthropic.AsyncAnthropic`` client on the fake provider."""
    sdk = pytest.importorskip("anthropic")
    options = _client_options(fake_provider.anthropic_base_url)
    client: anthropic.AsyncAnthropic = sdk.AsyncAnthropic(**options)
    yield client
    await client.close()
