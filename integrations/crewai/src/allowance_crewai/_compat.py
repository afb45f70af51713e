"""What differs between CrewAI versions and providers, in one place.

Nothing here imports CrewAI at module import: ``allowance`` loads the plugin
(through its entry point) in processes that never build a crew, and importing
CrewAI takes seconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from typing import Any

__all__ = [
    "REQUIRES",
    "crewai_supported",
    "native_classes",
    "scope_value",
    "sdk_provider",
]

REQUIRES = ("crewai>=1.15,<2",)
"""The CrewAI versions this adapter is tested with."""

_LOWEST = (1, 15)
_BELOW = (2, 0)
_MAX_VALUE = 256  # allowance refuses longer scope values


def crewai_supported() -> bool:
    """Return True when CrewAI is installed in a version ``REQUIRES`` admits."""
    if importlib.util.find_spec("crewai") is None:
        return False
    try:
        found = importlib.metadata.version("crewai")
    except importlib.metadata.PackageNotFoundError:
        return False
    match = re.match(r"(\d+)\.(\d+)", found)
    if match is None:
        return False
    version = (int(match.group(1)), int(match.group(2)))
    return _LOWEST <= version < _BELOW


def sdk_provider(llm: object) -> str | None:
    """Return the SDK ``allowance`` patches beneath ``llm``, or None.

    CrewAI's native ``OpenAICompletion`` and ``AnthropicCompletion`` call the
    official SDKs, whose requests the SDK layer sees. Every other LLM (a
    LiteLLM-backed ``LLM``, Gemini, Bedrock, Azure AI Inference, a custom
    ``BaseLLM``) is charged by this adapter itself. Decided by class, never by
    ``llm.provider``: a custom ``BaseLLM`` defaults that field to ``"openai"``.
    """
    for module, name, provider in _NATIVE:
        cls = _class(module, name)
        if cls is not None and isinstance(llm, cls):
            return provider
    return None


def native_classes() -> tuple[type, ...]:
    """Return CrewAI's native LLM classes ``sdk_provider`` names (those importable)."""
    found = (_class(module, name) for module, name, _ in _NATIVE)
    return tuple(cls for cls in found if isinstance(cls, type))


_NATIVE = (
    ("crewai.llms.providers.openai.completion", "OpenAICompletion", "openai"),
    (
        "crewai.llms.providers.anthropic.completion",
        "AnthropicCompletion",
        "anthropic",
    ),
)


_classes: dict[tuple[str, str], Any] = {}


def _class(module: str, name: str) -> Any:
    key = (module, name)
    if key not in _classes:
        try:
            _classes[key] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # the provider's SDK is not installed
            _classes[key] = None
    return _classes[key]


def scope_value(value: object) -> str | None:
    """Return ``value`` as a scope identifier (stripped, at most 256 chars), or None."""
    if value is None:
        return None
    text = " ".join(str(value).split())
    if not text:
        return None
    return text[:_MAX_VALUE]
