"""OpenTelemetry metrics: what allowance records, and how to configure it.

With no OpenTelemetry SDK configured nothing is recorded and nothing is
imported. With one (``opentelemetry.metrics.set_meter_provider``, or
``configure(meter_provider=...)``) the guard records the GenAI semantic
convention histogram ``gen_ai.client.token.usage`` and the ``allowance.*``
metrics (spend, budget used ratio, reservations held, threshold actions, calls
blocked, estimate misses). Scope identifiers (tenant, user, session...) are
never attributes unless you opt in with ``scope_attributes``. Telemetry errors
are logged, never raised into a call.
"""

from __future__ import annotations

from allowance._telemetry import configure

__all__ = ["configure"]
