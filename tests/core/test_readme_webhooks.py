"""README, "Webhooks": retries, their statuses and count, and the signed headers.

A guard with a webhook threshold posts to a real HTTP server on 127.0.0.1 from
allowance's own sender thread. Only the first retry delay is shortened (the
README's backoff is exponential from 0.5 s); the number of retries, the
statuses retried and the headers are the shipped defaults.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading

import pytest
from tests.core.conftest import Receiver

import allowance
from allowance import Budget, Estimate, Guard, Policy, Threshold, Usage
from allowance.webhooks import verify_signature


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch):
    """The shipped sender, its first retry delay cut from 0.5 s to 10 ms."""
    sender = allowance._events.webhooks
    monkeypatch.setattr(sender, "backoff", 0.01)
    assert sender.flush()
    return sender


def cross_the_threshold(url: str, **threshold: object) -> None:
    """Spend 60 of 100 tokens, then begin a call: the 50% webhook fires."""
    guard = Guard(
        Policy(
            [
                Budget(
                    100,
                    per="tenant",
                    thresholds=[Threshold(0.5, "webhook", to=url, **threshold)],  # type: ignore[arg-type]
                )
            ]
        ),
        ledger="memory://",
    )
    with allowance.scope(tenant="acme"):
        guard.begin(Estimate("openai", "gpt-4o", 60, 0)).commit(Usage(60, 0))
        guard.begin(Estimate("openai", "gpt-4o", 1, 0)).commit(Usage(1, 0))


@pytest.mark.parametrize("status", [408, 425])
def test_408_and_425_are_retried(receiver: Receiver, quick_backoff, status) -> None:
    """README: retries "on connection errors, 408/425/429 and 5xx"."""
    receiver.statuses = [status]
    cross_the_threshold(receiver.url)
    assert quick_backoff.flush()
    assert len(receiver.bodies) == 2
    ids = {h["x-allowance-event-id"] for h in receiver.headers}
    assert len(ids) == 1


def test_three_retries_by_default(receiver: Receiver, quick_backoff) -> None:
    """README: "3 retries": a receiver that always answers 503 gets 4 POSTs."""
    failed = quick_backoff.failed
    receiver.statuses = [503] * 10
    cross_the_threshold(receiver.url)
    assert quick_backoff.flush()
    assert len(receiver.bodies) == 4
    assert len({h["x-allowance-event-id"] for h in receiver.headers}) == 1
    assert quick_backoff.failed == failed + 1


def test_a_dropped_connection_is_retried(quick_backoff) -> None:
    """README: retried "on connection errors": hang up once, then answer 204."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[bytes] = []

    def serve() -> None:
        for attempt in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                accepted.append(data)
                if attempt == 1:
                    conn.sendall(
                        b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"
                    )
                # attempt 0: close without a word

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sent = quick_backoff.sent
    try:
        cross_the_threshold(f"http://127.0.0.1:{port}/hook")
        assert quick_backoff.flush()
        thread.join(5)
    finally:
        listener.close()
    assert len(accepted) == 2
    assert quick_backoff.sent == sent + 1


def test_the_signature_is_the_hmac_of_timestamp_dot_body(
    receiver: Receiver, quick_backoff
) -> None:
    """README: ``X-Allowance-Signature: sha256=<HMAC-SHA256 of "<ts>.<body>">``."""
    cross_the_threshold(receiver.url, secret="t0p")  # noqa: S106
    assert quick_backoff.flush()
    [body], [headers] = receiver.bodies, receiver.headers
    stamp = headers["x-allowance-timestamp"]
    expected = hmac.new(b"t0p", f"{stamp}.".encode() + body, hashlib.sha256)
    assert headers["x-allowance-signature"] == "sha256=" + expected.hexdigest()
    assert verify_signature("t0p", body, stamp, headers["x-allowance-signature"])
    assert headers["x-allowance-event-id"]
    assert json.loads(body)["kind"]


def test_every_post_carries_an_event_id_even_unsigned(
    receiver: Receiver, quick_backoff
) -> None:
    """README: "and every POST an ``X-Allowance-Event-Id``", secret or not."""
    cross_the_threshold(receiver.url)
    assert quick_backoff.flush()
    [headers] = receiver.headers
    assert headers["x-allowance-event-id"]
    assert "x-allowance-signature" not in headers
    assert "x-allowance-timestamp" not in headers
