"""A call between admission and settlement: the ``Ticket`` and its ledger plans.

``Guard.begin`` returns a ``Ticket``; the adapter calls the provider (or not,
when ``stopped``) and settles the ticket exactly once. Like the guard's, the
ticket's logic is written as generators of ledger operations (``Op``) that the
guard's sync and async drivers run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, final

from allowance._errors import PricingError, Violation
from allowance._ledger._write_behind import HOLDING
from allowance.typing import CallRecord, Estimate, Usage

if TYPE_CHECKING:
    from collections.abc import Generator, Mapping

    from allowance._budget import Budget, Threshold
    from allowance._guard import Guard
    from allowance.typing import KeyState, Outcome, Unit

__all__ = [
    "FAILED",
    "NO_LAYOUT",
    "UNKNOWN_HOLD",
    "Alert",
    "Layout",
    "Line",
    "Op",
    "Ticket",
    "crossed_gates",
    "degrading_budget",
]

logger = logging.getLogger("allowance")

_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Layout:
    """The ledger lines of calls in one scope, with what the call path must know."""

    lines: tuple[Line, ...]
    applicable: tuple[Budget, ...]
    valid_until: float
    needs_usd: bool
    alerts: bool  # some budget has a warn or webhook threshold
    degrade_to: str | None  # the first degrade threshold's own target
    degrades: bool = False  # a call may go to a fallback (policy's, or degrade_to)


class Alert(NamedTuple):
    """A warn or webhook threshold of one line's budget."""

    marker: str  # once-only, across processes: ``{key}#{label}#{action}@{at}``
    quiet: int  # the most the key may hold before a call for it not to fire
    budget: Budget
    threshold: Threshold


@dataclass(slots=True)
class Line:
    """One ledger key a call draws on, with the budgets that count it."""

    key: str
    unit: Unit
    budgets: list[Budget]
    limit: int
    gate: int | None = None
    alerts: tuple[Alert, ...] = ()  # the warn/webhook thresholds, in order


def crossed_gates(
    lines: tuple[Line, ...], before: Mapping[str, KeyState]
) -> list[Line]:
    """The lines whose degrade gate a call found crossed, as a reserve judges it.

    ``before``: the lines' keys' states before the call.
    """
    return [
        line
        for line in lines
        if line.gate is not None
        and line.key in before
        and before[line.key].used > line.gate
    ]


def degrading_budget(
    lines: tuple[Line, ...], before: Mapping[str, KeyState]
) -> str | None:
    """The label of the budget whose degrade threshold sends a call elsewhere.

    The first whose gate the call found crossed (``before``: the keys' states
    before it); if none is, the first that degrades.
    """
    gated = crossed_gates(lines, before) or [
        line for line in lines if line.gate is not None
    ]
    for line in gated:
        for budget in line.budgets:
            if any(t.action == "degrade" for t in budget.thresholds):
                return budget.label
    return None


NO_LAYOUT = Layout((), (), -math.inf, needs_usd=False, alerts=False, degrade_to=None)


class Op(NamedTuple):
    """One ledger operation a plan asks its driver to run."""

    name: Literal["reserve", "commit", "release", "claim", "record"]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = _NO_KWARGS


FAILED = object()

UNKNOWN_HOLD: Mapping[str, int] = MappingProxyType({})
"""A ticket's ``reserved`` when its reserve failed under fail="open": the reserve
may have run, its reply lost, so the ledger may hold ``call_id``."""


