"""The guard: one call lifecycle (scope, estimate, thresholds, reserve, commit).

Every adapter drives calls through ``Guard.begin``/``abegin`` and the returned
``Ticket``. The decision logic is written once, as generators that yield ledger
operations (``Op``); a sync and an async driver run them, so the sync and
async paths cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
import warnings
import weakref
from collections import deque
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from allowance import _telemetry as telemetry
from allowance import plugins
from allowance._budget import MICROS_PER_USD, Budget, BudgetStatus, format_amount
from allowance._errors import (
    BudgetExceeded,
    BudgetThresholdWarning,
    ConfigurationError,
    LedgerError,
    LedgerUnavailableError,
    PricingError,
    UsageError,
    Violation,
)
from allowance._events import call_safely, webhooks
from allowance._exit import at_exit
from allowance._ledger import DEFAULT_LEDGER_URL, open_ledger
from allowance._ledger._write_behind import HOLDING
from allowance._policy import Fail, OnLimit, Policy, budgets_from_shorthand
from allowance._pricing import prices
from allowance._scope import current_budgets, current_scope, new_id, validate_scope
from allowance._ticket import (
    FAILED,
    NO_LAYOUT,
    UNKNOWN_HOLD,
    Alert,
    Layout,
    Line,
    Op,
    Ticket,
    crossed_gates,
    degrading_budget,
)
from allowance.typing import CallRecord, Estimate, Event, KeyState, ReserveItem, Usage

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable, Mapping

    from allowance._budget import Threshold
    from allowance.typing import Ledger, Outcome, ReserveResult, Unit

__all__ = ["Guard"]

logger = logging.getLogger("allowance")

T = TypeVar("T")
_BUFFER_LIMIT = 10_000
_LINES_CACHE_SIZE = 4096
_ZERO = KeyState()
_PASSWORD_IN_URL = re.compile(r"(?<=://)([^:/@]*):[^@/]*@")
_PASSWORD_PARAM = re.compile(r"(password=)[^&]*", re.IGNORECASE)


def masked_url(url: str) -> str:
    """Return ``url`` with its password (and ``*password=`` options) as ``***``."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1:***@", url))


_LEDGER_SCHEMES = (
    "memory://",
    "sqlite://",
    "redis://",
    "rediss://",
    "redis+sentinel://",
)


