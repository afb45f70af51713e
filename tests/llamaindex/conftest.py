"""Fixtures: LlamaIndex pointed at the fake provider, nothing left installed."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import pytest_asyncio
from llama_index.core import Settings
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

import allowance
from allowance_llamaindex import uninstrument

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from allowance.testing import FakeProvider

MODEL = "gpt-4o-mini"


class HttpLLM(CustomLLM):
    """An LLM class allowance's SDK layer does not see: raw httpx, usage reported."""

    base_url: str
    model: str = MODEL
    max_tokens: int = 64
    timeout: float = 10

    @property
    def metadata(self) -> LLMMetadata:
        """The model and its output cap."""
        return LLMMetadata(model_name=self.model, num_output=self.max_tokens)

    @llm_completion_callback()
    def complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """One chat completion over plain HTTP."""
        reply = httpx.post(
            f"{self.base_url}/chat/completions",
            json={
                "model": self.model,
                "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": prompt}],
            },
            timeout=self.timeout,
        )
        reply.raise_for_status()
        body = reply.json()
        usage = body["usage"]
        return CompletionResponse(
            text=body["choices"][0]["message"]["content"],
            raw=body,
            additional_kwargs={
                "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
            },
        )

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """One response, yielded twice (a stream of two chunks)."""
        response = self.complete(prompt)

        def gen() -> CompletionResponseGen:
            yield response
            yield response

        return gen()


def openai_llm(fake: FakeProvider, **kwargs: Any) -> OpenAI:
    """A llama-index OpenAI LLM talking to the fake provider."""
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("max_tokens", 64)
    return OpenAI(api_base=fake.openai_base_url, api_key="test", **kwargs)


@pytest.fixture(autouse=True)
def _no_stray_event_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the loop llama-index's ``asyncio_run`` leaves in the main thread.

    A sync query counts tokens through ``asyncio_run``, whose
    ``asyncio.get_event_loop()`` creates a loop and never closes it.
    """
    yield
    if request.node.get_closest_marker("asyncio"):
        return
    with warnings.catch_warnings(), contextlib.suppress(RuntimeError):
        warnings.simplefilter("ignore", DeprecationWarning)
        loop = asyncio.get_event_loop_policy().get_event_loop()
        if not loop.is_running():
            loop.close()
            asyncio.set_event_loop(None)


@pytest.fixture(autouse=True)
def _settings(fake_provider: FakeProvider) -> Iterator[None]:
    """Point LlamaIndex's defaults at the fake provider; uninstall afterwards."""
    Settings.llm = openai_llm(fake_provider)
    Settings.embed_model = OpenAIEmbedding(
        api_base=fake_provider.openai_base_url, api_key="test"
    )
    try:
        yield
    finally:
        uninstrument()
        allowance.unpatch()


@pytest_asyncio.fixture
async def async_http(fake_provider: FakeProvider) -> AsyncIterator[httpx.AsyncClient]:
    """One async HTTP client for the test's async LLM and embeddings, closed after.

    LlamaIndex's OpenAI classes otherwise keep async clients bound to a loop
    that is gone by the next test.
    """
    async with httpx.AsyncClient() as client:
        Settings.llm = openai_llm(fake_provider, async_http_client=client)
        Settings.embed_model = OpenAIEmbedding(
            api_base=fake_provider.openai_base_url,
            api_key="test",
            async_http_client=client,
        )
        yield client
