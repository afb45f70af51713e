"""Run a callback when the process ends: forked multiprocessing children too.

``atexit`` covers a process that ends normally, and a child of ``os.fork``
that does (it inherits the handlers). A child that ``multiprocessing`` forks
ends with ``os._exit``, past ``atexit``; its own exit hook runs its
finalizers instead. ``Process._bootstrap`` clears the finalizers the child
inherited, then runs the after-fork callbacks: the finalizer is registered
from there.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["at_exit"]


class _Anchor:
    """A weakly referenceable object for ``register_after_fork``'s registry."""


_anchor = _Anchor()


def at_exit(callback: Callable[[], None], *, priority: int) -> None:
    """Run ``callback`` at exit; ``priority``: higher runs first in a child."""
    atexit.register(callback)

    def finalize(_: object) -> None:
        util = sys.modules["multiprocessing.util"]
        util.Finalize(None, callback, exitpriority=priority)

    def in_child() -> None:
        util = sys.modules.get("multiprocessing.util")
        if util is not None:  # a multiprocessing child, perhaps: it runs these
            util.register_after_fork(_anchor, finalize)

    os.register_at_fork(after_in_child=in_child)
