"""Whether a call that raised may have been billed: one rule for every layer."""

from __future__ import annotations

__all__ = ["provider_did_no_work"]

_CLIENT_ERROR = 400
_LAST_STATUS = 599
# Names of errors that end a call before a connection carried the request:
# httpx's (httpx2's), requests', aiohttp's; a timeout while connecting or
# waiting for a pooled connection is one, a timeout reading the answer is not.
_NOT_CONNECTED = frozenset(
    {
        "ConnectError",
        "ConnectTimeout",
        "PoolTimeout",
        "ConnectionRefusedError",
        "ClientConnectorError",
        "ConnectionTimeoutError",
        "InvalidURL",
        "UnsupportedProtocol",
    }
)


def provider_did_no_work(err: BaseException) -> bool:
    """Return True when ``err`` shows the provider did no billable work.

    True for an answer with an HTTP error status (an exception, or one in its
    ``__cause__``/``__context__`` chain, with a ``status_code``, or a
    ``response.status_code``, of 400-599: the SDKs' status errors, httpx's
    and requests' ``HTTPStatusError``/``HTTPError``), and for a connection
    that was never made (``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``,
    ``ConnectionRefusedError``). False
    for anything else: a timeout, a connection dropped mid-answer, an error
    the adapter cannot read. Then the provider may have billed, and the
    ticket keeps its worst case (``ticket.keep(outcome="error")``). The rule
    the SDK layer applies to its own calls.

    Example:
        >>> provider_did_no_work(TimeoutError("read timed out"))
        False
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = getattr(current, "status_code", None)
        if status is None:
            status = getattr(getattr(current, "response", None), "status_code", None)
        if type(status) is int and _CLIENT_ERROR <= status <= _LAST_STATUS:
            return True
        if any(kind.__name__ in _NOT_CONNECTED for kind in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False