@final
class Ticket:
    """One admitted (or stopped, or let-through) call, until it is settled.

    Adapters read ``model`` (the model to call: the fallback when degraded) and
    ``stopped`` (return a synthetic response instead of calling), then settle
    with exactly one of ``commit``, ``commit_partial``, ``keep`` or ``release``
    (or their ``a``-prefixed twins). Settling twice does nothing.
    """

    __module__ = "allowance"
    __slots__ = (
        "_guard",
        "_lines",
        "_reserved",
        "adapters",
        "call_id",
        "estimate",
        "estimate_micros",
        "model",
        "price_factor",
        "requested_model",
        "scope",
        "settled",
        "started",
        "stopped",
        "violations",
    )

    def __init__(  # noqa: PLR0917 - built in one place, positionally (hot path)
        self,
        guard: Guard,
        call_id: str,
        scope: Mapping[str, str],
        estimate: Estimate,
        lines: tuple[Line, ...],
        reserved: Mapping[str, int] | None,
        estimate_micros: int | None,
        adapters: tuple[str, ...],
        violations: tuple[Violation, ...] = (),
        stopped: bool = False,  # noqa: FBT001, FBT002
        requested_model: str | None = None,
    ) -> None:
        """Create a ticket; only ``Guard.begin`` does.

        ``estimate`` is the worst case reserved; its model is the model to call
        (the fallback when degraded), ``requested_model`` the one asked for.
        """
        self._guard = guard
        self.call_id = call_id
        self.scope = scope
        self.estimate = estimate
        self.requested_model = requested_model or estimate.model
        self.model = estimate.model
        # An adapter lowers it when the provider served the call at a cheaper
        # tier than the estimate's bound (a priority request served at default).
        self.price_factor = estimate.price_factor
        self._lines = lines
        self._reserved = reserved
        self.estimate_micros = estimate_micros
        self.adapters = adapters
        self.violations = violations
        self.stopped = stopped
        self.settled = False
        self.started = time.time()

    @property
    def degraded(self) -> bool:
        """True when the guard swapped the model for a cheaper one."""
        return self.model != self.requested_model

    @property
    def reserved(self) -> Mapping[str, int]:
        """What this call holds on each ledger key (empty when nothing is held)."""
        return MappingProxyType(dict(self._reserved or {}))

    # -- settling ---------------------------------------------------------------

    def commit(self, usage: Usage, *, response_model: str | None = None) -> None:
        """Charge the actual ``usage`` and return the rest of the reservation.

        A usage with a negative count is not charged (it would credit the
        budget): the reservation is, in full, as for a call without usage.
        """
        # ``_commit_plan`` yields one operation: run it without the driver.
        if self.settled:
            return
        if self._miscounted(usage):
            self.keep()
            return
        op = self._commit_op(usage, response_model, partial=False)
        if not self._settled_in_memory(op):
            self._committed(op, self._guard._run(op))

    async def acommit(self, usage: Usage, *, response_model: str | None = None) -> None:
        """Async twin of ``commit``."""
        if not self.settled and self._miscounted(usage):
            await self.akeep()
            return
        if self._guard.nonblocking_ledger():
            self.commit(usage, response_model=response_model)
            return
        await self._guard._adrive(
            self._commit_plan(usage, response_model, partial=False)
        )

    def _settled_in_memory(self, op: Op) -> bool:
        """Charge ``op`` by the ledger's fast lane, if it has one and holds the call."""
        guard = self._guard
        ledger = guard._ledger
        return (
            type(ledger) in HOLDING
            and op.name == "commit"
            and not guard._observed()
            and ledger.settle(op.args[0], op.args[1], op.kwargs["record"])  # type: ignore[union-attr]  # in HOLDING
        )  # the ledger's fast lane: nothing more to tell anyone

    def commit_partial(
        self, usage: Usage, *, response_model: str | None = None
    ) -> None:
        """Charge what a stream cut short produced (``usage`` as counted so far)."""
        if not self.settled and self._miscounted(usage):
            self.keep()
            return
        self._guard._drive(self._commit_plan(usage, response_model, partial=True))

    async def acommit_partial(
        self, usage: Usage, *, response_model: str | None = None
    ) -> None:
        """Async twin of ``commit_partial``."""
        if not self.settled and self._miscounted(usage):
            await self.akeep()
            return
        await self._guard._adrive(
            self._commit_plan(usage, response_model, partial=True)
        )

    def _miscounted(self, usage: Usage) -> bool:
        """True (and logged) for a usage with a negative count: not a charge."""
        if (
            min(
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens,
                usage.reasoning_tokens,
            )
            >= 0
        ):
            return False
        logger.warning(
            "allowance: call %s reported a negative token count (%r): charged "
            "its reservation in full",
            self.call_id,
            usage,
        )
        return True

    def keep(self, *, outcome: Outcome = "unmetered") -> None:
        """Charge the whole reservation: the usage is unknown (no usage, a timeout)."""
        self._guard._drive(self._keep_plan(outcome))

    async def akeep(self, *, outcome: Outcome = "unmetered") -> None:
        """Async twin of ``keep``."""
        await self._guard._adrive(self._keep_plan(outcome))

    def release(self, *, outcome: Outcome = "error") -> None:
        """Charge nothing: the call failed before the provider did any work."""
        self._guard._drive(self._release_plan(outcome))

    async def arelease(self, *, outcome: Outcome = "error") -> None:
        """Async twin of ``release``."""
        await self._guard._adrive(self._release_plan(outcome))

    # -- plans --------------------------------------------------------------------

    def _outcome(self, partial: bool) -> Outcome:  # noqa: FBT001
        if partial:
            return "partial"
        if self.violations:
            return "warned"
        return "degraded" if self.degraded else "ok"

    def _record(
        self,
        usage: Usage,
        cost: int | None,
        outcome: Outcome,
        model: str | None = None,
    ) -> CallRecord:
        return CallRecord(
            call_id=self.call_id,
            ts=self.started,
            scope=self.scope,
            provider=self.estimate.provider,
            model=model or self.model,
            requested_model=self.requested_model,
            usage=usage,
            cost_micros=cost,
            adapters=self.adapters,
            outcome=outcome,
            estimate_tokens=self.estimate.total_tokens,
            estimate_micros=self.estimate_micros,
            latency_ms=(time.time() - self.started) * 1000.0,
        )

    def _commit_plan(
        self, usage: Usage, response_model: str | None, *, partial: bool
    ) -> Generator[Op, Any, None]:
        if self.settled:
            return
        op = self._commit_op(usage, response_model, partial=partial)
        if not self._settled_in_memory(op):  # nothing to wait for: no yield
            self._committed(op, (yield op))

    def _commit_op(
        self, usage: Usage, response_model: str | None, *, partial: bool
    ) -> Op:
        """Settle this ticket: the operation that charges ``usage`` (not yet run)."""
        self.settled = True
        guard = self._guard
        provider = self.estimate.provider
        cost = guard._cost(provider, response_model, self.model, usage)
        if cost is not None and self.price_factor != 1:
            cost *= self.price_factor
        amounts: dict[str, int] = {}
        total = usage.total_tokens
        for line in self._lines:
            if line.unit == "tokens":
                amounts[line.key] = total
            elif cost is None:  # pragma: no cover - a USD line was priced at begin
                raise PricingError(self.model, provider)
            else:
                amounts[line.key] = cost
        record = self._record(usage, cost, self._outcome(partial), response_model)
        if total > self.estimate.total_tokens:
            guard.estimate_misses += 1
            guard._emit(
                "estimate_missed",
                self.scope,
                {
                    "model": self.model,
                    "estimated_tokens": self.estimate.total_tokens,
                    "actual_tokens": total,
                },
            )
        return self._settle_op("commit", amounts, record)

    def _committed(self, op: Op, result: object) -> None:
        """Finish a commit once its operation ran (``FAILED``: hold the charge)."""
        guard = self._guard
        record: CallRecord = op.kwargs["record"] if op.kwargs else op.args[0]
        if result is FAILED and op.name == "commit":
            guard._keep_for_later(op)
        if guard._observed():
            guard._emit(
                "committed",
                self.scope,
                {"record": record, "held": bool(self._reserved)},
            )

    def _keep_plan(self, outcome: Outcome) -> Generator[Op, Any, None]:
        if self.settled:
            return
        self.settled = True
        guard = self._guard
        amounts = dict(self._reserved or {})
        if not amounts and self._lines:
            # Let through with nothing held (on_limit="warn", fail-open): charge the
            # worst case that was estimated.
            worst = self._worst_amounts()
            amounts = {line.key: worst[line.unit] for line in self._lines}
        record = self._record(
            Usage(self.estimate.input_tokens, self.estimate.output_tokens),
            self.estimate_micros,
            outcome,
        )
        yield from guard._settle(self._settle_op("commit", amounts, record))
        guard._emit(
            "committed", self.scope, {"record": record, "held": bool(self._reserved)}
        )

    def _settle_op(
        self,
        name: Literal["commit", "release"],
        amounts: dict[str, int],
        record: CallRecord,
    ) -> Op:
        """Return the ledger operation that settles this call and logs ``record``."""
        if not self._lines or (
            name == "release"
            and (self._reserved is None or self._reserved is UNKNOWN_HOLD)
        ):
            return Op("record", (record,))  # nothing was held: only log the call
        if name == "release":
            return Op("release", (self.call_id,), {"record": record})
        return Op("commit", (self.call_id, amounts), {"record": record})

    def _worst_amounts(self) -> dict[Unit, int]:
        return {"tokens": self.estimate.total_tokens, "usd": self.estimate_micros or 0}

    def _release_plan(self, outcome: Outcome) -> Generator[Op, Any, None]:
        if self.settled:
            return
        self.settled = True
        record = self._record(Usage(), 0, outcome)
        if self._reserved is UNKNOWN_HOLD:
            # Nothing will settle ``call_id`` now: give back what the lost
            # reserve may hold once the ledger answers (an unknown id: a no-op),
            # rather than at its lease's end, and log the call on its own.
            self._guard._orphaned(self.call_id)
        yield from self._guard._settle(self._settle_op("release", {}, record))
        self._guard._emit(
            "released", self.scope, {"record": record, "held": bool(self._reserved)}
        )
