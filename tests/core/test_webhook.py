"""Webhooks against a real HTTP server on 127.0.0.1: retries, signatures, bounds."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from tests.core.conftest import Receiver

import allowance
from allowance import Budget, Estimate, Guard, Policy, Threshold, Usage
from allowance._events import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookSender,
    verify_signature,
)
from allowance.typing import Event


def event(kind: str = "threshold") -> Event:
    return Event(kind=kind, budget="b", scope={"tenant": "acme"}, data={"at": 0.5})


def sender(**kwargs: Any) -> WebhookSender:
    return WebhookSender(**{"backoff": 0.01, "timeout": 5.0, **kwargs})


def test_a_500_is_retried_with_the_same_event_id(receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    hooks = sender()
    hooks.send(receiver.url, event())
    assert hooks.flush()
    assert len(receiver.received) == 3
    ids = {r.headers[EVENT_ID_HEADER] for r in receiver.received}
    assert len(ids) == 1
    assert (hooks.sent, hooks.retried, hooks.failed) == (1, 2, 0)
    assert receiver.json(2)["data"] == {"at": 0.5}


def test_gives_up_after_the_retries_and_logs(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500] * 10
    hooks = sender(retries=2)
    hooks.send(receiver.url, event())
    assert hooks.flush()
    assert len(receiver.received) == 3
    assert (hooks.sent, hooks.failed) == (0, 1)
    assert "failed after 3 attempts" in caplog.text


def test_a_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.statuses = [400]
    hooks = sender()
    hooks.send(receiver.url, event())
    assert hooks.flush()
    assert len(receiver.received) == 1
    assert hooks.failed == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_delivery(
    receiver: Receiver, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """If this fails with ``sent == 1``: urllib followed a 301, 302 or 303 as
    a GET without the body (the event lost), signature headers and all, to a
    URL never checked."""
    receiver.statuses = [status]
    hooks = sender()
    hooks.send(receiver.url, event(), secret="s3cret")  # noqa: S106
    assert hooks.flush()
    assert len(receiver.received) == 1
    assert (hooks.sent, hooks.failed, hooks.retried) == (0, 1, 0)
    assert f"HTTP {status} (redirect to /elsewhere, not followed)" in caplog.text


def test_a_429_is_retried(receiver: Receiver) -> None:
    receiver.statuses = [429]
    hooks = sender()
    hooks.send(receiver.url, event())
    assert hooks.flush()
    assert len(receiver.received) == 2
    assert hooks.sent == 1


def test_the_payload_is_signed(receiver: Receiver) -> None:
    hooks = sender()
    hooks.send(receiver.url, event(), secret="s3cret")  # noqa: S106
    assert hooks.flush()
    got = receiver.received[0]
    stamp, signature = got.headers[TIMESTAMP_HEADER], got.headers[SIGNATURE_HEADER]
    assert signature.startswith("sha256=")
    assert verify_signature("s3cret", got.body, stamp, signature)
    assert not verify_signature("other", got.body, stamp, signature)
    assert not verify_signature("s3cret", got.body + b" ", stamp, signature)
    assert not verify_signature(
        "s3cret", got.body, stamp, signature, now=float(stamp) + 3600
    )
    assert not verify_signature("s3cret", got.body, "not-a-time", signature)


def test_the_secret_may_come_from_the_environment(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLOWANCE_WEBHOOK_SECRET", "from-env")
    hooks = sender()
    hooks.send(receiver.url, event())
    assert hooks.flush()
    got = receiver.received[0]
    assert verify_signature(
        "from-env",
        got.body,
        got.headers[TIMESTAMP_HEADER],
        got.headers[SIGNATURE_HEADER],
    )


def test_unsigned_without_a_secret(receiver: Receiver) -> None:
    hooks = sender()
    hooks.send(receiver.url, event())
    assert hooks.flush()
    assert SIGNATURE_HEADER not in receiver.received[0].headers


def test_a_full_queue_drops_and_never_blocks(receiver: Receiver) -> None:
    receiver.hold = threading.Event()
    hooks = sender(maxsize=2)
    for _ in range(10):
        hooks.send(receiver.url, event())  # returns at once: the server is stuck
    assert hooks.dropped >= 7
    receiver.hold.set()
    assert hooks.flush()
    assert hooks.sent == 10 - hooks.dropped


def test_a_slow_receiver_times_out(receiver: Receiver) -> None:
    receiver.hold = threading.Event()
    hooks = sender(timeout=0.2, retries=1)
    hooks.send(receiver.url, event())
    assert hooks.flush()
    assert hooks.failed == 1
    assert len(receiver.received) == 2


def test_a_dead_receiver_never_fails_the_call() -> None:
    import socket

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hooks = allowance._events.webhooks
    failed = hooks.failed
    guard = Guard(
        Policy(
            [
                Budget(
                    100,
                    per="tenant",
                    thresholds=[
                        Threshold(0.5, "webhook", to=f"http://127.0.0.1:{port}/x")
                    ],
                )
            ]
        ),
        ledger="memory://",
    )
    old = (hooks.retries, hooks.backoff)
    hooks.retries, hooks.backoff = 1, 0.01
    try:
        with allowance.scope(tenant="acme"):
            guard.begin(Estimate("openai", "gpt-4o", 60, 0)).commit(Usage(60, 0))
            guard.begin(Estimate("openai", "gpt-4o", 1, 0)).commit(Usage(1, 0))
        assert hooks.flush()
    finally:
        hooks.retries, hooks.backoff = old
    assert hooks.failed == failed + 1
    assert guard.spent({"tenant": "acme"}) == 61


def test_a_threshold_signs_with_its_secret(receiver: Receiver) -> None:
    guard = Guard(
        Policy(
            [
                Budget(
                    100,
                    per="tenant",
                    thresholds=[
                        Threshold(0.5, "webhook", to=receiver.url, secret="t0ps3cret")  # noqa: S106
                    ],
                )
            ]
        ),
        ledger="memory://",
    )
    with allowance.scope(tenant="acme"):
        guard.begin(Estimate("openai", "gpt-4o", 60, 0)).commit(Usage(60, 0))
        guard.begin(Estimate("openai", "gpt-4o", 1, 0)).commit(Usage(1, 0))
    assert allowance._events.webhooks.flush()
    got = receiver.received[0]
    assert verify_signature(
        "t0ps3cret",
        got.body,
        got.headers[TIMESTAMP_HEADER],
        got.headers[SIGNATURE_HEADER],
    )
    payload = receiver.json()
    assert payload["kind"] == "threshold"
    assert payload["data"]["used"] == 60


def test_thresholds_at_one_ratio_each_fire_once(
    receiver: Receiver, tmp_path: Any
) -> None:
    """Two webhooks and two warns at one ratio of a budget, two guards on a ledger.

    If this fails with one POST or one warn: the once-only marker named the
    counter, action and ratio only, so the first threshold's claim took the
    second's.
    """
    warned: list[list[int]] = [[], []]
    policy = Policy(
        [
            Budget(
                100,
                per="tenant",
                thresholds=[
                    Threshold(0.8, "webhook", to=receiver.url + "?to=ops"),
                    Threshold(0.8, "webhook", to=receiver.url + "?to=billing"),
                    Threshold(0.5, "warn", callback=lambda e: warned[0].append(1)),
                    Threshold(0.5, "warn", callback=lambda e: warned[1].append(1)),
                ],
            )
        ]
    )
    ledger = f"sqlite:///{tmp_path / 'spend.db'}"
    guards = [Guard(policy, ledger=ledger), Guard(policy, ledger=ledger)]
    with allowance.scope(tenant="acme"), warnings.catch_warnings():
        warnings.simplefilter("ignore", allowance.BudgetThresholdWarning)
        for guard, n in zip((*guards, *guards), (45, 45, 5, 5), strict=True):
            guard.begin(Estimate("openai", "gpt-4o", n, 0)).commit(Usage(n, 0))
    assert allowance._events.webhooks.flush()
    for guard in guards:
        guard.close()
    assert warned == [[1], [1]]
    assert sorted(r.path for r in receiver.received) == [
        "/hook?to=billing",
        "/hook?to=ops",
    ]


def test_budgets_sharing_a_counter_each_fire_their_threshold() -> None:
    """README: unnamed budgets on one dimension share one counter.

    If this fails with the second budget's list empty: its 50% warn had the
    same marker as the first budget's, claimed already.
    """
    fired: list[str | None] = []
    policy = Policy(
        [
            Budget(1000, per="user", thresholds=[Threshold(0.5, "warn", callback=lambda e: fired.append(e.budget))]),
            Budget(1100, per="user", thresholds=[Threshold(0.5, "warn", callback=lambda e: fired.append(e.budget))]),
        ]
    )  # fmt: skip
    guard = Guard(policy, ledger="memory://", scope={"user": "u1"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", allowance.BudgetThresholdWarning)
        for n in (600, 10, 10):
            guard.begin(Estimate("openai", "gpt-4o", n, 0)).commit(Usage(n, 0))
    assert fired == ["1,000 tokens per user", "1,100 tokens per user"]


SENDER_PROCESS = """
import multiprocessing, os, sys
from allowance._events import webhooks
from allowance.typing import Event

