"""OpenTelemetry metrics, recorded by the guard as its events happen.

Only ``opentelemetry-api`` is needed; without an SDK (no ``MeterProvider`` set)
every instrument is a no-op. The guard asks ``active()`` before building
anything: it is True once a real meter provider is set globally (an SDK's, not
the API's placeholder) or ``configure`` was given one, so a program that does
not use OpenTelemetry pays a dictionary lookup per event, and one that merely
imports it (as CrewAI does) a function call more.

Metrics (GenAI semantic conventions first, then ``allowance.*``):

- ``gen_ai.client.token.usage`` (histogram, ``{token}``): ``gen_ai.token.type``
  (``input``/``output``), ``gen_ai.provider.name``, ``gen_ai.request.model``,
  ``gen_ai.response.model``, ``gen_ai.operation.name``.
- ``allowance.spend`` (counter, ``USD``): cost of answered calls.
- ``allowance.budget.used_ratio`` (gauge, ``1``): committed plus reserved
  spend over the limit, per budget (``allowance.budget.name``), at admission.
- ``allowance.reservations.held`` (observable up-down counter,
  ``{reservation}``): read when metrics are collected, from a count the
  guard keeps (a call admitted before metrics were on, or before
  ``configure``, is not in it); recording it on each admission and
  settlement was a quarter of the OpenTelemetry SDK's work per call.
- ``allowance.threshold.actions`` (counter, ``{action}``): by
  ``allowance.threshold.action`` (``warn``, ``webhook``, ``degrade``).
- ``allowance.calls.blocked`` (counter, ``{call}``): by ``allowance.outcome``.
- ``allowance.estimate.misses`` (counter, ``{call}``).

Scope identifiers (tenant, user, session...) are never attributes unless
opted in with ``configure(scope_attributes=("tenant",))`` or
``ALLOWANCE_OTEL_SCOPE_ATTRIBUTES=tenant,user``: they are unbounded and may be
personal data. Opted-in dimensions appear as ``allowance.scope.<dimension>``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

    from allowance.typing import CallRecord

__all__ = ["active", "configure", "observe"]

logger = logging.getLogger("allowance")

METER_NAME = "allowance"
_SCOPE_ENV = "ALLOWANCE_OTEL_SCOPE_ATTRIBUTES"


class _Instruments:
    """The instruments of one meter, created together."""

    def __init__(self, provider: MeterProvider | None) -> None:
        from opentelemetry import metrics  # noqa: PLC0415 - loaded on first use

        from allowance import __version__  # noqa: PLC0415 - loaded on first use

        meter = (
            provider.get_meter(METER_NAME, __version__)
            if provider is not None
            else metrics.get_meter(METER_NAME, __version__)
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=[
                1,
                4,
                16,
                64,
                256,
                1024,
                4096,
                16384,
                65536,
                262144,
                1048576,
                4194304,
                16777216,
                67108864,
            ],
        )
        self.spend = meter.create_counter(
            "allowance.spend", unit="USD", description="Cost of answered calls."
        )
        self.ratio = meter.create_gauge(
            "allowance.budget.used_ratio",
            unit="1",
            description="Committed plus reserved spend over the limit, at admission.",
        )
        self.held = meter.create_observable_up_down_counter(
            "allowance.reservations.held",
            callbacks=[_observe_held],
            unit="{reservation}",
            description="Reservations admitted and not yet settled.",
        )
        self.actions = meter.create_counter(
            "allowance.threshold.actions",
            unit="{action}",
            description="Threshold actions fired (warn, webhook, degrade).",
        )
        self.blocked = meter.create_counter(
            "allowance.calls.blocked",
            unit="{call}",
            description="Calls refused before they were sent.",
        )
        self.misses = meter.create_counter(
            "allowance.estimate.misses",
            unit="{call}",
            description="Calls whose actual tokens exceeded the reserved worst case.",
        )


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.provider: MeterProvider | None = None
        self.instruments: _Instruments | None = None
        self.scope_attributes: tuple[str, ...] | None = None  # None: from the env
        # Reservations held, by their attributes' items (zeros kept: the series
        # stay); counted afresh for each meter provider, as an instrument's are.
        self.held: dict[tuple[tuple[str, str], ...], int] = {}
        # The calls counted in ``held``, with their key: a call admitted before
        # metrics were on, or before ``configure``, is not taken off at its end.
        self.held_calls: dict[str, tuple[tuple[str, str], ...]] = {}
        self.global_set = False  # a real global meter provider was seen


_state = _State()


def configure(
    *,
    meter_provider: MeterProvider | None = None,
    scope_attributes: Iterable[str] | None = None,
) -> None:
    """Choose the meter provider and the scope dimensions put in attributes.

    Args:
        meter_provider: The provider to record to; default the global one
            (``opentelemetry.metrics.set_meter_provider``).
        scope_attributes: Scope dimensions to add as ``allowance.scope.<dim>``
            attributes (opt in: identifiers are unbounded and may be personal
            data); default ``ALLOWANCE_OTEL_SCOPE_ATTRIBUTES`` (comma-separated),
            else none.

    Example:
        >>> configure(scope_attributes=("tenant",))
    """
    with _state.lock:
        _state.provider = meter_provider
        _state.instruments = None
        _state.held = {}
        _state.held_calls = {}
        _state.scope_attributes = (
            None if scope_attributes is None else tuple(scope_attributes)
        )


def _instruments() -> _Instruments | None:
    found = _state.instruments
    if found is not None:
        return found
    if not active():
        return None  # nobody set up OpenTelemetry: stay free
    with _state.lock:
        if _state.instruments is None:
            _state.instruments = _Instruments(_state.provider)
        return _state.instruments


def _count_held(call_id: str, attributes: dict[str, str]) -> None:
    key = tuple(attributes.items())
    with _state.lock:
        held = _state.held
        held[key] = held.get(key, 0) + 1
        _state.held_calls[call_id] = key


def _uncount_held(call_id: str) -> None:
    with _state.lock:
        key = _state.held_calls.pop(call_id, None)
        if key is not None:
            _state.held[key] -= 1


def _observe_held(_options: CallbackOptions) -> Iterator[Observation]:
    """The observable counter's callback: the reservations held now."""
    from opentelemetry.metrics import Observation  # noqa: PLC0415 - loaded with the SDK

    with _state.lock:
        counts = list(_state.held.items())
    for key, count in counts:
        yield Observation(count, dict(key))


