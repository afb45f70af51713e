"""Shared pieces of the LangChain tests: real models over HTTP on the fake provider.

``AcmeChatModel`` stands for any provider LangChain supports whose SDK
``allowance`` does not patch (Gemini, Bedrock, Ollama...): a real
``BaseChatModel`` that speaks the Chat Completions wire format with plain
``httpx`` to the fake provider, reports ``usage_metadata`` and names its
provider ``acme``. The handler itself must estimate, reserve, block and commit
its calls.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import httpx
from langchain_anthropic import ChatAnthropic
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_openai import ChatOpenAI

import allowance
from allowance_langchain import AllowanceCallbackHandler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )

    from allowance.testing import FakeProvider

GPT = "gpt-4o"
MINI = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
ACME = "acme-large"


class AcmeChatModel(BaseChatModel):
    """A chat model of a provider allowance has no SDK layer for."""

    base_url: str
    model_name: str = ACME
    max_tokens: int | None = None
    timeout: float = 30.0

    @property
    def _llm_type(self) -> str:
        return "acme-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name, "max_tokens": self.max_tokens}

    def _get_ls_params(
        self, stop: list[str] | None = None, **kwargs: Any
    ) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "acme"
        params["ls_model_name"] = self.model_name
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        return params

    def _body(self, messages: list[BaseMessage]) -> dict[str, Any]:
        roles = {"human": "user", "ai": "assistant", "system": "system"}
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": [
                {"role": roles.get(m.type, "user"), "content": m.text} for m in messages
            ],
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    @staticmethod
    def _result(response: httpx.Response) -> ChatResult:
        response.raise_for_status()
        data = response.json()
        usage = data["usage"]
        message = AIMessage(
            content=data["choices"][0]["message"]["content"] or "",
            usage_metadata={
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            },
            response_metadata={"model_name": data["model"]},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        with httpx.Client(base_url=self.base_url, timeout=self.timeout) as client:
            return self._result(
                client.post("/chat/completions", json=self._body(messages))
            )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=self.timeout
        ) as client:
            return self._result(
                await client.post("/chat/completions", json=self._body(messages))
            )


def _chunk(line: str) -> ChatGenerationChunk | None:
    """The chunk of one server-sent event of a Chat Completions stream, if any."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    data = json.loads(line.removeprefix("data: "))
    usage = data.get("usage")
    text = "".join(
        (choice.get("delta") or {}).get("content") or ""
        for choice in data.get("choices") or []
    )
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content=text,
            usage_metadata=None
            if usage is None
            else {
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
            },
        )
    )


class AcmeStreamingChatModel(AcmeChatModel):
    """``AcmeChatModel`` that streams (usage in the last chunk, as OpenAI sends it)."""

    stall_after: int | None = None
    """Async streams: wait forever after this many chunks (to be cancelled)."""

    def _stream_body(self, messages: list[BaseMessage]) -> dict[str, Any]:
        body = self._body(messages)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return body

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        with (
            httpx.Client(base_url=self.base_url, timeout=self.timeout) as client,
            client.stream(
                "POST", "/chat/completions", json=self._stream_body(messages)
            ) as response,
        ):
            response.raise_for_status()
            for line in response.iter_lines():
                chunk = _chunk(line)
                if chunk is not None:
                    yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        sent = 0
        async with (
            httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout) as client,
            client.stream(
                "POST", "/chat/completions", json=self._stream_body(messages)
            ) as response,
        ):
            response.raise_for_status()
            async for line in response.aiter_lines():
                chunk = _chunk(line)
                if chunk is None:
                    continue
                if sent == self.stall_after:
                    await asyncio.Event().wait()  # never set: until cancelled
                yield chunk
                sent += 1


def chat_openai(
    fake: FakeProvider, *, model: str = GPT, max_tokens: int = 64, **options: Any
) -> ChatOpenAI:
    """A ChatOpenAI on the fake provider (a custom ``base_url``, no retries)."""
    return ChatOpenAI(
        model=model,
        base_url=fake.openai_base_url,
        api_key="test",  # type: ignore[arg-type]
        max_retries=0,
        max_tokens=max_tokens,  # type: ignore[call-arg]
        **options,
    )


def chat_anthropic(
    fake: FakeProvider, *, model: str = CLAUDE, max_tokens: int = 64, **options: Any
) -> ChatAnthropic:
    """A ChatAnthropic on the fake provider (no retries)."""
    return ChatAnthropic(  # type: ignore[call-arg]
        model=model,  # type: ignore[arg-type]
        base_url=fake.anthropic_base_url,
        api_key="test",  # type: ignore[arg-type]
        max_retries=0,
        max_tokens=max_tokens,
        **options,
    )


def acme(fake: FakeProvider, *, max_tokens: int = 64) -> AcmeChatModel:
    """An AcmeChatModel on the fake provider."""
    return AcmeChatModel(base_url=fake.openai_base_url, max_tokens=max_tokens)


def acme_stream(
    fake: FakeProvider, *, max_tokens: int = 64, **options: Any
) -> AcmeStreamingChatModel:
    """An AcmeStreamingChatModel on the fake provider."""
    return AcmeStreamingChatModel(
        base_url=fake.openai_base_url, max_tokens=max_tokens, **options
    )


def handler(**options: Any) -> AllowanceCallbackHandler:
    """A handler on a fresh memory ledger."""
    options.setdefault("ledger", "memory://")
    return AllowanceCallbackHandler(**options)


def guard_of(h: AllowanceCallbackHandler) -> allowance.Guard:
    assert h.guard is not None
    return h.guard
