"""allowance for LangChain (work in progress)."""