def _scope_attributes(scope: Mapping[str, str]) -> dict[str, str]:
    dims = _state.scope_attributes
    if dims is None:
        dims = _env_dimensions(os.environ.get(_SCOPE_ENV, ""))
    if not dims:
        return {}
    return {f"allowance.scope.{d}": scope[d] for d in dims if d in scope}


@functools.lru_cache(maxsize=8)
def _env_dimensions(text: str) -> tuple[str, ...]:
    """The dimensions named by ``ALLOWANCE_OTEL_SCOPE_ATTRIBUTES`` (parsed once)."""
    return tuple(d.strip() for d in text.split(",") if d.strip())


def _operation(record: CallRecord) -> str:
    return "embeddings" if "embed" in record.model.lower() else "chat"


def _call_attributes(record: CallRecord) -> dict[str, Any]:
    return {
        "gen_ai.provider.name": record.provider,
        "gen_ai.request.model": record.requested_model,
        "gen_ai.response.model": record.model,
        "gen_ai.operation.name": _operation(record),
        **_scope_attributes(record.scope),
    }


def active() -> bool:
    """Return True when metrics may be recorded (cheap: called per event).

    True once ``configure`` was given a provider, or a real meter provider is
    set globally. ``opentelemetry.metrics`` being imported is not enough:
    frameworks import it (CrewAI does) without setting up an SDK, and until
    one is set every instrument is a no-op, so building the events is waste.
    """
    if _state.provider is not None or _state.global_set:
        return True
    metrics = sys.modules.get("opentelemetry.metrics")
    if metrics is None:
        return False
    if type(metrics.get_meter_provider()).__name__ in _NO_OP_PROVIDERS:
        return False
    _state.global_set = True  # OpenTelemetry sets the global provider only once
    return True


_NO_OP_PROVIDERS = frozenset({"_ProxyMeterProvider", "NoOpMeterProvider"})
"""The API's placeholders before an SDK's provider is set (their instruments do
nothing until then)."""


def observe(
    kind: str, budget: str | None, scope: Mapping[str, str], data: Mapping[str, Any]
) -> None:
    """Record one guard event as metrics; never raises (errors are logged)."""
    try:
        inst = _instruments()
        if inst is not None:
            _record(inst, kind, budget, scope, data)
    except Exception:  # telemetry never reaches the caller
        logger.debug("allowance: telemetry failed on %r", kind, exc_info=True)


def _record(  # noqa: C901 - one branch per kind of event
    inst: _Instruments,
    kind: str,
    budget: str | None,
    scope: Mapping[str, str],
    data: Mapping[str, Any],
) -> None:
    if kind in {"committed", "released"}:
        record: CallRecord | None = data.get("record")
        if record is not None and data.get("held"):
            _uncount_held(record.call_id)
        if kind == "released" or record is None:
            return
        attrs = _call_attributes(record)
        inst.tokens.record(
            record.usage.input_tokens, {**attrs, "gen_ai.token.type": "input"}
        )
        inst.tokens.record(
            record.usage.output_tokens, {**attrs, "gen_ai.token.type": "output"}
        )
        if record.cost_micros:
            inst.spend.add(record.cost_micros / 1_000_000, attrs)
    elif kind == "admitted":
        scoped = _scope_attributes(scope)
        if data.get("held"):
            _count_held(str(data.get("call_id")), scoped)
        for name, ratio in data.get("ratios", ()):
            inst.ratio.set(ratio, {"allowance.budget.name": name, **scoped})
    elif kind == "threshold":
        inst.actions.add(1, _action_attributes(budget, scope, str(data.get("action"))))
    elif kind == "degraded":
        inst.actions.add(1, _action_attributes(budget, scope, "degrade"))
    elif kind == "blocked":
        inst.blocked.add(
            1,
            {
                "allowance.outcome": str(data.get("outcome", "blocked")),
                "gen_ai.request.model": str(data.get("model", "")),
                "allowance.budget.name": budget or "",
                **_scope_attributes(scope),
            },
        )
    elif kind == "estimate_missed":
        inst.misses.add(
            1,
            {
                "gen_ai.request.model": str(data.get("model", "")),
                **_scope_attributes(scope),
            },
        )


def _action_attributes(
    budget: str | None, scope: Mapping[str, str], action: str
) -> dict[str, str]:
    attrs = {"allowance.threshold.action": action, **_scope_attributes(scope)}
    if budget:
        attrs["allowance.budget.name"] = budget
    return attrs
