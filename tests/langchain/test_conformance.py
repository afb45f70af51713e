"""The adapter conformance suite, through LangChain's real chat models.

ChatOpenAI and ChatAnthropic go through the SDK layer beneath (tested with
the SDK adapters installed and not); ``AcmeChatModel`` is a provider with no
SDK layer, which the handler charges itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from tests.langchain.conftest import CLAUDE, acme, chat_anthropic, chat_openai

from allowance.testing.conformance import AdapterConformance

if TYPE_CHECKING:
    from allowance.testing import FakeProvider


class TestChatOpenAI(AdapterConformance):
    adapter = "langchain"
    underlying = ("openai",)

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        return chat_openai(fake, model=model, max_tokens=max_tokens).invoke(
            "Say hello."
        )


class TestChatAnthropic(AdapterConformance):
    adapter = "langchain"
    underlying = ("anthropic",)
    model: ClassVar[str] = CLAUDE

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        return chat_anthropic(fake, model=model, max_tokens=max_tokens).invoke(
            "Say hello."
        )


class TestProviderWithoutSdkLayer(AdapterConformance):
    adapter = "langchain"

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        return acme(fake, max_tokens=max_tokens).invoke("Say hello.")
