"""The ``langchain`` adapter ``allowance.patch()`` installs: a handler on every run."""

from __future__ import annotations

import contextvars
import threading
from typing import TYPE_CHECKING

from allowance_langchain import _compat

if TYPE_CHECKING:
    import allowance
    from allowance_langchain._handler import AllowanceCallbackHandler

__all__ = ["LangChainAdapter"]


class LangChainAdapter:
    """Attach an ``AllowanceCallbackHandler`` to every LangChain run in the process.

    ``install`` registers langchain-core's configure hook with a ContextVar whose
    *default* is the handler, so every callback manager LangChain configures
    (invoke, batch, stream, ainvoke, astream, chains, tools, executor threads,
    asyncio tasks) includes it. ``uninstall`` removes the hook and unbinds the
    handler, so nothing is charged even where the hook lingers.
    """

    name = _compat.ADAPTER_NAME
    requires = (_compat.LANGCHAIN_CORE_REQUIREMENT,)
    module = "langchain_core"  # patch() installs it once the program imports this

    def __init__(self) -> None:
        """Create the adapter, not installed."""
        self._lock = threading.Lock()
        self._handler: AllowanceCallbackHandler | None = None
        self._var: contextvars.ContextVar[AllowanceCallbackHandler | None] | None = None

    def __repr__(self) -> str:
        """Show whether the adapter is installed."""
        state = "installed" if self.installed else "not installed"
        return f"<LangChainAdapter {state}>"

    @property
    def installed(self) -> bool:
        """True between ``install`` and ``uninstall``."""
        return self._handler is not None and self._handler.guard is not None

    @property
    def handler(self) -> AllowanceCallbackHandler | None:
        """The handler attached to every run while installed."""
        return self._handler if self.installed else None

    def available(self) -> bool:
        """Return True when langchain-core is installed in a supported version."""
        return _compat.available()

    def install(self, guard: allowance.Guard) -> None:
        """Attach the handler to every run, charging ``guard``; again: swap guards."""
        with self._lock:
            if self._handler is None:
                # Imported here: the plugin must load without langchain-core.
                from allowance_langchain._handler import (  # noqa: PLC0415
                    AllowanceCallbackHandler,
                )

                self._handler = AllowanceCallbackHandler._unbound()  # noqa: SLF001
                self._var = contextvars.ContextVar(
                    "allowance_langchain_handler", default=self._handler
                )
            self._handler.guard = guard
            assert self._var is not None  # noqa: S101 - set together with the handler
            _compat.register_configure_hook(self._var)

    def uninstall(self) -> None:
        """Detach the handler; a no-op when not installed."""
        with self._lock:
            if self._handler is None:
                return
            self._handler.guard = None
            if self._var is not None:
                _compat.unregister_configure_hook(self._var)
