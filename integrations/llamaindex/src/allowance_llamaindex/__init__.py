"""allowance for LlamaIndex: budget limits on query engines, agents and indexing.

Two ways in: ``allowance.patch(...)`` installs this adapter with every other
one, or ``instrument(budget="$0.25", per="query")`` installs it alone
(``uninstrument()`` removes it). Span and event handlers on llama-index-core's
root instrumentation dispatcher give each query (the outermost LlamaIndex
call: ``engine.query``, ``retriever.retrieve``, an agent run, an index build,
a bare ``llm.chat``) a ``query`` id, and each call a ``stage`` (``retrieve``,
``synthesize``, ``embed``, ``agent``...): a ``per="query"`` budget covers every
model and embedding call a query makes. ``allowance.scope(...)`` adds tenants,
users, or your own ``query`` id.

Which path blocks which call (the dispatcher swallows its handlers'
exceptions, so blocking happens elsewhere):

- ``llama_index.llms.openai.OpenAI`` and its subclasses (``AzureOpenAI``,
  ``OpenAILike``...), ``llama_index.llms.anthropic.Anthropic``,
  ``llama_index.embeddings.openai.OpenAIEmbedding``: the span handler routes
  the call (``allowance.seen_by``) to the SDK layer beneath, which blocks
  before any byte is sent, degrades, and charges exact usage (streams too:
  ``include_usage`` is injected; a stream dropped early is charged what it
  produced).
- Any other LLM class (Gemini, Bedrock, Ollama, ``CustomLLM``...): a legacy
  ``CallbackManager`` handler, added to that LLM's callback manager on its
  first call, reserves the worst case in ``on_event_start`` (an exception
  raised there reaches the caller), then charges the usage the response
  reports (``raw.usage``, or ``prompt_tokens``/``completion_tokens`` in
  ``additional_kwargs``), else keeps the reservation. It cannot switch to a
  fallback model. Embeddings of other classes are not charged.
"""

from __future__ import annotations

from allowance_llamaindex._adapter import LlamaIndexAdapter, instrument, uninstrument

__all__ = ["LlamaIndexAdapter", "instrument", "uninstrument"]
