"""The express lane: the commonest SDK call, admitted and charged in one pass.

Most calls have one shape: a non-streaming chat (OpenAI Chat Completions,
Anthropic Messages) with a plain body, through a guard on a ledger that
holds in memory (the memory ledger, the write-behind SQLite ledger), with
no plugin observing a call's events, whose keys hold too little for a warn,
webhook or degrade threshold to apply; or, past a degrade threshold, the
same call sent to its fallback. With OpenTelemetry metrics recorded, the
lane takes the memory ledger's calls and reports them as the general path
does (``admitted``, ``degraded``, ``committed``).
The general path (``Guard.begin``, a ``Ticket``, ``_track_*``) takes about
thirty function calls and a dozen objects for it, run from cold CPU caches
after the SDK's own work. This lane does the same
work with the same pieces (the codec's bound, ``prices``, the ledger's
``hold`` and ``settle``, the codec's usage reader) in a handful.

It never decides differently from the general path:

- The interceptor asks only when the guard's ledger holds in memory
  (``type(ledger) in HOLDING``); a ``hold`` that returns None is not a
  refusal: the general path decides (the write-behind ledger's slice may
  just not cover the call).
- Before the ledger is touched, anything else (a stream, another body, an
  observer, a price missing, metrics on another ledger) returns None, and
  the general path takes the
  call from the start; so does a call ``hold`` does not admit: one that
  does not fit, or whose keys hold enough for a threshold to apply
  (``Guard._ceilings``).
- A call in a layout whose last call the full plan degraded (``Guard.degrading``)
  goes to its fallback only when a key holds more than its degrade gate,
  which refuses the model asked for whatever the limits say (``hold``'s
  ``gates``); the fallback is held as the full plan holds it, and the request
  sent with the fallback's model. Any other such call goes the general path.
- After the hold, anything out of the ordinary (an error, a response whose
  body is not read yet (``with_streaming_response``) or does not parse, no
  usage, usage beyond the worst case, a lease ended, an observer that
  appeared) is handed to the general path as the ``Ticket`` it would have
  built (``Lane.ticket``), and settled by the same code. A raw response
  (``with_raw_response``, which LangChain's chat models ask for) is
  parsed, as the general path parses it (the SDK caches the result for the
  caller's ``parse()``), and settled here.

A hypothesis test (``tests/sdk/test_express.py``) drives random calls through
the real SDKs with the lane on and off, and holds both to the same ledger
state, call log, responses, errors and metrics.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final, final

from allowance import _telemetry as telemetry
from allowance import plugins
from allowance._errors import PricingError
from allowance._estimate import make_estimate, make_record
from allowance._ledger._memory import MemoryLedger
from allowance._pricing import prices
from allowance._scope import current_adapters, new_id
from allowance._ticket import Ticket
from allowance.typing import KeyState

if TYPE_CHECKING:
    from collections.abc import Mapping

    from allowance._guard import Guard
    from allowance._ledger._write_behind import Holding
    from allowance._sdk._common import SdkBinding
    from allowance._ticket import Layout, Line

__all__ = ["Lane", "admit", "settle"]

_new: Final = object.__new__


@final
class Lane:
    """One call admitted by the express lane, until it is settled."""

    __slots__ = (
        "adapters",
        "args",
        "bound",
        "call_id",
        "cap",
        "guard",
        "held",
        "ledger",
        "lines",
        "model",
        "path",
        "provider",
        "requested",
        "scope",
        "started",
        "worst",
    )

    # Built by ``admit`` without calling the class (no ``__init__``): slot
    # stores in one frame cost less from cold caches than a class call.
    guard: Guard
    ledger: Holding
    call_id: str
    scope: Mapping[str, str]
    path: str
    provider: str
    model: str  # the model the call goes to
    bound: int
    cap: int
    lines: tuple[Line, ...]
    held: dict[str, int]
    worst: int | None
    adapters: tuple[str, ...]
    requested: str  # the model asked for (they differ on a degraded call)
    args: tuple[Any, ...]  # the request's arguments as sent
    started: float

    def ticket(self) -> Ticket:
        """The ticket ``Guard.begin`` would have returned for this call."""
        ticket = Ticket(
            self.guard,
            self.call_id,
            self.scope,
            make_estimate(self.provider, self.model, self.bound, self.cap),
            self.lines,
            self.held,
            self.worst,
            self.adapters,
            (),
            False,  # noqa: FBT003 - positional, as Guard builds it
            self.requested,
        )
        ticket.started = self.started
        return ticket


def admit(  # noqa: C901, PLR0911, PLR0912, PLR0915, PLR0917 - each way out is a case for the general path
    binding: SdkBinding,
    guard: Guard,
    ledger: Holding,
    client: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Lane | None:
    """Admit the commonest call and hold its worst case; None: not this lane's.

    ``Guard._begin_fast`` for ``_prepare``'s call, when that call is plain and
    ``ledger`` (the guard's) holds in memory: it decides the same, on the
    same ledger state, or returns None having touched nothing.
    """
    plain_of = binding.plain
    if (
        plain_of is None
        or len(args) != 2  # noqa: PLR2004 - how the SDKs call it
        or kwargs.get("stream")
        or guard._pending  # noqa: SLF001 - the guard's own hot path, split in two
        or plugins.observes_calls()
    ):
        return None
    # Metrics: the lane reports an admission as the general path does, reading
    # the memory ledger's counters; on write-behind the general path reads them.
    metered = telemetry.active()
    if metered and type(ledger) is not MemoryLedger:
        return None
    options = args[1]
    body = getattr(options, "json_data", None)
    if type(body) is not dict:
        return None
    path = binding.paths.get(getattr(options, "url", ""))
    if path is None:  # not billable, or not seen yet: ``_prepare`` decides
        return None
    now = guard._clock()  # noqa: SLF001
    scope = guard.current_scope()
    layout = guard._lines(scope, now)  # noqa: SLF001
    lines = layout.lines
    if not lines:
        return None
    provider = binding.provider_of(client)
    if provider != binding.codec.name:  # Azure: the general path re-estimates
        return None
    requested: str | None
    plain: tuple[str, int, int] | None
    gates: list[int | None] | None
    if layout.degrades and guard.degrading(layout):  # the last call was degraded
        fallback = _fallback(binding, guard, args, body, path, layout, provider)
        if fallback is None:
            return None
        requested, args, plain = fallback
        gates = [line.gate for line in lines]
    else:
        requested = gates = None
        plain = plain_of(path, body)
        if plain is None:
            return None
    model, bound, cap = plain
    try:
        worst: int | None = prices.worst_case_micros(provider, model, bound, cap)
    except PricingError:
        if layout.needs_usd:  # the general path raises it
            return None
        worst = None
    call_id = new_id()
    held = ledger.hold(
        guard._hold_items(lines, bound + cap, worst or 0),  # noqa: SLF001
        call_id,
        guard.policy.lease_seconds,
        # A degraded call: its fallback has no degrade gate (``gates`` has them).
        guard._ceilings(layout, model, provider, gated=gates is None)  # noqa: SLF001
        if layout.alerts or layout.degrades
        else None,
        gates,
    )
    if held is None:  # the general path decides again, and reports the refusal
        return None
    if metered and isinstance(ledger, MemoryLedger):  # always, when metered
        _report_admitted(guard, ledger, scope, lines, held, call_id, requested, model)
    adapters = current_adapters()
    lane: Lane = _new(Lane)
    lane.guard = guard
    lane.ledger = ledger
    lane.call_id = call_id
    lane.scope = scope
    lane.path = path
    lane.provider = provider
    lane.model = model
    lane.bound = bound
    lane.cap = cap
    lane.lines = lines
    lane.held = held
    lane.worst = worst
    lane.adapters = (*adapters, binding.name) if adapters else binding.only_name
    lane.requested = requested or model
    lane.args = args
    lane.started = time.time()
    return lane


def _report_admitted(  # noqa: PLR0917 - ``admit``'s state, passed on
    guard: Guard,
    ledger: MemoryLedger,
    scope: Mapping[str, str],
    lines: tuple[Line, ...],
    held: dict[str, int],
    call_id: str,
    requested: str | None,
    model: str,
) -> None:
    """Emit what the full plan emits for a call it admits.

    ``admitted`` (each budget's used ratio), then ``degraded`` for a degraded
    call. ``reserve`` returns the keys' states before the reservation; ``hold``
    does not, so they are read after it, less what it holds.
    """
    after = ledger.state(held)
    before = {
        key: KeyState(state.spent, state.reserved - held[key])
        for key, state in after.items()
    }
    guard._emit_admitted(scope, lines, held, before, call_id)  # noqa: SLF001
    if requested is not None:
        guard._emit_degraded(scope, lines, before, requested, model, call_id)  # noqa: SLF001


def _fallback(  # noqa: PLR0917 - ``admit``'s state, passed on
    binding: SdkBinding,
    guard: Guard,
    args: tuple[Any, ...],
    body: dict[str, Any],
    path: str,
    layout: Layout,
    provider: str,
) -> tuple[str, tuple[Any, ...], tuple[str, int, int]] | None:
    """A call past a degrade threshold, sent to its fallback; None: not the lane's.

    The model asked for, the request's arguments asking for the fallback, and
    the fallback's ``(model, input bound, output cap)``. The full plan tries
    the model asked for under its lines' degrade gates, then the fallback
    without them: ``admit`` holds the fallback only when a key holds more
    than its gate (``hold``'s ``gates``), which refuses the first plan
    whatever the limits say. The model asked for is only priced: the full
    plan raises when it cannot be.
    """
    requested = body.get("model")
    if type(requested) is not str:
        return None
    target = guard._fallback(layout, requested, provider)  # noqa: SLF001
    if target is None or (
        layout.needs_usd and not prices.has_price(provider, requested)
    ):  # the general path raises
        return None
    outgoing = binding.codec.with_model(body, target)
    plain = binding.plain(path, outgoing)  # type: ignore[misc]  # not None in admit
    if plain is None:
        return None
    options = args[1].model_copy()
    options.json_data = outgoing
    return requested, (args[0], options), plain


def settle(
    lane: Lane, binding: SdkBinding, result: Any, unparsed: tuple[type[Any], ...]
) -> bool:
    """Charge the parsed ``result``'s usage; False: the general path settles it.

    ``Ticket.commit`` of the parsed response, on the ledger's fast lane.
    ``unparsed``: the types ``_track_*`` wraps (streams, raw responses).
    """
    if isinstance(result, unparsed):
        return False
    codec = binding.codec
    usage = codec.usage(lane.path, result)
    if usage is None:
        return False
    total = usage.total_tokens
    guard = lane.guard
    # Beyond the worst case: the general path counts and reports the miss; a
    # negative count (the bits of the codec's ints OR'd): it charges the hold.
    if (
        total > lane.bound + lane.cap
        or (
            usage.input_tokens
            | usage.output_tokens
            | usage.cache_read_tokens
            | usage.cache_write_tokens
            | usage.reasoning_tokens
        )
        < 0
        or plugins.observes_calls()
    ):
        return False
    model = lane.model
    response_model = codec.response_model(result)
    cost = guard._cost(lane.provider, response_model, model, usage)  # noqa: SLF001
    amounts: dict[str, int] = {}
    for line in lane.lines:
        if line.unit == "tokens":
            amounts[line.key] = total
        elif cost is None:  # pragma: no cover - a USD line was priced at admission
            return False
        else:
            amounts[line.key] = cost
    started = lane.started
    record = make_record(
        lane.call_id,
        started,
        lane.scope,
        lane.provider,
        response_model or model,
        lane.requested,
        usage,
        cost,
        lane.adapters,
        "ok" if model == lane.requested else "degraded",
        lane.bound + lane.cap,
        lane.worst,
        (time.time() - started) * 1000.0,
    )
    if not lane.ledger.settle(lane.call_id, amounts, record):
        return False
    if telemetry.active():  # as ``Ticket``'s commit reports it
        guard._emit("committed", lane.scope, {"record": record, "held": True})  # noqa: SLF001
    return True
