"""The one choke point both SDKs share: ``APIClient.request``.

Every resource method of the openai (2.x, 3.x) and anthropic (0.73+, 2.x) SDKs
ends in ``client.request(cast_to, options, *, stream=False, stream_cls=None)``,
inside the SDK's retry loop. Wrapping it (per instance for ``wrap``, per class
for ``patch``) sees every generation path once: ``create``, ``parse``,
``.stream()`` helpers, ``with_raw_response``, ``with_options``, beta resources.

One call, one charge: the first layer that sees a call claims it in a context
variable; layers beneath pass it through. A framework adapter may route the
calls it sees to its own guard, or say it charges them itself
(``allowance.seen_by(name, guard=..., charged=...)``).
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import json
import logging
import os
import sys
import weakref
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Final, TypeVar

import wrapt

from allowance._errors import BudgetExceeded
from allowance._estimate import make_estimate, make_usage
from allowance._failure import provider_did_no_work
from allowance._ledger._write_behind import HOLDING
from allowance._scope import current_adapters, current_route
from allowance._sdk._express import Lane, admit, settle

if TYPE_CHECKING:
    from allowance._guard import Guard
    from allowance._ticket import Ticket
    from allowance.typing import Estimate, ProviderCodec, StreamAccumulator, Usage

__all__ = [
    "NO_CAP",
    "CappedAccumulator",
    "SdkBinding",
    "claimed",
    "make_async_interceptor",
    "make_sync_interceptor",
]

logger = logging.getLogger("allowance")

# Inside a call being sent: what holds its reservation (the express lane's
# ``Lane``, or a ``Ticket``), read by the retry hook; None outside.
_claimed: contextvars.ContextVar[object] = contextvars.ContextVar(
    "allowance_claimed", default=None
)


def claimed() -> bool:
    """Return True inside a call that an outer layer already charges."""
    return _claimed.get() is not None


def _maybe_billed(kwargs: Mapping[str, Any]) -> bool:
    """True in ``_sleep_for_retry`` after an attempt the provider may have billed.

    The SDKs call it inside the ``except`` that caught the attempt's error,
    with no response: a timeout (openai: httpx's ``TimeoutException``;
    anthropic: ``APITimeoutError`` from it), or any other error once the
    request may have been sent (a connection dropped mid-answer: httpx's
    ``RemoteProtocolError``, ``ReadError``). The rule a call's last attempt
    follows: only an error that shows the provider did no work (a
    connection never made) is free. A retry after an HTTP error status
    passes its ``response``: answered, not billed.
    """
    if kwargs.get("response") is not None:
        return False
    err = sys.exc_info()[1]
    return err is not None and not provider_did_no_work(err)


def _retried(current: object) -> tuple[Guard, Estimate, tuple[str, ...]] | None:
    """The guard, estimate and adapters of the call being sent, if guarded."""
    from allowance._ticket import Ticket  # noqa: PLC0415 - a cycle

    if type(current) is Lane:
        estimate = make_estimate(
            current.provider, current.model, current.bound, current.cap
        )
        return current.guard, estimate, current.adapters
    if type(current) is Ticket:
        return current._guard, current.estimate, current.adapters  # noqa: SLF001
    return None


def _refused(ticket: Ticket) -> BudgetExceeded:
    return BudgetExceeded(ticket.violations, model=ticket.model)


def retry_sync(
    wrapped: Callable[..., Any], _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Wrap ``SyncAPIClient._sleep_for_retry``: charge an attempt that may be billed.

    The SDK retries inside ``request``, the call the guard holds one worst
    case for. An attempt that timed out, or whose connection dropped once
    sent, may have been billed (``_maybe_billed``): it is charged
    its worst case as a call of its own (``error``), held and kept before the
    retry is sent, so the call's reservation covers the retry. A budget that
    cannot hold it raises ``BudgetExceeded`` instead of retrying (whatever
    ``on_limit`` says: the SDK has no response to stop with); the call's
    reservation is then kept for the attempt that failed.
    """
    retried = _retried(_claimed.get())
    if retried is not None and _maybe_billed(kwargs):
        guard, estimate, adapters = retried
        ticket = guard.begin(estimate, adapters=adapters)
        if ticket.stopped:
            raise _refused(ticket)
        ticket.keep(outcome="error")
    return wrapped(*args, **kwargs)