class Guard:
    """Enforces a policy on calls, against one ledger.

    Args:
        policy: The budgets and rules. Or, as a shorthand, give ``budget`` (and
            ``per``, ``window``, ``fallback``, ``threshold``, ``on_limit``,
            ``fail``) and a policy is built from them.
        ledger: A ledger URL (``"memory://"``, ``"sqlite:///path.db"``) or
            ``Ledger`` object. Default ``sqlite:///allowance.db`` in the working
            directory, opened on the first call.
        budget: Shorthand: ``"$2.00"``, an int of tokens, ``"50k tokens"``, a
            ``Budget`` or a list of them.
        per: Shorthand: the dimension of ``budget`` (default ``"session"``).
        window: Shorthand: the window of ``budget``.
        fallback: Shorthand: the cheaper model to degrade to.
        threshold: Shorthand: degrade at this ratio (warn, without a fallback).
        on_limit: Shorthand: ``"raise"``, ``"stop"`` or ``"warn"``.
        fail: Shorthand: ``"closed"`` or ``"open"``.
        scope: Dimensions every call through this guard carries, winning over
            the ambient ``allowance.scope`` (``wrap`` binds ``session`` here).
        defaults: Dimensions used when the ambient scope lacks them; default
            ``{"session": <a new id>}``, so a ``per="session"`` budget applies to
            this guard's calls unless ``allowance.scope(session=...)`` says
            which session.
        clock: Time source (tests).

    Raises:
        ConfigurationError: Any argument is malformed, or both ``policy`` and
            shorthand arguments are given.

    Example:
        >>> guard = Guard(budget="$5", per="tenant", ledger="memory://")
    """

    __module__ = "allowance"

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        ledger: str | Ledger | None = None,
        budget: int | str | Budget | Iterable[Budget] | None = None,
        per: str = "session",
        window: Literal["hour", "day", "week", "month"] | None = None,
        fallback: str | Mapping[str, str] | None = None,
        threshold: float | None = None,
        on_limit: OnLimit = "raise",
        fail: Fail = "closed",
        scope: Mapping[str, str | int] | None = None,
        defaults: Mapping[str, str | int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Build the guard; see the class docstring. The ledger opens lazily."""
        shorthand = (
            budget is not None
            or fallback is not None
            or threshold is not None
            or on_limit != "raise"
            or fail != "closed"
        )
        if policy is not None:
            if shorthand:
                raise ConfigurationError(
                    "policy",
                    policy,
                    "either policy=Policy(...) or the shorthand arguments "
                    "(budget, fallback, threshold, on_limit, fail), not both",
                )
            if not isinstance(policy, Policy):
                raise ConfigurationError("policy", policy, "an allowance.Policy")
        else:
            policy = Policy(
                budgets_from_shorthand(budget, per, window, threshold, fallback),
                on_limit=on_limit,
                fallback=fallback,
                fail=fail,
            )
        self.policy = policy
        if (
            ledger is not None
            and not isinstance(ledger, str)
            and not hasattr(ledger, "reserve")
        ):
            raise ConfigurationError(
                "ledger", ledger, "a ledger URL or a Ledger object"
            )
        self._ledger_spec: str | Ledger = (
            ledger if ledger is not None else DEFAULT_LEDGER_URL
        )
        if isinstance(
            self._ledger_spec, str
        ) and not self._ledger_spec.lower().startswith(_LEDGER_SCHEMES):
            # Opened lazily, but a typo fails here, where it was written.
            raise ConfigurationError(
                "ledger",
                self._ledger_spec,
                "memory://, sqlite:///<path> or redis://host:port/db",
            )
        self._ledger: Ledger | None = None
        self._ledger_lock = threading.Lock()
        self.bound_scope: Mapping[str, str] = MappingProxyType(
            validate_scope(scope or {})
        )
        self.default_scope: Mapping[str, str] = MappingProxyType(
            validate_scope({"session": new_id()} if defaults is None else defaults)
        )
        self._clock = clock
        prices.preload()
        self._fired: set[str] = set()
        # Layouts whose last call through the full plan was degraded: their
        # calls skip the fast ways, which would only find the gate closed.
        self._degraded: dict[int, Layout] = {}
        self._last_scope: tuple[object, Mapping[str, str]] = (None, {})
        self._last_layout: tuple[object, object, Layout] = (None, None, NO_LAYOUT)
        self._layouts: dict[
            tuple[tuple[str | None, ...], tuple[Budget, ...]], Layout
        ] = {}
        # The dimensions the budgets count, with each set of extra budgets.
        self._dims: dict[tuple[Budget, ...], tuple[str, ...]] = {}
        # What the ledger failed to settle, written later: charges (commit),
        # holds to give back (release: a failed release, or a hold a failed
        # reserve may have left).
        self._pending: deque[Op] = deque()
        self.estimate_misses = 0
        self.ledger_failures = 0

    def __repr__(self) -> str:
        """Show the policy and the ledger (passwords masked)."""
        return f"Guard({self.policy!r}, ledger={self._describe_ledger()})"

    # -- the ledger ---------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The ledger, opened on first use."""
        ledger = self._ledger
        if ledger is None:
            with self._ledger_lock:
                if self._ledger is None:
                    self._ledger = open_ledger(self._ledger_spec)
                ledger = self._ledger
        return ledger

    def nonblocking_ledger(self) -> bool:
        """True when the ledger's sync methods never wait (the memory ledger).

        Async calls then skip the async twins' machinery: the same work, done
        in place, as the twins themselves would.
        """
        ledger = self._ledger
        return ledger is not None and getattr(ledger, "nonblocking", False) is True

    def close(self) -> None:
        """Write pending charges and close the ledger if this guard opened it."""
        self._flush_pending()
        if self._ledger is not None and isinstance(self._ledger_spec, str):
            self._ledger.close()
            self._ledger = None

    # -- scope and budgets ----------------------------------------------------------

    def current_scope(self) -> Mapping[str, str]:
        """Return the scope a call made here would be attributed to."""
        ambient = current_scope()
        if not self.default_scope and not self.bound_scope:
            return ambient
        last = self._last_scope  # scopes are immutable: merge each one once
        if last[0] is ambient:
            return last[1]
        merged = MappingProxyType({**self.default_scope, **ambient, **self.bound_scope})
        self._last_scope = (ambient, merged)
        return merged

    def _lines(self, scope: Mapping[str, str], now: float) -> Layout:
        """Return the ledger lines a call in ``scope`` draws on (cached per window)."""
        extra = current_budgets()
        last = self._last_layout
        if last[0] is scope and last[1] is extra and now < last[2].valid_until:
            return last[2]
        # Keyed by the values of the dimensions budgets count, not the whole
        # scope: framework scopes carry a fresh run or query id per call.
        dims = self._dims.get(extra)
        if dims is None:
            if len(self._dims) >= _LINES_CACHE_SIZE:
                self._dims.clear()
            dims = self._dims[extra] = tuple(
                sorted({b.per for b in self.policy.budgets} | {b.per for b in extra})
            )
        cache_key = (tuple([scope.get(dim) for dim in dims]), extra)
        layout = self._layouts.get(cache_key)
        if layout is None or now >= layout.valid_until:
            layout = self._build_layout(scope, extra, now)
            if len(self._layouts) >= _LINES_CACHE_SIZE:
                self._layouts.clear()
            self._layouts[cache_key] = layout
        self._last_layout = (scope, extra, layout)
        return layout

    def _build_layout(
        self, scope: Mapping[str, str], extra: tuple[Budget, ...], now: float
    ) -> Layout:
        applicable = [b for b in self.policy.budgets if b.per in scope]
        applicable.extend(b for b in extra if b.per in scope)
        lines: dict[str, Line] = {}
        valid_until = math.inf
        for b in applicable:
            key = b.key(scope, now)
            end = b.window_end(now)
            if end is not None:
                valid_until = min(valid_until, end)
            limit = b.limit
            gate: int | None = None
            for t in b.thresholds:
                if t.action == "block":
                    limit = min(limit, t.floor_of(b.limit))
                elif t.action == "degrade" and gate is None:
                    gate = t.ceil_of(b.limit) - 1
            line = lines.get(key)
            if line is None:
                lines[key] = Line(key, b.unit, [b], limit, gate)
            else:
                line.budgets.append(b)
                line.limit = min(line.limit, limit)
                if gate is not None:
                    line.gate = gate if line.gate is None else min(line.gate, gate)
        for line in lines.values():
            line.alerts = _alerts(line)
        degrade_to = next(
            (
                t.to
                for b in applicable
                for t in b.thresholds
                if t.action == "degrade" and t.to is not None
            ),
            None,
        )
        return Layout(
            lines=tuple(lines.values()),
            applicable=tuple(applicable),
            valid_until=valid_until,
            needs_usd=any(line.unit == "usd" for line in lines.values()),
            alerts=any(
                t.action in {"warn", "webhook"}
                for b in applicable
                for t in b.thresholds
            ),
            degrade_to=degrade_to,
            degrades=self.policy.fallback is not None or degrade_to is not None,
        )

    # -- the call lifecycle -----------------------------------------------------------

    def begin(
        self,
        estimate: Estimate,
        *,
        adapters: tuple[str, ...] = (),
        reestimate: Callable[[str], Estimate | None] | None = None,
        refine: Callable[[], Estimate | None] | None = None,
    ) -> Ticket:
        """Admit a call before it is sent: reserve its worst case on every budget.

        Args:
            estimate: The call's worst case (``ProviderCodec.estimate``).
            adapters: Names of the adapters that saw the call, outermost first.
            reestimate: Returns the worst case of the same request on another
                model; needed to degrade. Without it the guard never degrades.
                It returns None when the request cannot be sent to that model
                (its URL names the model): past a degrade threshold the call
                is then refused, as a call whose fallback does not fit.
            refine: Returns a tighter worst case (input counted exactly by a
                tokenizer), or None. Called only when the cheap bound would
                refuse the call: exact counting costs time only where it can
                change the decision.

        Returns:
            A ``Ticket``: call ``ticket.model`` (maybe the fallback) unless
            ``ticket.stopped``, then settle it.

        Raises:
            BudgetExceeded: The call fits no budget and ``on_limit="raise"``.
            PricingError: A USD budget applies and the model has no price.
            LedgerUnavailableError: The ledger failed and ``fail="closed"``.
            UsageError: ``estimate`` is not an ``Estimate``.
        """
        _check_estimate(estimate)
        ticket = self._begin_fast(estimate, adapters, reestimate, refine)
        if ticket is not None:
            return ticket
        return self._drive(self._begin_plan(estimate, adapters, reestimate, refine))

    def _begin_fast(  # noqa: C901, PLR0911 - one way out per case
        self,
        estimate: Estimate,
        adapters: tuple[str, ...],
        reestimate: Callable[[str], Estimate | None] | None,
        refine: Callable[[], Estimate | None] | None,
        *,
        hold_only: bool = False,
    ) -> Ticket | None:
        """``_begin_plan``'s common case without the generator driver, or None.

        ``hold_only``: only the ledger's in-memory ``hold``, never a call that
        may wait (for ``abegin`` on a ledger whose ``reserve`` does).

        The common case: nothing held in memory, no model to degrade to, no
        warn/webhook threshold. A call that fits is admitted here and a refused
        one refused here (one reserve either way); None sends the call to the
        full plan (degrade, thresholds, a buffer to flush). Under thresholds,
        on a ledger that holds in memory, a call is admitted here when its
        keys hold too little for any to apply (``_ceilings``); any other goes
        to the full plan.
        """
        if self._pending:
            return None
        now = self._clock()
        scope = self.current_scope()
        layout = self._lines(scope, now)
        lines = layout.lines
        if not lines:
            return None
        ledger = self._ledger or self.ledger
        holding = type(ledger) in HOLDING
        gated = reestimate is not None and layout.degrades
        if (layout.alerts or gated) and (
            not holding or (gated and self.degrading(layout))
        ):
            return None
        worst_micros = self._worst(estimate, required=layout.needs_usd)
        call_id = new_id()
        tokens = estimate.total_tokens
        observed = self._observed()  # asked once, used twice
        if holding and not observed:
            # The fast lane of a ledger that holds in memory: the same hold,
            # without the protocol's value objects. A call it does not hold goes
            # on to ``reserve`` below, which decides again (and returns what a
            # refusal reports), or to the full plan under thresholds.
            ceilings = (
                self._ceilings(layout, estimate.model, estimate.provider, gated=gated)
                if layout.alerts or gated
                else None
            )
            held = ledger.hold(  # type: ignore[attr-defined]  # in HOLDING
                self._hold_items(lines, tokens, worst_micros or 0),
                call_id,
                self.policy.lease_seconds,
                ceilings,
            )
            if held is not None:
                return self._admitted(
                    call_id, scope, estimate, lines, held, worst_micros, adapters
                )
        if hold_only or layout.alerts or gated:
            return None
        plan = [
            ReserveItem(
                line.key,
                tokens if line.unit == "tokens" else (worst_micros or 0),
                line.limit,
            )
            for line in lines
        ]
        lease = self.policy.lease_seconds
        try:
            result = ledger.reserve([plan], reservation_id=call_id, lease_seconds=lease)
        except LedgerError as err:
            op = Op(
                "reserve",
                ([plan],),
                {"reservation_id": call_id, "lease_seconds": lease},
            )
            self._on_ledger_error(op, err)  # raises unless fail="open"
            reserved: Mapping[str, int] | None = UNKNOWN_HOLD  # charged at commit
        else:
            if result.plan is None:  # decided here, not reserved a second time
                exact = self._exact(estimate, refine)
                return self._drive(
                    self._refusal_plan(
                        estimate,
                        scope,
                        lines,
                        plan,
                        result,
                        worst_micros,
                        adapters,
                        call_id,
                    )
                    if exact is None
                    else self._begin_plan(exact, adapters, reestimate)
                )
            reserved = {item.key: item.amount for item in plan}
            if observed:
                self._emit_admitted(scope, lines, reserved, result.before, call_id)
        return self._admitted(
            call_id, scope, estimate, lines, reserved, worst_micros, adapters
        )

    @staticmethod
    def _exact(
        estimate: Estimate, refine: Callable[[], Estimate | None] | None
    ) -> Estimate | None:
        """The exact count of a refused call's input, when it is smaller; or None."""
        if refine is None or estimate.exact_input:
            return None
        exact = refine()  # nothing is held: try the exact count
        if exact is not None and exact.total_tokens < estimate.total_tokens:
            return exact
        return None

    def degrading(self, layout: Layout) -> bool:
        """True when the last call in ``layout`` through the full plan degraded.

        Only a hint for the fast ways (the full plan decides every call it
        takes): one that admits a call as asked clears it.
        """
        return self._degraded.get(id(layout)) is layout

    def _ceilings(
        self, layout: Layout, model: str, provider: str, *, gated: bool
    ) -> list[int] | None:
        """Per line, the most its key may hold for a call to be admitted plainly.

        Plainly: as asked, with no warn or webhook threshold to fire, as the full
        plan (``_begin_plan``) would admit it when the key holds no more. None:
        no such bound (the limit is the only one). ``gated``: the call may go to
        a fallback, so a degrade threshold's gate bounds it too; a fallback the
        full plan cannot price (it raises) gives ceilings no call fits under.
        """
        target = self._fallback(layout, model, provider) if gated else None
        gate = target is not None
        # A fallback the full plan cannot price: it raises.
        if (
            target is not None
            and layout.needs_usd
            and not prices.has_price(provider, target)
        ):
            return [-1] * len(layout.lines)
        if not (gate or layout.alerts):
            return None
        fired = self._fired
        ceilings = []
        for line in layout.lines:
            ceiling = line.limit
            if gate and line.gate is not None:
                ceiling = min(ceiling, line.gate)
            for alert in line.alerts:
                if alert.quiet < ceiling and alert.marker not in fired:
                    ceiling = alert.quiet
            ceilings.append(ceiling)
        return ceilings

    @staticmethod
    def _hold_items(
        lines: tuple[Line, ...], tokens: int, micros: int
    ) -> list[tuple[str, int, int]]:
        return [
            (line.key, tokens if line.unit == "tokens" else micros, line.limit)
            for line in lines
        ]

    def _admitted(  # noqa: PLR0917 - the fast path's state, passed on
        self,
        call_id: str,
        scope: Mapping[str, str],
        estimate: Estimate,
        lines: tuple[Line, ...],
        reserved: Mapping[str, int] | None,
        worst_micros: int | None,
        adapters: tuple[str, ...],
    ) -> Ticket:
        return Ticket(
            self,
            call_id,
            scope,
            estimate,
            lines,
            reserved,
            worst_micros,
            adapters,
            (),
            False,  # noqa: FBT003 - positional, as Ticket is built on the hot path
            estimate.model,
        )

    async def abegin(
        self,
        estimate: Estimate,
        *,
        adapters: tuple[str, ...] = (),
        reestimate: Callable[[str], Estimate | None] | None = None,
        refine: Callable[[], Estimate | None] | None = None,
    ) -> Ticket:
        """Async twin of ``begin``; never blocks the event loop on the ledger."""
        _check_estimate(estimate)
        if self.nonblocking_ledger():
            ticket = self._begin_fast(estimate, adapters, reestimate, refine)
            if ticket is not None:
                return ticket
        elif type(self._ledger) in HOLDING:  # holds in memory, reserves on a file
            ticket = self._begin_fast(
                estimate, adapters, reestimate, refine, hold_only=True
            )
            if ticket is not None:
                return ticket
        return await self._adrive(
            self._begin_plan(estimate, adapters, reestimate, refine)
        )

    def _begin_plan(  # noqa: C901, PLR0912 - the lifecycle, in one readable place
        self,
        estimate: Estimate,
        adapters: tuple[str, ...],
        reestimate: Callable[[str], Estimate | None] | None,
        refine: Callable[[], Estimate | None] | None = None,
    ) -> Generator[Op, Any, Ticket]:
        if self._pending:
            yield from self._flush_plan()
            if len(self._pending) >= _BUFFER_LIMIT:
                # The ledger is still down and the buffer is full: refuse
                # before sending, so no charge is ever dropped.
                msg = (
                    f"ledger {self._describe_ledger()} is unavailable and"
                    f" {len(self._pending)} charges are held in memory, the"
                    f" most allowed ({_BUFFER_LIMIT}); refusing calls until"
                    " they are written"
                )
                raise LedgerUnavailableError(msg, fail_open=self.policy.fail == "open")
        now = self._clock()
        scope = self.current_scope()
        layout = self._lines(scope, now)
        lines = layout.lines
        call_id = new_id()
        needs_usd = layout.needs_usd
        worst_micros = self._worst(estimate, required=needs_usd)

        def ticket(
            chosen: Estimate = estimate,
            reserved: Mapping[str, int] | None = None,
            micros: int | None = worst_micros,
            *,
            held: tuple[Line, ...] = lines,
            violations: tuple[Violation, ...] = (),
            stopped: bool = False,
        ) -> Ticket:
            return Ticket(
                self,
                call_id,
                scope,
                chosen,
                held,
                reserved,
                micros,
                adapters,
                violations,
                stopped,
                estimate.model,
            )

        if not lines:
            return ticket()
        candidates, gated = self._candidates(estimate, worst_micros, layout, reestimate)
        plans = [
            [
                ReserveItem(
                    line.key,
                    est.total_tokens if line.unit == "tokens" else (micros or 0),
                    line.limit,
                    # The requested model is gated below a degrade threshold
                    # only when there is a fallback (or one it cannot reach).
                    line.gate if index == 0 and gated else None,
                )
                for line in lines
            ]
            for index, (_, est, micros) in enumerate(candidates)
        ]
        result = yield Op(
            "reserve",
            (plans,),
            {"reservation_id": call_id, "lease_seconds": self.policy.lease_seconds},
        )
        if result is FAILED:  # fail-open: let through, charge at commit
            return ticket(reserved=UNKNOWN_HOLD)
        result = cast("ReserveResult", result)
        exact = None if result.plan is not None else self._exact(estimate, refine)
        if exact is not None:
            return (yield from self._begin_plan(exact, adapters, reestimate))
        if result.plan is None:
            return (
                yield from self._refusal_plan(
                    estimate,
                    scope,
                    lines,
                    plans[0],
                    result,
                    worst_micros,
                    adapters,
                    call_id,
                    fallback=(candidates[-1], plans[-1]) if len(plans) > 1 else None,
                    stuck=gated and len(plans) == 1,
                )
            )
        model, chosen, micros = candidates[result.plan]
        reserved = {item.key: item.amount for item in plans[result.plan]}
        if self._observed():
            self._emit_admitted(scope, lines, reserved, result.before, call_id)
        if result.plan > 0:
            self._emit_degraded(
                scope, lines, result.before, estimate.model, model, call_id
            )
            if len(self._degraded) >= _LINES_CACHE_SIZE:
                self._degraded.clear()
            self._degraded[id(layout)] = layout
        elif self._degraded:
            self._degraded.pop(id(layout), None)
        admitted = ticket(chosen, reserved, micros)
        if not layout.alerts:
            return admitted
        try:
            crossed = yield from self._threshold_plan(
                lines, result.before, scope, model
            )
        except BaseException:  # cancelled, or the ledger failed: nothing sent
            yield from admitted._release_plan("error")
            raise
        for message in crossed:
            try:
                warnings.warn(message, BudgetThresholdWarning, stacklevel=2)
            except BaseException:  # a warnings filter set to "error": nothing held
                yield from admitted._release_plan("error")
                raise
        return admitted

    def _refusal_plan(  # noqa: PLR0917 - the refused call's state, passed on
        self,
        estimate: Estimate,
        scope: Mapping[str, str],
        lines: tuple[Line, ...],
        plan: list[ReserveItem],
        result: ReserveResult,
        worst_micros: int | None,
        adapters: tuple[str, ...],
        call_id: str,
        *,
        fallback: tuple[tuple[str, Estimate, int | None], list[ReserveItem]]
        | None = None,
        stuck: bool = False,
    ) -> Generator[Op, Any, Ticket]:
        """Log the refused call, then raise, or stop, or let it through (warn).

        ``fallback``: the model the call would degrade to, and its plan, tried
        and refused too. When a degrade gate it found crossed barred the model
        asked for, the violations are the fallback's (the model asked for may
        fit), and a call let through (``on_limit="warn"``) goes to the fallback.
        ``stuck``: the call has a fallback it cannot be sent to; a gate it found
        crossed is then its limit, and the violations say so.
        """
        before = result.before
        gated = crossed_gates(lines, before) if fallback is not None or stuck else []
        if not gated:
            fallback = None  # the model asked for was refused by a limit
        if stuck and gated:
            logger.warning(
                "allowance: call to %r is past a degrade threshold but cannot"
                " degrade: its request's URL names the model",
                estimate.model,
            )
            violations = tuple(
                dataclasses.replace(
                    _violation(line, item, before.get(line.key, _ZERO)),
                    limit=line.gate + 1,  # the threshold's point
                )
                for line, item in zip(lines, plan, strict=True)
                if line in gated and line.gate is not None
            )
        else:
            violations = _violations(
                lines, plan if fallback is None else fallback[1], before
            )
        yield from self._refuse_plan(
            estimate=estimate,
            scope=scope,
            violations=violations,
            worst_micros=worst_micros,
            adapters=adapters,
            call_id=call_id,
        )
        # A warn or webhook threshold fires on the calls made past it, refused
        # or not: the call that finds a budget past 80% is often one that does
        # not fit any more.
        crossed = yield from self._threshold_plan(lines, before, scope, estimate.model)
        for message in crossed:
            warnings.warn(message, BudgetThresholdWarning, stacklevel=2)
        on_limit = self.policy.on_limit
        if on_limit == "raise":
            raise BudgetExceeded(violations, model=estimate.model)
        chosen, micros = estimate, worst_micros
        if on_limit == "warn" and fallback is not None:
            # Over the limit and past the degrade threshold: let through to
            # the fallback, as a call that fits would go.
            (model, chosen, micros), _ = fallback
            self._emit_degraded(scope, lines, before, estimate.model, model, call_id)
        return Ticket(
            self,
            call_id,
            scope,
            chosen,
            lines if on_limit == "warn" else (),
            None,
            micros,
            adapters,
            violations,
            on_limit == "stop",
            estimate.model,
        )

    def _candidates(
        self,
        estimate: Estimate,
        worst_micros: int | None,
        layout: Layout,
        reestimate: Callable[[str], Estimate | None] | None,
    ) -> tuple[list[tuple[str, Estimate, int | None]], bool]:
        """The models a call may go to, in order: the one asked for, the fallback.

        And whether the one asked for is gated by degrade thresholds: it has a
        fallback, or one it cannot be sent to (``reestimate`` returns None).
        """
        candidates = [(estimate.model, estimate, worst_micros)]
        if reestimate is None:
            return candidates, False
        target = self._fallback(layout, estimate.model, estimate.provider)
        if target is None:
            return candidates, False
        fallback = reestimate(target)
        if fallback is not None:
            candidates.append(
                (target, fallback, self._worst(fallback, required=layout.needs_usd))
            )
        return candidates, True

    def _fallback(self, layout: Layout, model: str, provider: str) -> str | None:
        """The model a call in ``layout`` may be degraded to, or None."""
        if not layout.degrades:
            return None
        return self.policy.fallback_for(model, provider, layout.degrade_to)

    def _worst(self, estimate: Estimate, *, required: bool) -> int | None:
        try:
            return (
                prices.worst_case_micros(
                    estimate.provider,
                    estimate.model,
                    estimate.input_tokens,
                    estimate.output_tokens,
                )
                * estimate.price_factor
            )
        except PricingError:
            if required:
                raise
            return None

    def _cost(
        self, provider: str, response_model: str | None, model: str, usage: Usage
    ) -> int | None:
        if response_model and response_model != model:
            try:
                return prices.cost_micros(provider, response_model, usage)
            except PricingError:
                pass
        try:
            return prices.cost_micros(provider, model, usage)
        except PricingError:
            return None

    def _refuse_plan(
        self,
        *,
        estimate: Estimate,
        scope: Mapping[str, str],
        violations: tuple[Violation, ...],
        worst_micros: int | None,
        adapters: tuple[str, ...],
        call_id: str,
    ) -> Generator[Op, Any, None]:
        on_limit = self.policy.on_limit
        message = BudgetExceeded(violations, model=estimate.model).args[0]
        if on_limit == "warn":
            logger.warning(
                "allowance: over budget, let through (on_limit='warn'): %s", message
            )
            warnings.warn(message, BudgetThresholdWarning, stacklevel=4)
            self._emit(
                "over_limit", scope, {"message": message, "model": estimate.model}
            )
            return
        outcome: Outcome = "blocked" if on_limit == "raise" else "stopped"
        record = CallRecord(
            call_id=call_id,
            ts=time.time(),
            scope=dict(scope),
            provider=estimate.provider,
            model=estimate.model,
            requested_model=estimate.model,
            usage=Usage(),
            cost_micros=0,
            adapters=adapters,
            outcome=outcome,
            estimate_tokens=estimate.total_tokens,
            estimate_micros=worst_micros,
        )
        logger.info("allowance: %s", message)
        yield from self._settle(Op("record", (record,)))
        self._emit(
            "blocked",
            scope,
            {
                "message": message,
                "model": estimate.model,
                "outcome": outcome,
                "violations": [dataclasses.asdict(v) for v in violations],
            },
            budget=violations[0].budget if violations else None,
        )

    def _threshold_plan(
        self,
        lines: tuple[Line, ...],
        before: Mapping[str, KeyState],
        scope: Mapping[str, str],
        model: str,
    ) -> Generator[Op, Any, list[str]]:
        """Fire the warn/webhook thresholds crossed; return the warnings to issue."""
        # Like degrade gates: committed + in-flight spend before this call.
        crossed: list[str] = []
        for line in lines:
            used = before.get(line.key, KeyState()).used
            for marker, quiet, b, t in line.alerts:
                if used <= quiet or marker in self._fired:
                    continue
                claimed = yield Op("claim", (marker,))
                self._remember(marker)
                if claimed is True:
                    message = self._fire(
                        threshold=t,
                        budget=b,
                        line=line,
                        used=used,
                        scope=scope,
                        model=model,
                    )
                    if t.action == "warn":
                        crossed.append(message)
        return crossed

    def _remember(self, marker: str) -> None:
        if len(self._fired) > 100_000:  # noqa: PLR2004 - bound the memory of old windows
            self._fired.clear()
        self._fired.add(marker)

    def _fire(
        self,
        *,
        threshold: Threshold,
        budget: Budget,
        line: Line,
        used: int,
        scope: Mapping[str, str],
        model: str,
    ) -> str:
        event = Event(
            kind="threshold",
            budget=budget.label,
            scope=dict(scope),
            data={
                "action": threshold.action,
                "at": threshold.at,
                "key": line.key,
                "unit": budget.unit,
                "used": used,
                "limit": budget.limit,
                "model": model,
            },
        )
        message = (
            f"budget {budget.label!r} ({line.key}) crossed "
            f"{round(threshold.at * 100)}%: {format_amount(used, budget.unit)} "
            f"of {format_amount(budget.limit, budget.unit)}"
        )
        logger.warning("allowance: %s", message)
        if threshold.callback is not None:
            call_safely(threshold.callback, event, what="threshold callback")
        if threshold.action == "webhook" and threshold.to:
            webhooks.send(
                threshold.to,
                event,
                secret=threshold.secret,
                allow_http=threshold.allow_http,
            )
        if telemetry.active():
            telemetry.observe(event.kind, event.budget, event.scope, event.data)
        plugins.emit(event)
        return message

    def _emit_admitted(
        self,
        scope: Mapping[str, str],
        lines: tuple[Line, ...],
        reserved: Mapping[str, int],
        before: Mapping[str, KeyState],
        call_id: str,
    ) -> None:
        """Tell observers a call holds a reservation, and where each budget stands."""
        ratios = tuple(
            (
                b.label,
                (before.get(line.key, _ZERO).used + reserved.get(line.key, 0)) / b.limit
                if b.limit
                else 1.0,
            )
            for line in lines
            for b in line.budgets
        )
        self._emit(
            "admitted", scope, {"call_id": call_id, "held": True, "ratios": ratios}
        )

    def _observed(self) -> bool:
        """True when events have somewhere to go (telemetry or an observer)."""
        return telemetry.active() or plugins.has_observers()

    def _emit_degraded(  # noqa: PLR0917 - the degraded call's state, passed on
        self,
        scope: Mapping[str, str],
        lines: tuple[Line, ...],
        before: Mapping[str, KeyState],
        requested: str,
        model: str,
        call_id: str,
    ) -> None:
        """Say a call went to ``model`` instead, naming the budget that sent it."""
        self._emit(
            "degraded",
            scope,
            {"requested_model": requested, "model": model, "call_id": call_id},
            budget=degrading_budget(lines, before),
        )

    def _emit(
        self,
        kind: str,
        scope: Mapping[str, str],
        data: Mapping[str, Any],
        *,
        budget: str | None = None,
    ) -> None:
        if telemetry.active():
            telemetry.observe(kind, budget, scope, data)
        if plugins.has_observers():
            plugins.emit(Event(kind=kind, budget=budget, scope=dict(scope), data=data))

    # -- settling and failure handling ------------------------------------------------

    def _settle(self, op: Op) -> Generator[Op, Any, None]:
        """Yield a commit/release/record; on ledger failure keep it for later.

        A commit is kept because the provider did the work; a release because
        its hold would otherwise refuse calls that fit until its lease ends.
        A record alone (a call nothing was held for) is logged and dropped.
        """
        result = yield op
        if result is FAILED and op.name != "record":
            self._keep_for_later(op)

    def _keep_for_later(self, op: Op) -> None:
        """Keep a commit or release the ledger failed, for the next call to write.

        Always kept (a commit: the provider already did the work). The buffer
        stays bounded because ``begin`` refuses new calls once it is full
        (calls in flight at that moment may add one each).
        """
        self._pending.append(op)
        _buffered.add(self)  # written at exit, if nothing writes them before
        if len(self._pending) == _BUFFER_LIMIT:
            logger.error(
                "allowance: ledger %s: %d charges held in memory, the most"
                " allowed; new calls are refused until the ledger is back",
                self._describe_ledger(),
                _BUFFER_LIMIT,
            )

    def _orphaned(self, call_id: str) -> None:
        """A reserve failed and may have run, its reply lost; nothing will settle it.

        Under fail="closed" the call is not sent; under fail="open" it was sent
        and failed with nothing to charge. ``call_id``'s hold, if any, is
        released once the ledger answers (an unknown id: a no-op), rather than
        held until its lease ends.
        """
        self._keep_for_later(Op("release", (call_id,)))

    def _flush_plan(self) -> Generator[Op, Any, None]:
        # Take before writing, put back on failure: concurrent flushers (threads,
        # tasks) each write distinct charges. A charge written twice would be
        # harmless anyway: commits are idempotent per call id.
        while True:
            try:
                op = self._pending.popleft()
            except IndexError:
                return
            result = yield op
            if result is FAILED:
                self._pending.appendleft(op)
                return
            if op.name == "commit":
                logger.warning(
                    "allowance: wrote a charge held in memory (%s)", op.args[0]
                )

    def _flush_pending(self) -> None:
        if self._pending:
            try:
                self._drive(self._flush_plan())
            except LedgerError:  # pragma: no cover - best effort at close
                logger.exception(
                    "allowance: %d charges could not be written", len(self._pending)
                )

    def _describe_ledger(self) -> str:
        """The ledger's URL for messages and logs, with any password masked."""
        spec = self._ledger_spec
        return repr(masked_url(spec if isinstance(spec, str) else spec.url))

    def _on_ledger_error(self, op: Op, err: LedgerError) -> object:
        self.ledger_failures += 1
        settling = op.name in {"commit", "release", "record"}
        if op.name == "claim":
            logger.warning(
                "allowance: ledger failed to record a threshold marker: %s", err
            )
            return True
        if self.policy.fail == "open" or settling:
            logger.error(
                "allowance: ledger %s failed on %s (%s); %s",
                self._describe_ledger(),
                op.name,
                err,
                "the charge is held in memory and retried"
                if op.name == "commit"
                else "retried: its hold is given back once the ledger answers"
                if op.name == "release"
                else "call let through (fail='open')"
                if op.name == "reserve"
                else "ignored",
            )
            self._emit("ledger_failure", {}, {"op": op.name, "error": str(err)})
            return FAILED
        if op.name == "reserve":  # fail="closed": the call raises, unsent
            self._orphaned(op.kwargs["reservation_id"])
        if isinstance(err, LedgerUnavailableError):
            raise err
        msg = f"ledger {self._describe_ledger()} failed on {op.name}: {err}"
        raise LedgerUnavailableError(msg) from err

    def _run(self, op: Op) -> object:
        try:
            return getattr(self._ledger or self.ledger, op.name)(*op.args, **op.kwargs)
        except LedgerError as err:
            return self._on_ledger_error(op, err)

    async def _arun(self, op: Op) -> object:
        try:
            method = getattr(self._ledger or self.ledger, "a" + op.name)
            return await method(*op.args, **op.kwargs)
        except LedgerError as err:
            return self._on_ledger_error(op, err)

    # The drivers throw what an operation raised (a fail-closed ledger error, a
    # cancelled await, Ctrl-C) into the plan, so a plan holding a reservation
    # can give it back before the error goes on.

    def _drive(self, plan: Generator[Op, Any, T]) -> T:
        try:
            op = next(plan)
            while True:
                try:
                    result = self._run(op)
                except BaseException as err:  # noqa: BLE001 - thrown into the plan
                    op = plan.throw(err)
                else:
                    op = plan.send(result)
        except StopIteration as stop:
            return cast("T", stop.value)

    async def _adrive(self, plan: Generator[Op, Any, T]) -> T:
        try:
            op = next(plan)
            while True:
                try:
                    result = await self._arun(op)
                except BaseException as err:  # noqa: BLE001 - thrown into the plan
                    op = plan.throw(err)
                else:
                    op = plan.send(result)
        except StopIteration as stop:
            return cast("T", stop.value)

    # -- reading -----------------------------------------------------------------

    def status(
        self, scope: Mapping[str, str | int] | None = None
    ) -> list[BudgetStatus]:
        """Return where each budget that applies to ``scope`` stands now.

        Args:
            scope: Dimensions to look at; default the scope a call made here
                would have (ambient scope plus this guard's bound scope).
        """
        resolved = (
            {**self.current_scope(), **validate_scope(scope)}
            if scope
            else self.current_scope()
        )
        now = self._clock()
        layout = self._lines(resolved, now)
        applicable = layout.applicable
        states = self.ledger.state([line.key for line in layout.lines])
        by_key = {line.key: line for line in layout.lines}
        out: list[BudgetStatus] = []
        for b in applicable:
            key = b.key(resolved, now)
            st = states.get(key, KeyState())
            out.append(
                BudgetStatus(
                    budget=b.label,
                    key=key,
                    unit=b.unit,
                    # The counter's limit: the least of the budgets sharing
                    # it (and a block threshold's), what admission checks.
                    limit=by_key[key].limit,
                    spent=st.spent,
                    reserved=st.reserved,
                    window_ends=b.window_end(now),
                )
            )
        return out

    def spent(self, scope: Mapping[str, str | int] | None = None) -> Decimal | int:
        """Committed spend of the first budget: USD as ``Decimal``, tokens ``int``."""
        status = self._first_status(scope)
        return _amount(status.spent, status.unit)

    def remaining(self, scope: Mapping[str, str | int] | None = None) -> Decimal | int:
        """What the first budget has left: USD as ``Decimal``, tokens as ``int``."""
        status = self._first_status(scope)
        return _amount(status.remaining, status.unit)

    def _first_status(self, scope: Mapping[str, str | int] | None) -> BudgetStatus:
        statuses = self.status(scope)
        if not statuses:
            resolved = dict(self.current_scope())
            raise ConfigurationError(
                "scope",
                resolved,
                "a scope naming the dimension of one of the guard's budgets "
                f"({', '.join(sorted({b.per for b in self.policy.budgets})) or '-'})",
            )
        return statuses[0]


def _alerts(line: Line) -> tuple[Alert, ...]:
    """Return the warn and webhook thresholds of a line's budgets, each marked.

    A threshold fires on a call made when ``used >= at * limit``, once: the
    ledger claims its marker. Budgets share a line (unnamed ones on one
    dimension), and a budget may hold several thresholds at one ratio, so the
    marker names the budget's label and, past the first, the threshold's rank
    among those with the same label, action and ratio: the same in every
    process with the same policy (a callback's ``id()`` is not).
    """
    alerts: list[Alert] = []
    seen: dict[tuple[str, str, float], int] = {}
    for b in line.budgets:
        for t in b.thresholds:
            if t.action not in {"warn", "webhook"}:
                continue
            ident = (b.label, t.action, t.at)
            rank = seen[ident] = seen.get(ident, -1) + 1
            marker = f"{line.key}#{b.label}#{t.action}@{t.at}"
            if rank:
                marker += f"#{rank}"
            alerts.append(Alert(marker, t.ceil_of(b.limit) - 1, b, t))
    return tuple(alerts)


def _amount(amount: int, unit: Unit) -> Decimal | int:
    return Decimal(amount) / MICROS_PER_USD if unit == "usd" else amount


def _violations(
    lines: tuple[Line, ...], plan: list[ReserveItem], before: Mapping[str, KeyState]
) -> tuple[Violation, ...]:
    """Name the budgets the requested model did not fit (all, if none stands out)."""
    pairs = list(zip(lines, plan, strict=True))
    over = [
        (line, item)
        for line, item in pairs
        if before.get(line.key, _ZERO).used + item.amount > line.limit
        or item.gate is not None
    ]
    return tuple(
        _violation(line, item, before.get(line.key, _ZERO))
        for line, item in over or pairs
    )


def _violation(line: Line, item: ReserveItem, state: KeyState) -> Violation:
    b = min(line.budgets, key=lambda budget: budget.limit)  # the one that binds
    return Violation(
        budget=b.label,
        dimension=b.per,
        key=line.key,
        used=state.used,
        requested=item.amount,
        limit=line.limit,
        unit=line.unit,
    )


def _check_estimate(estimate: object) -> None:
    """Refuse what ``Guard.begin`` cannot reserve for (it would fail halfway)."""
    if not isinstance(estimate, Estimate):
        kind = type(estimate).__qualname__
        raise UsageError(
            f"Guard.begin takes an allowance.Estimate, not {kind}",
            value=estimate,
            expected="Estimate(provider, model, input_tokens, output_tokens)",
        )


# Guards holding charges their ledger failed to take: the next call or
# ``close()`` writes them; at the latest, the process's exit does.
_buffered: weakref.WeakSet[Guard] = weakref.WeakSet()


def _flush_all() -> None:
    """Write every guard's held charges before the process ends; say what is lost."""
    for guard in list(_buffered):
        try:
            guard._flush_pending()
        except Exception:  # at exit: say it, and go on to the next
            logger.exception("allowance: writing held charges at exit failed")
        lost = sum(op.name == "commit" for op in guard._pending)
        if lost:  # a hold not given back ends with its lease
            logger.error(
                "allowance: ledger %s: %d charges held in memory could not be"
                " written before exit; they are lost",
                guard._describe_ledger(),
                lost,
            )


at_exit(_flush_all, priority=1)  # before the write-behind ledgers close