url, mode = sys.argv[1:]

def send(who):
    webhooks.send(f"{url}?from={who}", Event("threshold", "b", {}, {}))

if mode == "unsent":
    import allowance._events
    allowance._events._EXIT_FLUSH = 0.1
    send("held")
    sys.exit(0)
if mode != "mp-child":  # the sender's thread starts in the parent
    send("parent")
    assert webhooks.flush(5)
if mode == "fork":  # a child that ends normally: atexit runs
    if os.fork() == 0:
        send("child")
        sys.exit(0)
    os.wait()
else:  # a multiprocessing child ends with os._exit, past atexit
    child = multiprocessing.get_context("fork").Process(target=send, args=("child",))
    child.start()
    child.join()
"""


def run_sender(receiver: Receiver, mode: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", SENDER_PROCESS, receiver.url, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("mode", ["fork", "mp-child", "mp-child-of-a-sender"])
def test_a_forked_child_sends_its_webhooks(receiver: Receiver, mode: str) -> None:
    """If this fails with only the parent's POST: the child inherited the
    parent's sender thread (it does not run there) and never started one, or
    ended by ``os._exit`` without the exit flush."""
    done = run_sender(receiver, mode)
    paths = (
        ["/hook?from=child"]
        if mode == "mp-child"
        else [
            "/hook?from=child",
            "/hook?from=parent",
        ]
    )
    assert sorted(r.path for r in receiver.received) == paths
    assert "not sent" not in done.stderr


def test_events_left_unsent_at_exit_are_logged(receiver: Receiver) -> None:
    receiver.hold = threading.Event()  # the receiver answers only at teardown
    done = run_sender(receiver, "unsent")
    assert "1 webhook events not sent before exit; they are lost" in done.stderr


BAD_URLS: dict[str, Callable[[], object]] = {
    "plain http to a remote host": lambda: Threshold(
        0.5, "webhook", to="http://hooks.example.com/x"
    ),
    "no host": lambda: Threshold(0.5, "webhook", to="https:///x"),
    "empty secret": lambda: Threshold(
        0.5, "webhook", to="https://hooks.example.com/x", secret=""
    ),
}


@pytest.mark.parametrize("make", BAD_URLS.values(), ids=BAD_URLS.keys())
def test_insecure_or_malformed_webhooks_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(allowance.ConfigurationError, match="webhook"):
        make()


def test_http_is_allowed_to_the_loopback_or_when_asked() -> None:
    Threshold(0.5, "webhook", to="http://localhost:8080/x")
    Threshold(0.5, "webhook", to="http://[::1]:8080/x")
    Threshold(0.5, "webhook", to="http://hooks.internal/x", allow_http=True)
    Threshold(0.5, "webhook", to="https://hooks.example.com/x")


def test_the_secret_is_not_shown() -> None:
    threshold = Threshold(0.5, "webhook", to="https://h.example/x", secret="hidden!")  # noqa: S106
    assert "hidden!" not in repr(threshold)