async def retry_async(
    wrapped: Callable[..., Awaitable[Any]],
    _: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Async twin of ``retry_sync`` (``AsyncAPIClient._sleep_for_retry``)."""
    retried = _retried(_claimed.get())
    if retried is not None and _maybe_billed(kwargs):
        guard, estimate, adapters = retried
        ticket = await guard.abegin(estimate, adapters=adapters)
        if ticket.stopped:
            raise _refused(ticket)
        await ticket.akeep(outcome="error")
    return await wrapped(*args, **kwargs)


@dataclass(frozen=True, slots=True)
class SdkBinding:
    """What the interceptor needs to know about one SDK."""

    name: str
    codec: ProviderCodec
    stream_types: tuple[type[Any], ...]
    async_stream_types: tuple[type[Any], ...]
    raw_types: tuple[type[Any], ...]  # LegacyAPIResponse: body read, .parse() cached
    # APIResponse (with_streaming_response): body unread
    lazy_types: tuple[type[Any], ...]
    async_lazy_types: tuple[type[Any], ...]
    provider_of: Callable[[Any], str]
    wants_stream_usage: Callable[[str], bool]
    # True when the client's URL for a path names the model (Azure's
    # ``azure_deployment=``): the request cannot be sent to another model.
    fixed_model: Callable[[Any, str], bool] = lambda _client, _path: False
    # The price factor of a call reserved at a dearer tier's (the ticket's), by
    # the tier its response (or stream accumulator) says served it.
    served_factor: Callable[[Any, int], int] = lambda _served, asked: asked
    # ``(model, input bound, output cap)`` of the commonest body of a path, as
    # ``codec.estimate`` has it, or None: the express lane's estimate.
    plain: Callable[[str, Mapping[str, Any]], tuple[str, int, int] | None] | None = None
    # Derived, per binding: what ``_track_*`` tests results against, what the
    # express lane hands on (streams, raw responses), and the request URLs
    # seen, each mapped to its path if billable, else None.
    response_types: tuple[type[Any], ...] = field(init=False, repr=False)
    async_response_types: tuple[type[Any], ...] = field(init=False, repr=False)
    unparsed_types: tuple[type[Any], ...] = field(init=False, repr=False)
    async_unparsed_types: tuple[type[Any], ...] = field(init=False, repr=False)
    only_name: tuple[str] = field(init=False, repr=False)
    paths: dict[str, str | None] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        """Join the raw and lazy response types once."""
        object.__setattr__(self, "response_types", self.raw_types + self.lazy_types)
        object.__setattr__(
            self, "async_response_types", self.raw_types + self.async_lazy_types
        )
        object.__setattr__(
            self, "unparsed_types", self.stream_types + self.response_types
        )
        object.__setattr__(
            self,
            "async_unparsed_types",
            self.async_stream_types + self.async_response_types,
        )
        object.__setattr__(self, "only_name", (self.name,))

    def billable_path(self, url: str) -> str | None:
        """Return the path of ``url`` (no query) if the codec charges it, else None."""
        path = url.split("?", 1)[0]
        billable = path if self.codec.is_billable(path) else None
        paths = self.paths
        if len(paths) >= _PATHS_KEPT:  # ids in paths (``/responses/{id}``)
            paths.clear()
        paths[url] = billable
        return billable


_PATHS_KEPT: Final = 256
_E = TypeVar("_E", Iterator[Any], AsyncIterator[Any])


class _Process:
    """This process, renewed in a forked child: what a stream was opened in."""


_process = _Process()


def _new_process() -> None:
    # A forked child inherits its parent's streams (and their finalizers, which
    # its exit runs): they are the parent's to settle, never the child's.
    global _process  # noqa: PLW0603 - renewed in a forked child
    _process = _Process()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows
    os.register_at_fork(after_in_child=_new_process)


@dataclass(slots=True)
class _Call:
    """One intercepted request, from admission to the returned object."""

    binding: SdkBinding
    client: Any
    path: str
    body: Mapping[str, Any]
    cast_to: Any
    options: Any
    stream: bool
    stream_cls: Any
    estimate: Estimate
    hide_usage_only: bool = False

    def reestimate(self, model: str) -> Estimate | None:
        """The worst case of the same request on another model (to degrade).

        None when the client's URL names the model: the model answering is
        the URL's, whatever the body says, so the call cannot degrade.
        """
        if self.binding.fixed_model(self.client, self.path):
            return None
        codec = self.binding.codec
        est = codec.estimate(self.path, codec.with_model(self.body, model))
        return replace(est, provider=self.estimate.provider)

    def refine(self) -> Estimate | None:
        """The worst case with the input counted exactly, if the codec can."""
        return self.binding.codec.refine(self.path, self.body, self.estimate)


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, bool, Any]:
    cast_to = args[0] if args else kwargs["cast_to"]
    options = args[1] if len(args) > 1 else kwargs["options"]
    stream = bool(kwargs.get("stream", args[2] if len(args) > 2 else False))  # noqa: PLR2004
    stream_cls = kwargs.get("stream_cls", args[3] if len(args) > 3 else None)  # noqa: PLR2004
    return cast_to, options, stream, stream_cls


def _prepare(
    binding: SdkBinding, client: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Call | None:
    """Return the call to guard, or None to pass it through untouched."""
    if len(args) == 2:  # noqa: PLR2004 - how the SDKs call it
        cast_to, options = args
        stream = bool(kwargs.get("stream", False))
        stream_cls = kwargs.get("stream_cls")
    else:
        cast_to, options, stream, stream_cls = _bind(args, kwargs)
    body = getattr(options, "json_data", None)
    if type(body) is not dict and not isinstance(body, Mapping):
        return None
    url = getattr(options, "url", "")
    if type(url) is not str:
        url = str(url)
    try:
        path = binding.paths[url]
    except KeyError:
        path = binding.billable_path(url)
    if path is None:
        return None
    estimate = binding.codec.estimate(path, body)
    provider = binding.provider_of(client)
    if provider != estimate.provider:  # Azure: the OpenAI codec says "openai"
        estimate = (
            replace(estimate, provider=provider)
            if estimate.exact_input
            else make_estimate(
                provider, estimate.model, estimate.input_tokens, estimate.output_tokens
            )
        )
    return _Call(
        binding, client, path, body, cast_to, options, stream, stream_cls, estimate
    )


def _outgoing_options(call: _Call, ticket: Ticket) -> Any:
    """Return the request options to send: the fallback model, stream usage on."""
    codec = call.binding.codec
    body: Mapping[str, Any] = call.body
    if ticket.model != call.estimate.model:
        body = codec.with_model(body, ticket.model)
    if call.stream and call.binding.wants_stream_usage(call.path):
        stream_options = body.get("stream_options")
        asked = isinstance(stream_options, Mapping) and stream_options.get(
            "include_usage"
        )
        if not asked:
            merged = dict(stream_options) if isinstance(stream_options, Mapping) else {}
            merged["include_usage"] = True
            body = {**body, "stream_options": merged}
            call.hide_usage_only = True
    if body is call.body:
        return call.options
    options = call.options.model_copy()
    options.json_data = body
    return options


def _synthetic(call: _Call, ticket: Ticket) -> tuple[Any, dict[str, Any]]:
    """Build the marked, empty response for ``on_limit="stop"`` as the SDK would."""
    codec = call.binding.codec
    reason = "; ".join(v.describe() for v in ticket.violations) or "budget exceeded"
    httpx = _httpx_of(call.client)
    if call.stream:
        content = codec.synthetic_sse(
            call.path, call.body, reason=reason, call_id=ticket.call_id
        )
        content_type = "text/event-stream"
    else:
        content = json.dumps(
            codec.synthetic_body(
                call.path, call.body, reason=reason, call_id=ticket.call_id
            )
        ).encode()
        content_type = "application/json"
    raw_headers = getattr(call.options, "headers", None)
    headers = (
        {k: v for k, v in raw_headers.items() if isinstance(v, str)}
        if isinstance(raw_headers, Mapping)
        else {}
    )
    # httpx shows a host-only base URL without its trailing slash.
    url = f"{str(call.client.base_url).rstrip('/')}/{call.path.lstrip('/')}"
    request = httpx.Request("POST", url, headers=headers)
    response = httpx.Response(
        200,
        headers={"content-type": content_type, "x-allowance-stopped": "true"},
        content=content,
        request=request,
    )
    return call.client._process_response, {  # noqa: SLF001
        "cast_to": call.cast_to,
        "options": call.options,
        "response": response,
        "stream": call.stream,
        "stream_cls": call.stream_cls,
    }


def _httpx_of(client: Any) -> Any:
    """Return the client's httpx module (``httpx``, or ``httpx2`` in newer SDKs)."""
    for cls in type(client._client).__mro__:  # noqa: SLF001
        top = cls.__module__.split(".", 1)[0]
        if top.startswith("httpx"):
            return importlib.import_module(top)
    # Unreachable: every SDK client's HTTP client comes from an httpx module.
    return importlib.import_module("httpx")  # pragma: no cover


def _failed_sync(ticket: Ticket, err: BaseException) -> None:
    """Settle a call the SDK raised on: free if the provider did no work.

    An error status, or a connection never made: released. A timeout, a
    connection dropped once the request was sent, anything else: the
    provider may have billed, the worst case is kept (``error``).
    """
    if provider_did_no_work(err):
        ticket.release()
    else:
        ticket.keep(outcome="error")


async def _failed_async(ticket: Ticket, err: BaseException) -> None:
    """Async twin of ``_failed_sync``."""
    if provider_did_no_work(err):
        await ticket.arelease()
    else:
        await ticket.akeep(outcome="error")


def _express_sync(
    binding: SdkBinding,
    wrapped: Callable[..., Any],
    client: Any,
    lane: Lane,
    kwargs: dict[str, Any],
) -> Any:
    """Send a call the express lane admitted, and settle it."""
    token = _claimed.set(lane)
    try:
        result = wrapped(*lane.args, **kwargs)
    except BaseException as err:
        _failed_sync(lane.ticket(), err)
        raise
    finally:
        _claimed.reset(token)
    if settle(lane, binding, result, binding.unparsed_types) or (
        isinstance(result, binding.response_types)
        and _body_read(result)
        and settle(lane, binding, _parse_quietly(result), binding.unparsed_types)
    ):
        return result
    ticket = lane.ticket()
    return _track_sync(
        _handed_on(binding, client, ticket, lane.path, lane.args, kwargs),
        ticket,
        result,
    )


async def _express_async(
    binding: SdkBinding,
    wrapped: Callable[..., Awaitable[Any]],
    client: Any,
    lane: Lane,
    kwargs: dict[str, Any],
) -> Any:
    """Async twin of ``_express_sync``.

    The lane runs on ledgers whose ``hold`` and ``settle`` never wait (the
    memory ledger, the write-behind ledger's slices): it settles in place.
    """
    token = _claimed.set(lane)
    try:
        result = await wrapped(*lane.args, **kwargs)
    except BaseException as err:
        await _failed_async(lane.ticket(), err)
        raise
    finally:
        _claimed.reset(token)
    if settle(lane, binding, result, binding.async_unparsed_types) or (
        isinstance(result, binding.async_response_types)
        and _body_read(result)
        and settle(
            lane, binding, await _aparse_quietly(result), binding.async_unparsed_types
        )
    ):
        return result
    ticket = lane.ticket()
    call = _handed_on(binding, client, ticket, lane.path, lane.args, kwargs)
    return await _track_async(call, ticket, result)


def _handed_on(  # noqa: PLR0917 - the express lane's call, rebuilt
    binding: SdkBinding,
    client: Any,
    ticket: Ticket,
    path: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> _Call:
    """The ``_Call`` ``_prepare`` would have built for an express lane's call."""
    options = args[1]
    return _Call(
        binding,
        client,
        path,
        options.json_data,
        args[0],
        options,
        False,  # noqa: FBT003 - the express lane takes no streams
        kwargs.get("stream_cls"),
        ticket.estimate,
    )


def make_sync_interceptor(  # noqa: C901 - one way out per case, on purpose
    binding: SdkBinding, guard_for: Callable[[Any], Guard | None]
) -> Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]:
    """Return a wrapt-style wrapper for a sync ``request`` method."""
    name = binding.name
    only_name = binding.only_name

    def intercept(  # noqa: C901, PLR0911, PLR0912 - one way out per case
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if _claimed.get():  # None, or an object (always true)
            return wrapped(*args, **kwargs)
        route = current_route()
        if route is None:
            guard = guard_for(instance)
        elif route[1]:  # a framework adapter charges this call itself
            return wrapped(*args, **kwargs)
        else:
            guard = route[0]
        if guard is None:
            return wrapped(*args, **kwargs)
        ledger = guard._ledger  # noqa: SLF001 - the express lane's ledgers
        if type(ledger) in HOLDING:  # a ``Holding``: the lane's ``hold``/``settle``
            lane = admit(binding, guard, ledger, instance, args, kwargs)  # type: ignore[arg-type]
            if lane is not None:
                return _express_sync(binding, wrapped, instance, lane, kwargs)
        call = _prepare(binding, instance, args, kwargs)
        if call is None:
            return wrapped(*args, **kwargs)
        adapters = current_adapters()
        ticket = guard.begin(
            call.estimate,
            adapters=(*adapters, name) if adapters else only_name,
            reestimate=call.reestimate,
            refine=call.refine,
        )
        if ticket.stopped:
            process, params = _synthetic(call, ticket)
            return process(**params)
        if call.stream or ticket.model != call.estimate.model:
            options = _outgoing_options(call, ticket)
        else:
            options = call.options
        token = _claimed.set(ticket)
        try:
            result = wrapped(
                call.cast_to, options, stream=call.stream, stream_cls=call.stream_cls
            )
        except BaseException as err:
            _failed_sync(ticket, err)
            raise
        finally:
            _claimed.reset(token)
        return _track_sync(call, ticket, result)

    return intercept


def make_async_interceptor(  # noqa: C901 - one way out per case, on purpose
    binding: SdkBinding, guard_for: Callable[[Any], Guard | None]
) -> Callable[
    [Callable[..., Awaitable[Any]], Any, tuple[Any, ...], dict[str, Any]],
    Awaitable[Any],
]:
    """Return a wrapt-style wrapper for an async ``request`` method."""
    name = binding.name
    only_name = binding.only_name

    async def intercept(  # noqa: C901, PLR0911, PLR0912 - one way out per case
        wrapped: Callable[..., Awaitable[Any]],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if _claimed.get():  # None, or an object (always true)
            return await wrapped(*args, **kwargs)
        route = current_route()
        if route is None:
            guard = guard_for(instance)
        elif route[1]:  # a framework adapter charges this call itself
            return await wrapped(*args, **kwargs)
        else:
            guard = route[0]
        if guard is None:
            return await wrapped(*args, **kwargs)
        ledger = guard._ledger  # noqa: SLF001 - the express lane's ledgers
        if type(ledger) in HOLDING:  # a ``Holding``: the lane's ``hold``/``settle``
            lane = admit(binding, guard, ledger, instance, args, kwargs)  # type: ignore[arg-type]
            if lane is not None:
                return await _express_async(binding, wrapped, instance, lane, kwargs)
        call = _prepare(binding, instance, args, kwargs)
        if call is None:
            return await wrapped(*args, **kwargs)
        adapters = current_adapters()
        ticket = await guard.abegin(
            call.estimate,
            adapters=(*adapters, name) if adapters else only_name,
            reestimate=call.reestimate,
            refine=call.refine,
        )
        if ticket.stopped:
            process, params = _synthetic(call, ticket)
            return await process(**params)
        if call.stream or ticket.model != call.estimate.model:
            options = _outgoing_options(call, ticket)
        else:
            options = call.options
        token = _claimed.set(ticket)
        try:
            result = await wrapped(
                call.cast_to, options, stream=call.stream, stream_cls=call.stream_cls
            )
        except BaseException as err:
            await _failed_async(ticket, err)
            raise
        finally:
            _claimed.reset(token)
        return await _track_async(call, ticket, result)

    return intercept


# -- results -------------------------------------------------------------------------


def _served(call: _Call, ticket: Ticket, served: Any) -> None:
    """Price a call reserved at a dearer tier as the tier that served it."""
    ticket.price_factor = call.binding.served_factor(served, ticket.price_factor)


def _commit_sync(call: _Call, ticket: Ticket, parsed: Any) -> None:
    if ticket.price_factor != 1:
        _served(call, ticket, parsed)
    codec = call.binding.codec
    usage = codec.usage(call.path, parsed)
    if usage is None:
        ticket.keep()
    else:
        ticket.commit(usage, response_model=codec.response_model(parsed))


async def _commit_async(call: _Call, ticket: Ticket, parsed: Any) -> None:
    if ticket.price_factor != 1:
        _served(call, ticket, parsed)
    codec = call.binding.codec
    usage = codec.usage(call.path, parsed)
    if usage is None:
        await ticket.akeep()
    else:
        await ticket.acommit(usage, response_model=codec.response_model(parsed))


def _body_read(response: Any) -> bool:
    http = getattr(response, "http_response", None)
    return bool(getattr(http, "is_closed", False))


def _body(response: Any) -> Any:
    """The body httpx keeps once it was read whole (``read()``, ``text()``), or None."""
    return getattr(getattr(response, "http_response", None), "_content", None)


def _track_sync(call: _Call, ticket: Ticket, result: Any) -> Any:
    binding = call.binding
    if isinstance(result, binding.stream_types):
        return _SyncStream(result, _StreamTracker(call, ticket))
    if isinstance(result, binding.response_types):
        if call.stream:
            return _RawStreamResponse(result, _StreamTracker(call, ticket))
        if _body_read(result):
            _commit_sync(call, ticket, _parse_quietly(result, ticket))
            return result
        return _LazyResponse(result, call, ticket)
    # The parsed response: _commit_sync inline.
    if ticket.price_factor != 1:
        _served(call, ticket, result)
    codec = binding.codec
    usage = codec.usage(call.path, result)
    if usage is None:
        ticket.keep()
    else:
        ticket.commit(usage, response_model=codec.response_model(result))
    return result


async def _track_async(call: _Call, ticket: Ticket, result: Any) -> Any:
    binding = call.binding
    if isinstance(result, binding.async_stream_types):
        return _AsyncStream(result, _StreamTracker(call, ticket))
    if isinstance(result, binding.async_response_types):
        if call.stream:
            return _RawStreamResponse(result, _StreamTracker(call, ticket))
        if _body_read(result):
            await _commit_async(call, ticket, await _aparse_quietly(result, ticket))
            return result
        return _AsyncLazyResponse(result, call, ticket)
    await _commit_async(call, ticket, result)
    return result


def _parse_quietly(raw: Any, ticket: Ticket | None = None) -> Any:
    """Parse a response whose body is read, or return None if it does not parse.

    The SDK caches ``parse()``, so the caller's own is free. ``with_raw_response``
    returns such a response (LangChain's chat models ask for it): the express
    lane settles it too. A body that does not parse is logged against
    ``ticket``'s call, which is charged in full; the lane passes no ticket, as
    it then hands the call on and the general path parses (and logs) again.
    """
    try:
        return raw.parse()
    except Exception:  # noqa: BLE001 - a body we cannot read is charged in full
        _unreadable(ticket)
        return None


async def _aparse_quietly(raw: Any, ticket: Ticket | None = None) -> Any:
    """Async twin of ``_parse_quietly``: an async response's ``parse()`` is awaited.

    Inside the ``try``: a body that does not parse must not fail the call.
    """
    try:
        parsed = raw.parse()
        return await parsed if inspect.isawaitable(parsed) else parsed
    except Exception:  # noqa: BLE001 - a body we cannot read is charged in full
        _unreadable(ticket)
        return None


def _unreadable(ticket: Ticket | None) -> None:
    if ticket is not None:
        logger.warning(
            "allowance: could not read usage of call %s; charged in full",
            ticket.call_id,
        )


# -- streams -------------------------------------------------------------------------


class CappedAccumulator:
    """Base of this package's accumulators: they stop counting text at ``enough``.

    The stream tracker sets ``enough`` to the call's output cap: it charges a
    stream cut short at most that, so bytes past it change nothing. Until
    then, ``NO_CAP``.
    """

    __slots__ = ("enough",)

    enough: int


NO_CAP: Final = sys.maxsize


class _StreamTracker:
    """Settles a streamed call: usage when it ends, what was produced if cut short.

    Only in the process that opened it: a forked child that inherited the
    stream (and exits, running its finalizers, or closes it) leaves it to
    the parent, which reads on and settles it once.
    """

    __slots__ = ("__weakref__", "acc", "call", "process", "read", "tail", "ticket")

    def __init__(self, call: _Call, ticket: Ticket) -> None:
        self.call = call
        self.ticket = ticket
        self.process = _process
        self.read = False  # a raw response's stream was handed out
        self.tail: _Tail | None = None  # a raw response's lines, read by the caller
        self.acc: StreamAccumulator = call.binding.codec.stream_accumulator(
            call.path, hide_usage_only=call.hide_usage_only
        )
        if isinstance(self.acc, CappedAccumulator):
            self.acc.enough = ticket.estimate.output_tokens

    def _final(self) -> tuple[Usage | None, str | None]:
        if self.ticket.price_factor != 1:
            _served(self.call, self.ticket, self.acc)
        return self.acc.usage(), self.acc.response_model()

    def _partial(self) -> Usage:
        if self.ticket.price_factor != 1:
            _served(self.call, self.ticket, self.acc)
        est = self.ticket.estimate
        known = self.acc.usage()
        try:
            produced = min(est.output_tokens, self.acc.produced_text_bytes())
        except Exception:  # noqa: BLE001 - events we cannot read: the whole cap
            logger.warning(
                "allowance: could not count the output of stream %s; charged its cap",
                self.ticket.call_id,
            )
            produced = est.output_tokens
        if known is None:
            return make_usage(est.input_tokens, produced)
        return replace(known, output_tokens=max(known.output_tokens, produced))

    def _done(self) -> bool:
        """Settled, or not this process's to settle (a forked child's copy)."""
        return self.ticket.settled or self.process is not _process

    def finish(self) -> None:
        if self._done():
            return
        usage, model = self._final()
        if usage is None:
            self.ticket.keep()
        elif getattr(self.acc, "ended", True):
            self.ticket.commit(usage, response_model=model)
        else:  # closed before its final usage: what it produced so far
            self.abandon()

    async def afinish(self) -> None:
        if self._done():
            return
        usage, model = self._final()
        if usage is None:
            await self.ticket.akeep()
        elif getattr(self.acc, "ended", True):
            await self.ticket.acommit(usage, response_model=model)
        else:  # closed before its final usage: what it produced so far
            await self.aabandon()

    def abandon(self) -> None:
        if not self._done():
            self.ticket.commit_partial(
                self._partial(), response_model=self.acc.response_model()
            )

    async def aabandon(self) -> None:
        if not self._done():
            await self.ticket.acommit_partial(
                self._partial(), response_model=self.acc.response_model()
            )

    def _observe_tail(self) -> bool:
        """Observe the events a raw read kept: True if it read a whole stream."""
        tail = self.tail
        if tail is None or not tail.ended:
            return False
        observe = self.acc.observe
        try:
            for event in tail.events():
                if (
                    getattr(event, "error", None)
                    or getattr(event, "type", "") == "error"
                ):
                    return False  # the stream failed (its SDK raises there)
                observe(event)
        except Exception:  # noqa: BLE001 - events we cannot read: charged in full
            _unreadable(self.ticket)
            return False
        return True

    def close_raw(self) -> None:
        """Settle when a raw response closes: a stream parsed is partial.

        Unparsed, it is charged the usage in its last events if the caller
        read it whole (lines, bytes, text, the body), else in full.
        """
        if self.read:
            self.abandon()
        elif not self._done():
            if self._observe_tail():
                self.finish()
            else:
                self.ticket.keep()

    async def aclose_raw(self) -> None:
        if self.read:
            await self.aabandon()
        elif not self._done():
            if self._observe_tail():
                await self.afinish()
            else:
                await self.ticket.akeep()


_DATA: Final = ("data:", b"data:")
_TAIL_LINES: Final = 3  # chat: usage, [DONE]; messages: delta, stop, a ping


class _Tail:
    """The ``data:`` lines of a raw stream the caller reads: its first, its last few.

    Enough for its usage (OpenAI's last chunks or ``response.completed``,
    Anthropic's ``message_start`` and ``message_delta``) without keeping the
    stream; read only if the stream was read to its end (``ended``).
    """

    __slots__ = ("ended", "first", "last", "parts")

    def __init__(self) -> None:
        self.first: Any = None
        self.last: deque[Any] = deque(maxlen=_TAIL_LINES)
        self.parts: list[Any] = []  # the line being read, in pieces
        self.ended = False

    def line(self, line: Any) -> None:
        if line.startswith(_DATA[type(line) is bytes]):
            if self.first is None:
                self.first = line
            else:
                self.last.append(line)

    def chunk(self, chunk: Any) -> None:
        newline = b"\n" if type(chunk) is bytes else "\n"
        if newline not in chunk:
            self.parts.append(chunk)
            return
        lines = chunk.split(newline)
        self.parts.append(lines[0])
        lines[0] = chunk[:0].join(self.parts)
        self.parts = [lines.pop()]
        for line in lines:
            self.line(line)

    def end(self) -> None:
        if self.parts:
            self.line(self.parts[0][:0].join(self.parts))
        self.ended = True

    def events(self) -> Iterator[Any]:
        """The events of the lines kept, as objects."""
        for line in (self.first, *self.last):
            if line is not None:
                try:
                    yield json.loads(line[5:], object_hook=_attributes)
                except ValueError:  # [DONE], or not JSON
                    continue


def _attributes(fields: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**fields)


def _recorded(chunks: Iterable[Any], tail: _Tail, feed: Callable[[Any], None]) -> Any:
    """A raw stream's lines or chunks as the caller reads them, kept in ``tail``."""
    for chunk in chunks:
        feed(chunk)
        yield chunk
    tail.end()


async def _arecorded(
    chunks: AsyncIterable[Any], tail: _Tail, feed: Callable[[Any], None]
) -> Any:
    """Async twin of ``_recorded``."""
    async for chunk in chunks:
        feed(chunk)
        yield chunk
    tail.end()


def _observed(events: Iterable[Any], tracker: _StreamTracker) -> Iterator[Any]:
    """The events the caller sees; the tracker settles when they end or stop.

    An accumulator may have its own copy of this loop (``track``) that reads
    each event inline; it must settle the same way.
    """
    observe = tracker.acc.observe
    try:
        for event in events:
            if observe(event):
                yield event
    except BaseException:  # cut short: an error, a break, a close
        tracker.abandon()
        raise
    tracker.finish()


async def _aobserved(
    events: AsyncIterable[Any], tracker: _StreamTracker
) -> AsyncIterator[Any]:
    """Async twin of ``_observed`` (an accumulator's own copy: ``atrack``)."""
    observe = tracker.acc.observe
    try:
        async for event in events:
            if observe(event):
                yield event
    except GeneratorExit:
        tracker.abandon()
        raise
    except BaseException:
        await tracker.aabandon()
        raise
    await tracker.afinish()


def _handed_out(
    finalizer: weakref.finalize[..., Any], events: _E, tracker: _StreamTracker
) -> _E:
    """Settle an abandoned stream when its events generator goes, not its proxy.

    ``for chunk in client.chat.completions.create(stream=True)`` keeps only
    the generator ``iter()`` returned: the proxy is gone at once, and its
    finalizer must not settle a stream still being read.
    """
    finalizer.detach()
    weakref.finalize(events, _abandon_quietly, tracker)
    return events


def _abandon_quietly(tracker: _StreamTracker) -> None:
    try:
        tracker.abandon()
    except Exception:  # pragma: no cover - runs at garbage collection
        logger.exception("allowance: could not settle an abandoned stream")


def _close_raw_quietly(tracker: _StreamTracker) -> None:
    if tracker.read:  # the stream settles itself when it is collected
        return
    try:
        tracker.close_raw()
    except Exception:  # pragma: no cover - runs at garbage collection
        logger.exception("allowance: could not settle an unread stream")


class _Absent:
    """Hide a special method ``wrapt.ObjectProxy`` defines but the proxied type lacks.

    A sync ``Stream`` has no ``__aenter__`` and an ``AsyncStream`` no ``__iter__``:
    ``hasattr`` and the ``with``/``for`` statements must see the same on the proxy.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        raise AttributeError(self._name)


class _TrackedResponse(wrapt.ObjectProxy[Any]):
    """A tracked stream's HTTP response: closing it settles the stream's ticket.

    openai's ``.stream()`` helpers close ``raw_stream.response`` directly, not
    the stream, when their ``with`` block exits.
    """

    def __init__(self, response: Any, tracker: _StreamTracker) -> None:
        super().__init__(response)
        self._self_tracker = tracker

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_tracker.abandon()

    async def aclose(self) -> None:
        try:
            await self.__wrapped__.aclose()
        finally:
            await self._self_tracker.aabandon()


class _SyncStream(wrapt.ObjectProxy[Any]):
    """A ``Stream`` that reports usage to its ticket; still a ``Stream``."""

    _self_events: Any
    __aenter__ = _Absent()
    __aexit__ = _Absent()

    def __init__(self, stream: Any, tracker: _StreamTracker) -> None:
        super().__init__(stream)
        self._self_tracker = tracker
        self._self_events = None
        self._self_response: Any = None
        self._self_finalizer = weakref.finalize(self, _abandon_quietly, tracker)

    @property
    def response(self) -> Any:
        if self._self_response is None:
            self._self_response = _TrackedResponse(
                self.__wrapped__.response, self._self_tracker
            )
        return self._self_response

    def _self_iterate(self) -> Any:
        tracker = self._self_tracker
        track = getattr(tracker.acc, "track", None)
        if track is not None:  # the accumulator's own loop: no call per event
            events = track(self.__wrapped__, tracker)
        else:
            events = _observed(self.__wrapped__, tracker)
        return _handed_out(self._self_finalizer, events, tracker)

    def __iter__(self) -> Any:
        # Return the one generator (as ``Stream`` iterates its one ``_iterator``):
        # a ``break`` must not close it, so the caller can read on later.
        if self._self_events is None:
            self._self_events = self._self_iterate()
        return self._self_events

    def __next__(self) -> Any:
        if self._self_events is None:
            self._self_events = self._self_iterate()
        return next(self._self_events)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_tracker.abandon()


class _AsyncStream(wrapt.ObjectProxy[Any]):
    """An ``AsyncStream`` that reports usage to its ticket; still an ``AsyncStream``."""

    _self_events: Any
    __enter__ = _Absent()
    __exit__ = _Absent()
    __iter__ = _Absent()

    def __init__(self, stream: Any, tracker: _StreamTracker) -> None:
        super().__init__(stream)
        self._self_tracker = tracker
        self._self_events = None
        self._self_response: Any = None
        self._self_finalizer = weakref.finalize(self, _abandon_quietly, tracker)

    @property
    def response(self) -> Any:
        if self._self_response is None:
            self._self_response = _TrackedResponse(
                self.__wrapped__.response, self._self_tracker
            )
        return self._self_response

    def _self_iterate(self) -> Any:
        tracker = self._self_tracker
        atrack = getattr(tracker.acc, "atrack", None)
        if atrack is not None:  # the accumulator's own loop: no call per event
            events = atrack(self.__wrapped__, tracker)
        else:
            events = _aobserved(self.__wrapped__, tracker)
        return _handed_out(self._self_finalizer, events, tracker)

    def __aiter__(self) -> Any:
        if self._self_events is None:
            self._self_events = self._self_iterate()
        return self._self_events

    async def __anext__(self) -> Any:
        if self._self_events is None:
            self._self_events = self._self_iterate()
        return await self._self_events.__anext__()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            await self._self_tracker.aabandon()


class _RawStreamResponse(wrapt.ObjectProxy[Any]):
    """A raw response of a stream whose ``parse()`` returns the tracked stream.

    Closed (``with_streaming_response`` closes it on exit) or collected before
    its stream was read, it is charged in full; after, as an abandoned stream.
    Read raw to its end instead (``iter_lines()``, ``iter_bytes()``,
    ``iter_text()``, ``read()``), it is charged the usage in its last events.
    """

    def __init__(self, raw: Any, tracker: _StreamTracker) -> None:
        super().__init__(raw)
        self._self_tracker = tracker
        self._self_stream: Any = None
        weakref.finalize(self, _close_raw_quietly, tracker)

    def close(self) -> Any:
        close = self.__wrapped__.close  # LegacyAPIResponse has none: AttributeError
        body = _body(self.__wrapped__)
        if body is not None and self._self_tracker.tail is None:  # read(), text()
            tail = self._self_tracker.tail = _Tail()
            tail.chunk(body)
            tail.end()
        try:
            closed = close()
        except BaseException:
            self._self_tracker.close_raw()
            raise
        if inspect.isawaitable(closed):
            return self._self_aclose(closed)
        self._self_tracker.close_raw()
        return closed

    async def _self_aclose(self, closed: Awaitable[Any]) -> None:
        try:
            await closed
        finally:
            await self._self_tracker.aclose_raw()

    def iter_lines(self) -> Any:
        tail = self._self_tracker.tail = _Tail()
        return self._self_record(self.__wrapped__.iter_lines(), tail, tail.line)

    def iter_bytes(self, *args: Any, **kwargs: Any) -> Any:
        tail = self._self_tracker.tail = _Tail()
        chunks = self.__wrapped__.iter_bytes(*args, **kwargs)
        return self._self_record(chunks, tail, tail.chunk)

    def iter_text(self, *args: Any, **kwargs: Any) -> Any:
        tail = self._self_tracker.tail = _Tail()
        chunks = self.__wrapped__.iter_text(*args, **kwargs)
        return self._self_record(chunks, tail, tail.chunk)

    @staticmethod
    def _self_record(chunks: Any, tail: _Tail, feed: Callable[[Any], None]) -> Any:
        if hasattr(chunks, "__aiter__"):
            return _arecorded(chunks, tail, feed)
        return _recorded(chunks, tail, feed)

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        parsed = self.__wrapped__.parse(*args, **kwargs)
        if inspect.isawaitable(parsed):
            return self._self_aparse(parsed)
        return self._self_track(parsed)

    async def _self_aparse(self, parsed: Awaitable[Any]) -> Any:
        return self._self_track(await parsed)

    def _self_track(self, parsed: Any) -> Any:
        tracker = self._self_tracker
        binding = tracker.call.binding
        if isinstance(parsed, binding.stream_types):
            if self._self_stream is None:
                self._self_stream = _SyncStream(parsed, tracker)
                tracker.read = True
            return self._self_stream
        if isinstance(parsed, binding.async_stream_types):
            if self._self_stream is None:
                self._self_stream = _AsyncStream(parsed, tracker)
                tracker.read = True
            return self._self_stream
        return parsed


class _LazyResponse(wrapt.ObjectProxy[Any]):
    """``with_streaming_response``: usage read on ``parse()``, or on close if read.

    Closed with its body read whole (``json()``, ``text()``, ``read()``), the
    body is parsed for its usage; unread, or read in chunks, charged in full.
    """

    def __init__(self, response: Any, call: _Call, ticket: Ticket) -> None:
        super().__init__(response)
        self._self_call = call
        self._self_ticket = ticket

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        parsed = self.__wrapped__.parse(*args, **kwargs)
        call, ticket = self._self_call, self._self_ticket
        if isinstance(parsed, call.binding.stream_types):
            return _SyncStream(parsed, _StreamTracker(call, ticket))
        if not ticket.settled:
            _commit_sync(call, ticket, parsed)
        return parsed

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            ticket = self._self_ticket
            if not ticket.settled:
                if _body(self.__wrapped__) is None:  # unread, or read in chunks
                    ticket.keep()
                else:  # read whole: json(), text(), read()
                    parsed = _parse_quietly(self.__wrapped__, ticket)
                    _commit_sync(self._self_call, ticket, parsed)


class _AsyncLazyResponse(wrapt.ObjectProxy[Any]):
    """Async twin of ``_LazyResponse``."""

    def __init__(self, response: Any, call: _Call, ticket: Ticket) -> None:
        super().__init__(response)
        self._self_call = call
        self._self_ticket = ticket

    async def parse(self, *args: Any, **kwargs: Any) -> Any:
        parsed = await self.__wrapped__.parse(*args, **kwargs)
        call, ticket = self._self_call, self._self_ticket
        if isinstance(parsed, call.binding.async_stream_types):
            return _AsyncStream(parsed, _StreamTracker(call, ticket))
        if not ticket.settled:
            await _commit_async(call, ticket, parsed)
        return parsed

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            ticket = self._self_ticket
            if not ticket.settled:
                if _body(self.__wrapped__) is None:  # unread, or read in chunks
                    await ticket.akeep()
                else:  # read whole: json(), text(), read()
                    parsed = await _aparse_quietly(self.__wrapped__, ticket)
                    await _commit_async(self._self_call, ticket, parsed)
