"""Webhook receivers: check that a POST came from allowance.

With ``Threshold(..., action="webhook", to="https://...", secret="...")`` each
POST carries ``X-Allowance-Timestamp`` and ``X-Allowance-Signature:
sha256=<HMAC-SHA256 of "<timestamp>.<body>">``, and ``X-Allowance-Event-Id``
(the same on every retry of one event).

Example:
    >>> ok = verify_signature(secret, request.body,
    ...                       request.headers["X-Allowance-Timestamp"],
    ...                       request.headers["X-Allowance-Signature"])
"""

from __future__ import annotations

from allowance._events import verify_signature

__all__ = ["verify_signature"]
