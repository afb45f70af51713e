"""Everything that depends on the langchain-core version, in one place."""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contextvars import Context, ContextVar

__all__ = [
    "ADAPTER_NAME",
    "LANGCHAIN_CORE_REQUIREMENT",
    "available",
    "current_task_context",
    "register_configure_hook",
    "unregister_configure_hook",
]

ADAPTER_NAME = "langchain"
"""The adapter's name: ``patch(adapters=["langchain"])`` and the call log."""

LANGCHAIN_CORE_REQUIREMENT = "langchain-core>=1.7,<2"
"""The langchain-core versions this package is tested with (see SUPPORTED)."""

_TRACER_CONTEXT = "langchain_core.tracers.context"


SUPPORTED = ((1, 7), (2, 0))
"""langchain-core versions supported: from 1.7 (inclusive) to 2.0 (exclusive)."""


def _release(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "0")
    except (IndexError, ValueError):
        return None


def available() -> bool:
    """Return True when langchain-core is installed in a supported version."""
    if importlib.util.find_spec("langchain_core") is None:
        return False
    try:
        release = _release(importlib.metadata.version("langchain-core"))
    except importlib.metadata.PackageNotFoundError:
        return False
    return release is not None and SUPPORTED[0] <= release < SUPPORTED[1]


def register_configure_hook(var: ContextVar[Any]) -> None:
    """Make every callback manager langchain-core configures include ``var``'s handler.

    ``inheritable=False``: a child run does not inherit the handler from its
    parent; the hook adds it again, last, to the manager of every run
    (chains, tools, agents, models), in executor threads and asyncio tasks
    too, since a ContextVar's default is seen in every context. Last matters:
    a handler the run was given (``config``, ``with_config``, a model's
    ``callbacks``) then starts each model call first and charges it, and the
    global handler steps aside (``_handler._claimed``). Inherited from a
    parent instead, the global handler would come first and charge the call
    too.
    """
    module = importlib.import_module(_TRACER_CONTEXT)
    hooks: list[tuple[Any, ...]] = getattr(module, "_configure_hooks", [])
    if any(hook[0] is var for hook in hooks):
        return
    module.register_configure_hook(var, inheritable=False)


def unregister_configure_hook(var: ContextVar[Any]) -> bool:
    """Remove ``var``'s configure hook; return False if this langchain-core cannot.

    langchain-core has no public way to remove a hook: this edits its private
    hook list when it exists. When it does not, the caller makes the handler
    inert instead.
    """
    module = importlib.import_module(_TRACER_CONTEXT)
    hooks = getattr(module, "_configure_hooks", None)
    if not isinstance(hooks, list):
        return False
    hooks[:] = [hook for hook in hooks if not (hook and hook[0] is var)]
    return True


def current_task_context() -> Context | None:
    """Return the running asyncio task's Context (Python 3.12+), or None.

    Lets an end callback that LangChain runs in a task of its own reset what
    the start callback set in the caller's task.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    get_context = getattr(task, "get_context", None)
    return None if get_context is None else get_context()
