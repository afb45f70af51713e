"""The SDK adapters pass the adapter conformance suite third-party adapters run."""

from __future__ import annotations

from typing import Any

import anthropic
import openai

from allowance.testing import FakeProvider
from allowance.testing.conformance import AdapterConformance


class TestOpenAIChat(AdapterConformance):
    adapter = "openai"

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        with openai.OpenAI(
            base_url=fake.openai_base_url, api_key="test", max_retries=0
        ) as client:
            return client.chat.completions.create(
                model=model,
                max_tokens=max_tokens,
                messages=[{"role": "user", "content": "Say hello."}],
            )


class TestOpenAIResponses(AdapterConformance):
    adapter = "openai"

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        with openai.OpenAI(
            base_url=fake.openai_base_url, api_key="test", max_retries=0
        ) as client:
            return client.responses.create(
                model=model, max_output_tokens=max_tokens, input="Say hello."
            )


class TestAnthropicMessages(AdapterConformance):
    adapter = "anthropic"
    model = "claude-haiku-4-5"

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        with anthropic.Anthropic(
            base_url=fake.anthropic_base_url, api_key="test", max_retries=0
        ) as client:
            return client.messages.create(
                model=model,
                max_tokens=max_tokens,
                messages=[{"role": "user", "content": "Say hello."}],
            )
