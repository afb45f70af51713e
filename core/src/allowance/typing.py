"""Public types and extension protocols: what plugin and ledger authors build on.

Amounts are integers everywhere: micro-dollars (``*_micros``) for USD counters,
tokens for token counters. Token counts follow one convention, whatever the
provider reports: ``input_tokens`` *includes* cache reads and cache writes
(OpenAI's and genai-prices' rule; Anthropic's raw figures are folded in by its
codec), and ``output_tokens`` includes reasoning tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from allowance._errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from allowance._guard import Guard

__all__ = [
    "Adapter",
    "CallRecord",
    "Estimate",
    "Event",
    "KeyState",
    "Ledger",
    "Outcome",
    "ProviderCodec",
    "ReserveItem",
    "ReserveResult",
    "StreamAccumulator",
    "Unit",
    "Usage",
]

Unit = Literal["usd", "tokens"]
"""What a budget counts: micro-dollars or tokens."""

Outcome = Literal[
    "ok",  # the provider answered; actual usage committed
    "degraded",  # answered by the fallback model
    "blocked",  # refused before sending (on_limit="raise")
    "stopped",  # refused before sending; a synthetic response was returned
    "warned",  # over budget but let through (on_limit="warn")
    "error",  # the provider call failed; the reservation was released
    "partial",  # a stream cut short; what was produced was committed
    "unmetered",  # the response carried no usage; the reservation was kept whole
]
"""How a call ended, as written in the call log."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one call, normalised across providers.

    Attributes:
        input_tokens: All input tokens, cache reads and writes included.
        output_tokens: All output tokens, reasoning included.
        cache_read_tokens: Input tokens served from the provider's cache.
        cache_write_tokens: Input tokens written to the provider's cache.
        reasoning_tokens: Output tokens spent on hidden reasoning.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    __module__ = "allowance.typing"

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens: what a token budget is charged."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Estimate:
    """The worst case of a call, computed before it is sent.

    Attributes:
        provider: The provider id (``"openai"``, ``"anthropic"``, ...).
        model: The model asked for.
        input_tokens: An upper bound of the input tokens.
        output_tokens: The output cap (the request's max tokens, or a default).
        exact_input: True when ``input_tokens`` was counted by a tokenizer
            rather than bounded.
        price_factor: The multiple of the model's listed price the call may be
            billed at (OpenAI's priority tier: 2, a bound); 1 for most calls.
    """

    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    exact_input: bool = False
    price_factor: int = 1

    __module__ = "allowance.typing"

    def __post_init__(self) -> None:
        """Refuse a bound that is not a token count: it would hold too little."""
        for name in ("input_tokens", "output_tokens"):
            value: object = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(
                    f"estimate {name}", value, "a token count: an int >= 0"
                )
        factor: object = self.price_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ConfigurationError(
                "estimate price_factor", factor, "a price multiple: an int >= 1"
            )

    @property
    def total_tokens(self) -> int:
        """Input bound plus output cap."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class KeyState:
    """One ledger counter: what is committed and what is held by reservations."""

    spent: int = 0
    reserved: int = 0

    __module__ = "allowance.typing"

    @property
    def used(self) -> int:
        """Committed plus reserved: what admission is checked against."""
        return self.spent + self.reserved


@dataclass(frozen=True, slots=True)
class ReserveItem:
    """One counter a reservation draws on.

    Admission rule, for every item of a plan at once:
    ``spent + reserved + amount <= limit`` and, when ``gate`` is set,
    ``spent + reserved <= gate`` (a plan that only applies below a threshold,
    such as "use the expensive model while under 80%").

    Attributes:
        key: The ledger key (see ``allowance.Budget`` for the layout).
        amount: What to hold, in the key's unit.
        limit: The most the key may reach.
        gate: The most the key may already hold for this plan to be chosen.
    """

    key: str
    amount: int
    limit: int
    gate: int | None = None

    __module__ = "allowance.typing"


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """What ``Ledger.reserve`` decided.

    Attributes:
        plan: Index of the first plan admitted, or None when none fit (then
            nothing was reserved).
        before: State of every key named in any plan, before this reservation.
    """

    plan: int | None
    before: Mapping[str, KeyState]

    __module__ = "allowance.typing"

    @property
    def admitted(self) -> bool:
        """True when a plan was admitted and its amounts are now held."""
        return self.plan is not None


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One line of the call log that ``allowance report`` reads.

    Attributes:
        call_id: Unique id of the call (also its reservation id).
        ts: Unix time the call started.
        scope: Dimension -> identifier the call was attributed to.
        provider: Provider id.
        model: The model that answered (the fallback when degraded).
        requested_model: The model the caller asked for.
        usage: Actual usage (estimated for partial streams).
        cost_micros: Cost in micro-dollars, or None when no price is known.
        adapters: Every adapter that saw the call, outermost first.
        outcome: How the call ended.
        estimate_tokens: The worst case that was reserved, in tokens.
        estimate_micros: The worst case that was reserved, in micro-dollars.
        latency_ms: Wall time of the provider call.
    """

    call_id: str
    ts: float
    scope: Mapping[str, str]
    provider: str
    model: str
    requested_model: str
    usage: Usage
    cost_micros: int | None
    adapters: tuple[str, ...]
    outcome: Outcome
    estimate_tokens: int = 0
    estimate_micros: int | None = None
    latency_ms: float = 0.0

    __module__ = "allowance.typing"

    @property
    def missed_estimate(self) -> bool:
        """True when actual tokens exceeded the reserved worst case."""
        return self.usage.total_tokens > self.estimate_tokens > 0


