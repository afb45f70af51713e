"""The adapter conformance suite, through real LlamaIndex LLM classes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import ChatMessage
from tests.llamaindex.conftest import HttpLLM, openai_llm

from allowance.testing.conformance import AdapterConformance

if TYPE_CHECKING:
    from allowance.testing import FakeProvider


class TestOpenAILLM(AdapterConformance):
    """``llama_index.llms.openai.OpenAI``: the SDK layer beneath blocks and charges."""

    adapter = "llamaindex"
    underlying = ("openai",)

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        """One chat call."""
        # LlamaIndex retries around the SDK's own retries: one attempt each.
        llm = openai_llm(fake, model=model, max_tokens=max_tokens, max_retries=0)
        return llm.chat([ChatMessage(role="user", content="Say hello.")])


class TestNonPatchedLLM(AdapterConformance):
    """A ``CustomLLM`` over plain HTTP: the callback path blocks and charges."""

    adapter = "llamaindex"

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        """One completion call."""
        llm = HttpLLM(base_url=fake.openai_base_url, model=model, max_tokens=max_tokens)
        return llm.complete("Say hello.")
