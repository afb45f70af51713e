"""The adapter both SDKs share: per class for ``patch()``, per client for ``wrap()``.

``install`` wraps ``SyncAPIClient.request`` and ``AsyncAPIClient.request`` of the
SDK's ``_base_client`` with wrapt: every client, built before or after, by the
user or by a framework, goes through it (a constructor patch would miss clients
built before it). ``uninstall`` puts the exact original functions back.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import threading
from typing import TYPE_CHECKING, Any

import wrapt
from packaging.requirements import InvalidRequirement, Requirement

from allowance._sdk._common import (
    make_async_interceptor,
    make_sync_interceptor,
    retry_async,
    retry_sync,
)

if TYPE_CHECKING:
    from allowance._guard import Guard
    from allowance._sdk._common import SdkBinding

__all__ = ["SdkAdapter", "requirement_met"]

logger = logging.getLogger("allowance")

_CLASSES = ("SyncAPIClient", "AsyncAPIClient")
_INSTANCE_ATTRS = ("request", "copy", "with_options", "allowance")


_retry_lock = threading.Lock()


def hook_retries(base: Any) -> None:
    """Wrap the SDK's ``_sleep_for_retry`` once (sync and async), for good.

    The SDK calls it between the attempts of one ``request``; the wrapper
    charges an attempt that timed out (``retry_sync``). It does nothing
    outside a guarded call, so it stays after ``uninstall``: whichever way a
    client is guarded (``patch``, ``wrap``, a framework route), one hook per
    class sees its retries once.
    """
    with _retry_lock:
        for name, hook in zip(_CLASSES, (retry_sync, retry_async), strict=True):
            cls = getattr(base, name, None)
            current = getattr(cls, "__dict__", {}).get("_sleep_for_retry")
            if current is None or isinstance(current, wrapt.FunctionWrapper):
                continue  # an SDK without it (nothing to charge), or hooked
            wrapt.wrap_function_wrapper(cls, "_sleep_for_retry", hook)


def requirement_met(requirement: str) -> bool:
    """Return True when PEP 508 ``requirement`` is installed in a matching version."""
    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return False
    if importlib.util.find_spec(req.name.replace("-", "_")) is None:
        return False
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(installed, prereleases=True)


class SdkAdapter:
    """Base of the OpenAI and Anthropic adapters (subclasses name the SDK)."""

    name: str
    requires: tuple[str, ...]
    module: str
    base_module: str

    def __init__(self) -> None:
        """Create the adapter, not installed."""
        self._lock = threading.Lock()
        self._guard: Guard | None = None
        self._originals: dict[str, Any] = {}
        self._binding: SdkBinding | None = None

    def __repr__(self) -> str:
        """Show the adapter's name and whether it is installed."""
        state = "installed" if self.installed else "not installed"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    def binding(self) -> SdkBinding:
        """Return what the interceptor needs to know about this SDK."""
        raise NotImplementedError

    def get_binding(self) -> SdkBinding:
        """Return the binding, built once."""
        if self._binding is None:
            self._binding = self.binding()
        return self._binding

    @property
    def installed(self) -> bool:
        """True between ``install`` and ``uninstall``."""
        return self._guard is not None

    @property
    def hooked(self) -> bool:
        """True while ``request`` is wrapped (by ``install`` or ``hook``)."""
        return bool(self._originals)

    @property
    def guard(self) -> Guard | None:
        """The guard calls are routed to while installed."""
        return self._guard

    def available(self) -> bool:
        """Return True when the SDK is importable in a supported version."""
        return all(requirement_met(r) for r in self.requires)

    def owns(self, client: object) -> bool:
        """Return True when ``client`` is a client of this SDK."""
        if not self.available():
            return False
        base = importlib.import_module(self.base_module)
        return isinstance(client, tuple(getattr(base, name) for name in _CLASSES))

    def install(self, guard: Guard) -> None:
        """Route every client's requests through ``guard``; again: swap the guard."""
        with self._lock:
            self._guard = guard
            if self._originals:
                logger.debug(
                    "allowance: adapter %r already installed; guard replaced", self.name
                )
                return
            self._hook()

    def hook(self) -> None:
        """Wrap ``request`` for routed calls only, if not installed already.

        Calls pass through untouched unless a framework adapter routes them to
        its guard (``seen_by(guard=...)``). ``uninstall`` unhooks.
        """
        if self._originals:
            return
        with self._lock:
            if not self._originals:
                self._hook()

    def _hook(self) -> None:
        """Wrap both ``request`` methods (the caller holds the lock)."""
        binding = self.get_binding()
        base = importlib.import_module(self.base_module)

        def guard_for(_: object) -> Guard | None:
            return self._guard

        interceptors = (
            make_sync_interceptor(binding, guard_for),
            make_async_interceptor(binding, guard_for),
        )
        for name, interceptor in zip(_CLASSES, interceptors, strict=True):
            cls = getattr(base, name)
            self._originals[name] = cls.__dict__["request"]
            wrapt.wrap_function_wrapper(cls, "request", interceptor)
        hook_retries(base)

    def uninstall(self) -> None:
        """Restore the original ``request`` functions; a no-op when not installed."""
        with self._lock:
            if not self._originals:
                return
            base = importlib.import_module(self.base_module)
            for name, original in self._originals.items():
                getattr(base, name).request = original
            self._originals.clear()
            self._guard = None

    # -- one client -------------------------------------------------------------------

    def wrap_client(self, client: Any, guard: Guard) -> None:
        """Route one client's requests (and its copies) through ``guard``."""
        self.unwrap_client(client)
        binding = self.get_binding()
        base = importlib.import_module(self.base_module)
        hook_retries(base)
        inner = client.request
        inner_copy = client.copy

        def guard_for(_: object) -> Guard:
            return guard

        if isinstance(client, base.AsyncAPIClient):
            async_interceptor = make_async_interceptor(binding, guard_for)

            async def arequest(*args: Any, **kwargs: Any) -> Any:
                return await async_interceptor(inner, client, args, kwargs)

            client.__dict__["request"] = arequest
        else:
            sync_interceptor = make_sync_interceptor(binding, guard_for)

            def request(*args: Any, **kwargs: Any) -> Any:
                return sync_interceptor(inner, client, args, kwargs)

            client.__dict__["request"] = request

        def copy(*args: Any, **kwargs: Any) -> Any:
            new = inner_copy(*args, **kwargs)
            self.wrap_client(new, guard)
            new.__dict__["allowance"] = client.__dict__.get("allowance")
            return new

        client.__dict__["copy"] = copy
        client.__dict__["with_options"] = copy

    def unwrap_client(self, client: Any) -> None:
        """Undo ``wrap_client``; a no-op for a client that was not wrapped."""
        for attr in _INSTANCE_ATTRS:
            client.__dict__.pop(attr, None)