@dataclass(frozen=True, slots=True)
class Event:
    """Something an observer may want to know: a threshold, a block, a charge.

    Attributes:
        kind: ``"admitted"`` (a reservation is held; ``data["ratios"]`` has
            each budget's used ratio), ``"threshold"``, ``"blocked"``
            (``data["violations"]``), ``"over_limit"`` (over a limit and let
            through: ``on_limit="warn"``), ``"degraded"``, ``"committed"``,
            ``"released"`` (both with ``data["held"]``: whether a reservation
            was held), ``"estimate_missed"``, ``"ledger_failure"``.
        budget: Name of the budget concerned, if any.
        scope: The call's scope.
        data: Details (threshold ratio, used, limit, model, record, ...).
    """

    kind: str
    budget: str | None = None
    scope: Mapping[str, str] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)

    __module__ = "allowance.typing"


@runtime_checkable
class Ledger(Protocol):
    """Where budgets are counted. Every backend passes ``LedgerConformance``.

    Semantics every backend keeps:

    - ``reserve`` is atomic and all-or-nothing across keys and processes: it
      admits the first plan whose every item fits (``ReserveItem``), holds its
      amounts under ``reservation_id`` with a lease of ``lease_seconds``, or
      holds nothing.
    - Expired leases are reaped lazily by later writes: their amounts stop
      counting as reserved.
    - ``commit`` moves the reservation's hold to actual spend (``amounts``, per
      key; a key absent from ``amounts`` is charged 0). It is idempotent: a
      second commit or release of the same id changes nothing. A commit after
      the lease expired still charges ``amounts``.
    - ``release`` drops the hold, charging nothing.
    - ``claim`` is a once-only marker: True for the first caller only.
    - Calls are logged with ``record``; ``commit``/``release`` log the record
      they are given in the same transaction.
    """

    url: str

    def reserve(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        *,
        reservation_id: str,
        lease_seconds: float,
    ) -> ReserveResult:
        """Hold the first plan that fits; see the class docstring."""
        ...

    def commit(
        self,
        reservation_id: str,
        amounts: Mapping[str, int],
        *,
        record: CallRecord | None = None,
    ) -> None:
        """Turn a reservation into spend of ``amounts``."""
        ...

    def release(self, reservation_id: str, *, record: CallRecord | None = None) -> None:
        """Drop a reservation without charging it."""
        ...

    def state(self, keys: Iterable[str]) -> dict[str, KeyState]:
        """Return the state of each key (zeros for keys never used)."""
        ...

    def claim(self, marker: str) -> bool:
        """Set a once-only marker; True when this call set it."""
        ...

    def record(self, record: CallRecord) -> None:
        """Append a call to the log without touching any counter."""
        ...

    def calls(
        self, *, since: float | None = None, until: float | None = None
    ) -> list[CallRecord]:
        """Return logged calls with ``since <= ts < until``, oldest first."""
        ...

    def keys(self, prefix: str = "") -> dict[str, KeyState]:
        """Return every counter whose key starts with ``prefix``."""
        ...

    def reset(self, prefix: str = "") -> None:
        """Delete counters, holds and markers whose key starts with ``prefix``."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...

    async def areserve(
        self,
        plans: Sequence[Sequence[ReserveItem]],
        *,
        reservation_id: str,
        lease_seconds: float,
    ) -> ReserveResult:
        """Async twin of ``reserve``; never blocks the event loop."""
        ...

    async def acommit(
        self,
        reservation_id: str,
        amounts: Mapping[str, int],
        *,
        record: CallRecord | None = None,
    ) -> None:
        """Async twin of ``commit``."""
        ...

    async def arelease(
        self, reservation_id: str, *, record: CallRecord | None = None
    ) -> None:
        """Async twin of ``release``."""
        ...

    async def astate(self, keys: Iterable[str]) -> dict[str, KeyState]:
        """Async twin of ``state``."""
        ...

    async def aclaim(self, marker: str) -> bool:
        """Async twin of ``claim``."""
        ...

    async def arecord(self, record: CallRecord) -> None:
        """Async twin of ``record``."""
        ...

    async def aclose(self) -> None:
        """Async twin of ``close``."""
        ...


class StreamAccumulator(Protocol):
    """Collects usage from the events of one stream, as they pass."""

    def observe(self, event: Any) -> bool:
        """Read one event; return False to hide it from the caller."""
        ...

    def usage(self) -> Usage | None:
        """Return the provider's usage if the stream carried it, else None."""
        ...

    def produced_text_bytes(self) -> int:
        """Return how many UTF-8 bytes of output the stream carried so far."""
        ...

    def response_model(self) -> str | None:
        """Return the model the provider said answered, if it said."""
        ...


