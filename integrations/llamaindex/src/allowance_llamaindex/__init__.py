"""allowance for LlamaIndex (work in progress)."""
