"""allowance for LangChain: budgets enforced on any chain, chat model or agent.

Two ways to use it:

- Per run: ``chain.invoke(inputs, config={"callbacks": [handler]})`` with
  ``handler = AllowanceCallbackHandler(budget="$1.00")``.
- For every run in the process: ``allowance.patch(budget="$1.00")`` attaches a
  handler through langchain-core's configure hook; ``allowance.unpatch()``
  detaches it.

Example:
    >>> from allowance_langchain import AllowanceCallbackHandler
    >>> handler = AllowanceCallbackHandler(budget="$1.00", fallback="gpt-4o-mini")
"""

from __future__ import annotations

from allowance_langchain._handler import AllowanceCallbackHandler

__all__ = ["AllowanceCallbackHandler"]
