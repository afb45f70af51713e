"""The adapter object ``allowance.patch`` installs; imports LlamaIndex when used."""

from __future__ import annotations

import threading
from typing import Any

import allowance
from allowance_llamaindex import _compat

__all__ = ["LlamaIndexAdapter", "adapter", "instrument", "uninstrument"]


class LlamaIndexAdapter:
    """The ``allowance`` adapter for LlamaIndex (``allowance.patch`` installs it).

    Attributes:
        name: ``"llamaindex"``.
        requires: The supported llama-index-core versions.
    """

    name = "llamaindex"
    requires = _compat.REQUIRES
    module = "llama_index.core"  # patch() installs it once the program imports this

    def __init__(self) -> None:
        """Nothing is installed until ``install``."""
        self._lock = threading.Lock()
        self._installed = False

    def __repr__(self) -> str:
        """Name and state."""
        return f"<LlamaIndexAdapter installed={self._installed}>"

    def available(self) -> bool:
        """Return True when llama-index-core 0.14 is installed."""
        return _compat.available()

    @property
    def installed(self) -> bool:
        """True while the handlers are on LlamaIndex's root dispatcher."""
        return self._installed

    def install(self, guard: allowance.Guard) -> None:
        """Route LlamaIndex's model calls through ``guard``; again: swap the guard.

        Raises:
            AdapterUnavailableError: llama-index-core 0.14 is not installed.
        """
        if not self.available():
            raise allowance.AdapterUnavailableError(
                self.name, f"needs {_compat.REQUIRES[0]}"
            )
        from allowance_llamaindex import _instrument  # noqa: PLC0415 - heavy

        with self._lock:
            _instrument.install(guard)
            self._installed = True

    def uninstall(self) -> None:
        """Remove every handler ``install`` added; a no-op when not installed."""
        with self._lock:
            if not self._installed:
                return
            from allowance_llamaindex import _instrument  # noqa: PLC0415

            _instrument.uninstall()
            self._installed = False


adapter = LlamaIndexAdapter()
"""The one adapter object (the plugin hook returns it)."""


def instrument(
    budget: int | str | allowance.Budget | None = None,
    *,
    per: str = "query",
    guard: allowance.Guard | None = None,
    **options: Any,
) -> allowance.Guard:
    """Put LlamaIndex under a budget: every query, retrieval, agent run and index build.

    Args:
        budget: ``"$0.25"``, an int of tokens, ``"50k tokens"`` or a ``Budget``.
        per: The dimension of ``budget``; default ``"query"``: each query
            (its outermost LlamaIndex call) has a budget of its own.
        guard: An existing ``allowance.Guard`` instead of ``budget``.
        **options: Other ``allowance.Guard`` arguments (``ledger``,
            ``fallback``, ``threshold``, ``on_limit``, ``window``, ``fail``).

    Returns:
        The guard in force.

    Raises:
        ConfigurationError: Both or neither of ``budget`` and ``guard``, or a
            malformed option.

    Example:
        >>> instrument(budget="$0.25", per="query")
        >>> engine.query("What did the author do?")  # each query: its own $0.25
    """
    if (budget is None) == (guard is None):
        raise allowance.ConfigurationError(
            "budget",
            budget,
            "exactly one of budget=... or guard=allowance.Guard(...)",
        )
    if guard is not None and options:
        raise allowance.ConfigurationError(
            "options", sorted(options), "no other argument together with guard="
        )
    the_guard = guard or allowance.Guard(budget=budget, per=per, **options)
    adapter.install(the_guard)
    return the_guard


def uninstrument() -> None:
    """Undo ``instrument``: LlamaIndex's calls are no longer guarded."""
    adapter.uninstall()
