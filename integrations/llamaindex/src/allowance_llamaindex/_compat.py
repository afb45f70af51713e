"""Everything that depends on the installed llama-index-core version, in one place."""

from __future__ import annotations

from importlib import metadata

__all__ = ["REQUIRES", "SDK_MODULES", "available", "provider_of"]

REQUIRES = ("llama-index-core>=0.14,<0.15",)
"""The llama-index-core versions this adapter is tested with."""

SDK_MODULES: tuple[tuple[str, str], ...] = (
    ("llama_index.llms.azure_openai", "azure"),
    ("llama_index.llms.openai", "openai"),
    ("llama_index.llms.anthropic", "anthropic"),
    ("llama_index.embeddings.azure_openai", "azure"),
    ("llama_index.embeddings.openai", "openai"),
)
"""Module prefix of a LlamaIndex class -> the SDK its requests go through."""

_OTHER_PROVIDERS: tuple[tuple[str, str], ...] = (
    ("llama_index.llms.gemini", "google"),
    ("llama_index.llms.google_genai", "google"),
    ("llama_index.llms.vertex", "google"),
    ("llama_index.llms.mistralai", "mistral"),
    ("llama_index.llms.groq", "groq"),
    ("llama_index.llms.bedrock", "bedrock"),
    ("llama_index.llms.ollama", "ollama"),
    ("llama_index.llms.cohere", "cohere"),
)


def available() -> bool:
    """Return True when llama-index-core 0.14 is importable."""
    try:
        version = metadata.version("llama-index-core")
    except metadata.PackageNotFoundError:
        return False
    major, _, rest = version.partition(".")
    minor = rest.partition(".")[0]
    return major == "0" and minor == "14"


def provider_of(obj: object) -> tuple[str, bool]:
    """Return ``(provider id, True if an allowance SDK layer can see its requests)``.

    Decided from the modules of the classes in ``obj``'s MRO, so a subclass of
    ``llama_index.llms.openai.OpenAI`` (``OpenAILike``...) keeps its SDK path.
    """
    for cls in type(obj).__mro__:
        module = cls.__module__
        for prefix, provider in SDK_MODULES:
            if module.startswith(prefix):
                return provider, True
    for cls in type(obj).__mro__:
        module = cls.__module__
        for prefix, provider in _OTHER_PROVIDERS:
            if module.startswith(prefix):
                return provider, False
    return "unknown", False