class ProviderCodec(Protocol):
    """Knows one provider's wire format: estimate, read usage, swap, synthesise."""

    name: str
    """Provider id, as genai-prices knows it (``"openai"``, ``"anthropic"``)."""

    def is_billable(self, path: str) -> bool:
        """Return True for endpoints that generate (and so cost) tokens."""
        ...

    def estimate(self, path: str, body: Mapping[str, Any]) -> Estimate:
        """Return the worst case of the request ``body`` sent to ``path``."""
        ...

    def with_model(self, body: Mapping[str, Any], model: str) -> dict[str, Any]:
        """Return a copy of ``body`` asking for ``model`` instead."""
        ...

    def refine(
        self, path: str, body: Mapping[str, Any], estimate: Estimate
    ) -> Estimate | None:
        """Return ``estimate`` with the input counted exactly, or None if it cannot be.

        Called only when the cheap bound would refuse the call; may take time
        (a tokenizer), must never touch the network.
        """
        ...

    def usage(self, path: str, response: Any) -> Usage | None:
        """Read usage from a parsed response object, or None if it has none."""
        ...

    def response_model(self, response: Any) -> str | None:
        """Return the model the response says answered, if it says."""
        ...

    def stream_accumulator(
        self, path: str, *, hide_usage_only: bool
    ) -> StreamAccumulator:
        """Return a fresh accumulator for one stream of ``path``."""
        ...

    def synthetic_body(
        self, path: str, body: Mapping[str, Any], *, reason: str, call_id: str
    ) -> dict[str, Any]:
        """Return the JSON of a marked, empty response for ``on_limit="stop"``."""
        ...

    def synthetic_sse(
        self, path: str, body: Mapping[str, Any], *, reason: str, call_id: str
    ) -> bytes:
        """Return the server-sent events of a marked, empty stream."""
        ...


class Adapter(Protocol):
    """Puts a framework or SDK under a guard. Registered via ``allowance_adapters``.

    Attributes:
        name: Short name, unique across plugins (``"openai"``, ``"langchain"``).
        requires: PEP 508 requirements of the supported framework versions.
        module: Optional: the module whose import the adapter hooks
            (``"crewai"``). When it is not imported yet, ``patch()`` installs
            the adapter right after the program imports it, so ``patch()``
            never imports a framework the program does not use.
    """

    @property
    def name(self) -> str:
        """Short name, unique across plugins."""
        ...

    @property
    def requires(self) -> tuple[str, ...]:
        """PEP 508 requirements of the supported framework versions."""
        ...

    def available(self) -> bool:
        """Return True when the framework is importable in a supported version."""
        ...

    def install(self, guard: Guard) -> None:
        """Route the framework's calls through ``guard``; a repeat install warns."""
        ...

    def uninstall(self) -> None:
        """Restore exactly what ``install`` changed; a no-op when not installed."""
        ...
