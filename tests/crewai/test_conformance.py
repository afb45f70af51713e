"""The adapter conformance suite through real crews, on OpenAI and Anthropic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import crewai
from allowance.testing.conformance import AdapterConformance

if TYPE_CHECKING:
    from allowance.testing import FakeProvider


def _kickoff(llm: Any) -> Any:
    agent = crewai.Agent(
        role="researcher",
        goal="Answer.",
        backstory="Terse.",
        llm=llm,
        max_iter=1,
        max_retry_limit=0,
        verbose=False,
    )
    task = crewai.Task(
        name="answer",
        description="Say hello.",
        expected_output="A greeting.",
        agent=agent,
    )
    return crewai.Crew(agents=[agent], tasks=[task], verbose=False).kickoff()


class TestCrewOnOpenAI(AdapterConformance):
    """``LLM(model="gpt-4o-mini", base_url=...)``: CrewAI's native OpenAI LLM."""

    adapter: ClassVar[str] = "crewai"
    underlying: ClassVar[tuple[str, ...]] = ("openai",)

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        """One crew, one agent, one task: one model call."""
        llm = crewai.LLM(
            model=model,
            base_url=fake.openai_base_url,
            api_key="test",
            max_tokens=max_tokens,
            max_retries=0,
        )
        return _kickoff(llm)


class TestCrewOnAnthropic(AdapterConformance):
    """``LLM(model="anthropic/...")``: CrewAI's native Anthropic LLM.

    It asks ``/v1/messages/count_tokens`` before every call: one charge still.
    """

    adapter: ClassVar[str] = "crewai"
    underlying: ClassVar[tuple[str, ...]] = ("anthropic",)
    model: ClassVar[str] = "claude-3-5-haiku-latest"

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        """One crew, one agent, one task: one model call (and a token count)."""
        llm = crewai.LLM(
            model=f"anthropic/{model}",
            base_url=fake.anthropic_base_url,
            api_key="test",
            max_tokens=max_tokens,
            max_retries=0,
        )
        return _kickoff(llm)
