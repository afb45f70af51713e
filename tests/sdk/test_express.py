"""The express lane decides and charges exactly as the general path does.

The express lane (``allowance._sdk._express``) admits and charges the
commonest call in one pass; everything else, and everything unusual after
admission, goes to the general path. Here random scripts of calls run through
the real openai and anthropic SDKs (sync and async) against the fake provider,
once with the lane on and once with both fast ways off (the lane and the
guard's fast begin: every call through the full plan), and must leave the
same ledger counters, call log, responses, errors and threshold events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import uuid
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

import allowance
from allowance import Budget, Threshold, _telemetry
from allowance._sdk import _common, _express
from allowance.testing import FakeProvider, FakeReply, FakeUsage
from allowance.typing import KeyState

from .conftest import CLAUDE, GPT, MINI, Loopback, aw, close, drain

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.filterwarnings("ignore::allowance.BudgetThresholdWarning")

_UNPRICED = {"openai": "gpt-unpriced-test", "anthropic": "claude-unpriced-test"}
_MODELS = {"openai": (MINI, GPT), "anthropic": (CLAUDE,)}
_ID = re.compile(r"[0-9a-f]{12}-\d+")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    """One fake provider for every example (each run enqueues its own replies)."""
    with FakeProvider() as provider:
        yield provider


@dataclass(frozen=True)
class Step:
    """One call of a script."""

    tenant: str
    user: str
    model: str  # "priced" (a model of the SDK's with a price) or "unpriced"
    texts: tuple[str, ...]
    blocks: bool  # content as a list of blocks: not the plain body
    max_tokens: int | None
    temperature: float | None
    raw: bool  # with_raw_response: a raw response to hand on
    reply: FakeReply | None


@dataclass(frozen=True)
class Config:
    """The guard of a script."""

    unit: str
    limit: int | str
    user_limit: int | str | None
    on_limit: str
    window: str | None = None  # the tenant budget's
    block_at: float | None = None  # a "block" threshold on the tenant budget
    warn_at: float | None = None  # a "warn" threshold on both budgets
    degrade_at: float | None = None  # a "degrade" threshold on the tenant budget
    fallback: str | None = None  # the policy's: "priced", "unpriced" or None


_replies = st.one_of(
    st.none(),
    st.builds(FakeReply, status=st.sampled_from([400, 401, 500])),
    st.builds(
        FakeReply,
        usage=st.builds(
            FakeUsage,
            input_tokens=st.integers(5, 3000),
            output_tokens=st.integers(0, 3000),
            cached_tokens=st.integers(0, 5),
        ),
    ),
    st.builds(  # within the worst case of most calls
        FakeReply,
        usage=st.builds(
            FakeUsage, input_tokens=st.integers(1, 30), output_tokens=st.integers(0, 60)
        ),
    ),
    st.just(FakeReply(omit_usage=True)),
    st.just(FakeReply(model="gpt-4o-2024-08-06")),
    st.just(FakeReply(truncate_after=0)),
)

_steps = st.builds(
    Step,
    tenant=st.sampled_from(["a", "b"]),
    user=st.sampled_from(["u", "v"]),
    model=st.sampled_from(["priced", "priced", "priced", "unpriced"]),
    texts=st.lists(st.text(max_size=30), min_size=1, max_size=3).map(tuple),
    blocks=st.sampled_from([False, False, False, True]),
    max_tokens=st.integers(1, 400) | st.none(),
    temperature=st.none() | st.just(0.5),
    raw=st.booleans(),
    reply=_replies,
)

# Half the budgets are far from their limits, half may refuse.
_limits: dict[str, st.SearchStrategy[Any]] = {
    "tokens": st.sampled_from([60, 400, 3000]) | st.just(1_000_000),
    "usd": st.sampled_from(["$0.0001", "$0.002", "$0.05"]) | st.just("$100"),
}
_configs = st.sampled_from(list(_limits)).flatmap(
    lambda unit: st.builds(
        Config,
        unit=st.just(unit),
        limit=_limits[unit],
        user_limit=st.none() | _limits[unit],
        on_limit=st.sampled_from(["raise", "stop", "warn"]),
        window=st.sampled_from([None, None, "month"]),
        block_at=st.sampled_from([None, None, 0.5]),
        warn_at=st.sampled_from([None, None, 0.001, 0.05, 0.3, 0.8]),
        degrade_at=st.sampled_from([None, None, 0.001, 0.05, 0.5]),
        fallback=st.sampled_from([None, None, "priced", "unpriced"]),
    )
)
_FALLBACKS = {
    ("openai", "priced"): "gpt-4.1-nano",
    ("anthropic", "priced"): "claude-3-haiku-20240307",
    **{(sdk, "unpriced"): model for sdk, model in _UNPRICED.items()},
}


def _client(fake: FakeProvider, sdk: str, kind: str) -> Any:
    import anthropic
    import openai

    options: dict[str, Any] = {"api_key": "test", "max_retries": 0, "timeout": 10.0}
    if sdk == "anthropic":
        cls: Any = anthropic.Anthropic if kind == "sync" else anthropic.AsyncAnthropic
        return cls(base_url=fake.anthropic_base_url, **options)
    cls = openai.OpenAI if kind == "sync" else openai.AsyncOpenAI
    return cls(base_url=fake.openai_base_url, **options)


def _guard(
    config: Config, sdk: str, events: list[Any], ledger: str = "memory://"
) -> allowance.Guard:
    warn = (
        []
        if config.warn_at is None
        else [Threshold(config.warn_at, "warn", callback=events.append)]
    )
    thresholds = [*warn]
    if config.block_at is not None:
        thresholds.append(Threshold(config.block_at, "block"))
    if config.degrade_at is not None:
        thresholds.append(Threshold(config.degrade_at, "degrade"))
    budgets = [
        Budget(
            config.limit,
            per="tenant",
            window=config.window,  # type: ignore[arg-type]
            thresholds=thresholds,
        )
    ]
    if config.user_limit is not None:
        budgets.append(Budget(config.user_limit, per="user", thresholds=warn))
    return allowance.Guard(
        budget=budgets,
        ledger=ledger,
        on_limit=config.on_limit,  # type: ignore[arg-type]
        fallback=_FALLBACKS.get((sdk, config.fallback or "")),
        defaults={},
    )


def _request(sdk: str, step: Step) -> dict[str, Any]:
    model = (
        _UNPRICED[sdk]
        if step.model == "unpriced"
        else _MODELS[sdk][len(step.texts) % len(_MODELS[sdk])]
    )
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}] if step.blocks else text,
        }
        for text in step.texts
    ]
    request: dict[str, Any] = {"model": model, "messages": messages}
    if step.max_tokens is not None or sdk == "anthropic":
        request["max_tokens"] = step.max_tokens or 100
    if step.temperature is not None:
        request["temperature"] = step.temperature
    return request


_WARM_UP = Step("", "", "priced", ("hi",), False, 1, None, False, None)


def _answer(result: Any) -> tuple[Any, ...]:
    if hasattr(result, "choices"):
        return ("chat", result.model, result.choices[0].message.content)
    return ("message", result.model, [getattr(b, "text", None) for b in result.content])


async def _run(
    fake: FakeProvider,
    sdk: str,
    kind: str,
    config: Config,
    script: list[Step],
    *,
    lane: Callable[..., _express.Lane | None],
    ledger: str = "memory://",
    metrics: bool = False,
) -> tuple[Any, ...]:
    """Run ``script`` with ``lane`` as the interceptor's ``admit``; what was seen.

    ``_Lanes()`` counts the express lane's admissions; ``_never`` turns it off.
    ``metrics``: OpenTelemetry metrics recorded (an SDK meter provider), and
    what they read at the end returned with the rest.
    """
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    if metrics:
        _telemetry.configure(meter_provider=provider)
    _common.admit = lane
    client = _client(fake, sdk, kind)
    events: list[Any] = []
    guard = _guard(config, sdk, events, ledger)
    if lane is _never:  # the reference: the full plan, not the guard's fast begin
        guard._begin_fast = _never  # type: ignore[method-assign]
    allowance.wrap(client, guard=guard)
    resource = client.chat.completions if sdk == "openai" else client.messages
    seen: list[tuple[Any, ...]] = []
    try:
        # The guard's first call opens its ledger (the general path's work):
        # one outside the script's scopes, so the script's first may go express.
        fake.reset()
        with (
            allowance.scope(tenant="warm-up", user="warm-up"),
            contextlib.suppress(allowance.PricingError),  # an unpriced fallback
        ):
            await aw(resource.create(**_request(sdk, _WARM_UP)))
        for step in script:
            fake.reset()
            if step.reply is not None:
                fake.enqueue(step.reply)
            try:
                with allowance.scope(tenant=step.tenant, user=step.user):
                    if step.raw:
                        raw = await aw(
                            resource.with_raw_response.create(**_request(sdk, step))
                        )
                        result = await aw(raw.parse())
                    else:
                        result = await aw(resource.create(**_request(sdk, step)))
                seen.append(_answer(result))
            except Exception as err:
                seen.append((type(err).__name__, _ID.sub("<id>", str(err))))
    finally:
        _common.admit = _express.admit
        await close(client)
        read = _metrics(reader)
        _telemetry.configure()
        provider.shutdown()
    ledger = guard.ledger
    records = [
        (
            r.scope,
            r.provider,
            r.model,
            r.requested_model,
            r.usage,
            r.cost_micros,
            r.adapters,
            r.outcome,
            r.estimate_tokens,
            r.estimate_micros,
        )
        for r in ledger.calls()
    ]
    counters = ledger.keys()
    guard.close()
    fired = [(e.kind, e.budget, e.scope, e.data) for e in events]
    return tuple(seen), counters, records, guard.estimate_misses, read, fired


def _metrics(reader: InMemoryMetricReader) -> dict[str, list[tuple[Any, ...]]]:
    """Each metric's points as read now: attributes and values, no timestamps."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = [
                    (
                        tuple(sorted((point.attributes or {}).items())),
                        *(
                            (point.count, point.sum, point.min, point.max)
                            if isinstance(point, HistogramDataPoint)
                            else (point.value,)
                        ),
                    )
                    for point in metric.data.data_points
                ]
                found[metric.name] = sorted(points, key=repr)
    return found


def _charged(run: tuple[Any, ...]) -> tuple[Any, ...]:
    """A run's outcome without its counters at zero: the write-behind ledger
    keeps one for a key its slice was granted on and gave back uncharged."""
    seen, counters, records, *rest = run
    charged = {k: v for k, v in counters.items() if v != KeyState()}
    return seen, charged, records, *rest


def _write_behind(tmp_path: Path) -> str:
    """A fresh write-behind ledger whose thread writes (and tops up) at once."""
    return f"sqlite:///{tmp_path / uuid.uuid4().hex}.db?write_behind=0.001"


def _never(*_args: Any, **_kwargs: Any) -> None:
    """The express lane (and the guard's fast begin) turned off: every call
    goes through the full plan, ``Guard._begin_plan``."""


class _Lanes:
    """Counts the calls the express lane admitted, and those it degraded."""

    def __init__(self) -> None:
        self.admitted = 0
        self.degraded = 0

    def __call__(self, *args: Any) -> Any:
        lane = _express.admit(*args)
        if lane is not None:
            self.admitted += 1
            self.degraded += lane.model != lane.requested
        return lane


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    config=_configs,
    script=st.lists(_steps, min_size=1, max_size=6),
    metrics=st.booleans(),
)
def test_the_express_lane_decides_and_charges_as_the_general_path(
    fake: FakeProvider,
    *,
    sdk: str,
    kind: str,
    config: Config,
    script: list[Step],
    metrics: bool,
) -> None:
    """Random calls with the lane on and off: the same responses, errors,
    counters, call log, events and, with OpenTelemetry metrics recorded,
    the same metrics (the lane reports its calls as the general path does)."""
    lanes = _Lanes()
    on = asyncio.run(_run(fake, sdk, kind, config, script, lane=lanes, metrics=metrics))
    off = asyncio.run(
        _run(fake, sdk, kind, config, script, lane=_never, metrics=metrics)
    )
    admitted = lanes.admitted
    event(f"calls admitted by the express lane: {'2+' if admitted > 1 else admitted}")
    event(f"metrics recorded: {metrics}, lane admitted: {min(admitted, 2)}")
    assert on == off


# Thresholds that apply within a few calls: one tenant, short prompts, small
# caps, usage within the worst case, so most calls are admitted.
_threshold_steps = st.builds(
    Step,
    tenant=st.just("a"),
    user=st.sampled_from(["u", "v"]),
    model=st.sampled_from(["priced", "priced", "priced", "unpriced"]),
    texts=st.lists(st.text("abc xyz", max_size=20), min_size=1, max_size=2).map(tuple),
    blocks=st.just(False),
    max_tokens=st.integers(1, 60),
    temperature=st.none(),
    raw=st.sampled_from([False, False, False, True]),
    reply=st.none()
    | st.builds(
        FakeReply,
        usage=st.builds(
            FakeUsage, input_tokens=st.integers(1, 20), output_tokens=st.integers(0, 60)
        ),
    ),
)
_threshold_configs = st.builds(
    Config,
    unit=st.just("tokens"),
    limit=st.sampled_from([300, 1_000]),
    user_limit=st.none() | st.sampled_from([200, 1_000]),
    on_limit=st.sampled_from(["raise", "stop", "warn"]),
    block_at=st.sampled_from([None, 0.9]),
    warn_at=st.sampled_from([None, 0.05, 0.2, 0.5]),
    degrade_at=st.sampled_from([None, 0.1, 0.4]),
    fallback=st.sampled_from([None, "priced", "priced", "unpriced"]),
)


# Past a degrade threshold from the script's second call: most calls degraded,
# the lane's own from the third (``_degraded``), some handed on after sending.
_degraded_steps = _threshold_steps.flatmap(
    lambda step: st.builds(
        replace,
        st.just(step),
        model=st.sampled_from(["priced"] * 5 + ["unpriced"]),
        reply=st.just(step.reply) | st.just(step.reply) | _replies,
    )
)
_degraded_configs = st.sampled_from(["tokens", "usd"]).flatmap(
    lambda unit: st.builds(
        Config,
        unit=st.just(unit),
        limit=st.sampled_from([2_000, 10_000] if unit == "tokens" else ["$0.05"]),
        user_limit=st.sampled_from(
            [None, 5_000] if unit == "tokens" else [None, "$0.02"]
        ),
        on_limit=st.sampled_from(["raise", "stop", "warn"]),
        block_at=st.sampled_from([None, 0.9]),
        warn_at=st.sampled_from([None, 0.002, 0.01, 0.3]),
        degrade_at=st.sampled_from([0.0001, 0.001]),
        fallback=st.sampled_from(["priced", "priced", "priced", "unpriced"]),
    )
)


# What each script of the test below draws: its guard's configs, its calls.
_NEAR_THRESHOLDS: dict[
    str, tuple[st.SearchStrategy[Config], st.SearchStrategy[Any]]
] = {
    "under thresholds": (_threshold_configs, st.lists(_threshold_steps, max_size=8)),
    "past a degrade threshold": (
        _degraded_configs,
        st.lists(_degraded_steps, min_size=3, max_size=10),
    ),
}


@pytest.mark.parametrize("scripts", list(_NEAR_THRESHOLDS))
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), write_behind=st.booleans())
def test_near_thresholds_the_lane_decides_as_the_general_path(
    fake: FakeProvider,
    tmp_path: Path,
    *,
    sdk: str,
    kind: str,
    scripts: str,
    data: st.DataObject,
    write_behind: bool,
) -> None:
    """Warn and degrade thresholds that apply within the script: the lane
    admits below them (``Guard._ceilings``), the general path from them on,
    and past a degrade threshold the lane sends calls to the fallback
    (``_degraded``): the same decisions, charges, call log, responses and
    warnings as the full plan, on the memory ledger, or on the write-behind
    ledger (whose slices know what a key holds as of their last write)
    against the memory ledger."""
    configs, steps = _NEAR_THRESHOLDS[scripts]
    config = data.draw(configs, label="config")
    script = data.draw(steps, label="script")
    # Metrics on the memory ledger only: the write-behind ledger's used ratios
    # are its slices', not the memory ledger's, lane or not.
    metrics = not write_behind and data.draw(st.booleans(), label="metrics")
    lanes = _Lanes()
    ledger = _write_behind(tmp_path) if write_behind else "memory://"
    on = asyncio.run(
        _run(
            fake, sdk, kind, config, script, lane=lanes, ledger=ledger, metrics=metrics
        )
    )
    off = asyncio.run(
        _run(fake, sdk, kind, config, script, lane=_never, metrics=metrics)
    )
    event(f"calls admitted by the express lane: {min(lanes.admitted, 2)}")
    event(f"thresholds fired: {min(len(on[-1]), 2)}")
    degraded = sum(r[2] != r[3] for r in on[2])
    event(f"calls degraded: {min(degraded, 2)}")
    event(f"calls degraded by the express lane: {min(lanes.degraded, 3)}")
    if metrics:
        event(f"metrics recorded, calls the lane degraded: {min(lanes.degraded, 2)}")
    assert _charged(on) == _charged(off)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config=_configs, script=st.lists(_steps, min_size=1, max_size=6))
def test_the_write_behind_ledger_decides_and_charges_as_the_memory_ledger(
    fake: FakeProvider,
    tmp_path: Path,
    *,
    sdk: str,
    kind: str,
    config: Config,
    script: list[Step],
) -> None:
    """The lane on the write-behind ledger (its slices topped up by its thread
    at any moment) against the general path on the memory ledger."""
    lanes = _Lanes()
    url = _write_behind(tmp_path)
    on = asyncio.run(_run(fake, sdk, kind, config, script, lane=lanes, ledger=url))
    off = asyncio.run(_run(fake, sdk, kind, config, script, lane=_never))
    admitted = lanes.admitted
    event(f"calls admitted by the express lane: {'2+' if admitted > 1 else admitted}")
    assert _charged(on) == _charged(off)


# -- the lane is taken where it should be, and handed on where it should -------


class _Hook:
    """A webhook receiver on 127.0.0.1: each POST's JSON body, answered 204."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()

        def answer(_: str, body: bytes) -> tuple[int, bytes]:
            self.received.put(json.loads(body))
            return 204, b""

        self.server = Loopback(answer)
        self.url = f"{self.server.url}/hook"


@pytest.fixture
def hook() -> Iterator[_Hook]:
    """A webhook receiver of the test's own (nothing left retrying after it)."""
    receiver = _Hook()
    yield receiver
    receiver.server.stop()


@pytest.fixture
def lanes(monkeypatch: pytest.MonkeyPatch) -> _Lanes:
    """Count the express lane's admissions (the interceptor's own reference)."""
    counter = _Lanes()
    monkeypatch.setattr(_common, "admit", counter)
    return counter


@pytest.fixture
def handed_on(monkeypatch: pytest.MonkeyPatch) -> list[_express.Lane]:
    """The lane's calls handed to the general path (``Lane.ticket``), in order."""
    lanes: list[_express.Lane] = []
    ticket = _express.Lane.ticket

    def counted(lane: _express.Lane) -> Any:
        lanes.append(lane)
        return ticket(lane)

    monkeypatch.setattr(_express.Lane, "ticket", counted)
    return lanes


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_a_plain_call_takes_the_express_lane(
    fake: FakeProvider, lanes: _Lanes, sdk: str, kind: str
) -> None:
    client = _client(fake, sdk, kind)
    allowance.wrap(client, budget=10_000, ledger="memory://")
    resource = client.chat.completions if sdk == "openai" else client.messages
    fake.reset()
    step = Step(
        "a",
        "u",
        "priced",
        ("hi",),
        False,
        50,
        None,
        False,
        None,
    )
    try:
        for _ in range(2):
            await aw(resource.create(**_request(sdk, step)))
        # The first call opened the ledger (the general path); the second was plain.
        assert lanes.admitted == 1
        first, second = client.allowance.guard.ledger.calls()
        assert second.outcome == first.outcome == "ok"
        assert (second.usage, second.cost_micros) == (first.usage, first.cost_micros)
        record = second
        assert record.adapters == (sdk,)
        assert all(s.reserved == 0 for s in client.allowance.status())
    finally:
        await close(client)


class _Observer:
    """An observer of the events of ``kinds`` (None: of every event)."""

    def __init__(self, kinds: frozenset[str] | None) -> None:
        if kinds is not None:
            self.allowance_event_kinds = kinds
        self.seen: list[str] = []

    @allowance.hookimpl
    def allowance_event(self, event: allowance.Event) -> None:
        self.seen.append(event.kind)


@pytest.mark.parametrize(
    ("kinds", "lane"),
    [(frozenset({"blocked"}), True), (frozenset({"committed"}), False), (None, False)],
    ids=["refusals only", "charges", "every event"],
)
async def test_an_observer_of_refusals_only_leaves_calls_on_the_lane(
    fake: FakeProvider,
    lanes: _Lanes,
    kind: str,
    kinds: frozenset[str] | None,
    *,
    lane: bool,
) -> None:
    """An observer that wants none of a plain call's events (``admitted``,
    ``committed``, ``degraded``) keeps the lane, and still gets the refusal;
    any other observer sends every call the full way, and gets its events."""
    observer = _Observer(kinds)
    allowance.plugins.register(observer)
    client = _client(fake, "openai", kind)
    allowance.wrap(client, budget=250, ledger="memory://")
    step = Step("a", "u", "priced", ("hi",), False, 50, None, False, None)
    try:
        for _ in range(3):
            fake.reset()
            fake.enqueue(FakeReply(usage=FakeUsage(input_tokens=20, output_tokens=50)))
            await aw(client.chat.completions.create(**_request("openai", step)))
        with pytest.raises(allowance.BudgetExceeded):  # 210 spent: ~60 more do not fit
            await aw(client.chat.completions.create(**_request("openai", step)))
    finally:
        allowance.plugins.unregister(observer)
        await close(client)
    # The first call opens the ledger (the general path).
    assert lanes.admitted == (2 if lane else 0)
    if kinds is None:
        assert observer.seen.count("committed") == 3
        assert observer.seen[-1] == "blocked"
    else:
        assert set(observer.seen) <= kinds
        assert observer.seen.count("blocked") == ("blocked" in kinds)
        assert observer.seen.count("committed") == 3 * ("committed" in kinds)


# Ends of an admitted call, and whether the lane hands it to the general path.
# The lane settles a response whose usage fits the worst case itself: parsed,
# raw (``with_raw_response``, as LangChain's ``ChatOpenAI`` asks: parsed and
# cached by the SDK), or from another model (priced at the answering model's
# rates); any other end is handed on.
_UNUSUAL = {
    "error status": (FakeReply(status=500), False, True),
    "connection closed": (FakeReply(truncate_after=0), False, True),
    "no usage": (FakeReply(omit_usage=True), False, True),
    "usage beyond the worst case": (
        FakeReply(usage=FakeUsage(input_tokens=5_000, output_tokens=900)),
        False,
        True,
    ),
    "another model answered": (FakeReply(model="gpt-4o-2024-08-06"), False, False),
    "raw response": (None, True, False),
    "raw response, no usage": (FakeReply(omit_usage=True), True, True),
}


@pytest.mark.parametrize("case", list(_UNUSUAL))
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("metrics", [False, True], ids=["", "metrics"])
def test_each_unusual_end_of_an_express_call_settles_as_the_general_path(
    fake: FakeProvider,
    handed_on: list[_express.Lane],
    case: str,
    kind: str,
    *,
    metrics: bool,
) -> None:
    """Settled by the lane or handed on after the lane held it (and, with
    metrics, reported its admission): the same outcome, charges, call log and
    metrics as the full plan's."""
    reply, raw, hands_on = _UNUSUAL[case]
    script = [Step("a", "u", "priced", ("hi",), False, 50, None, raw, reply)]
    config = Config("tokens", 1_000_000, None, "raise")
    lanes = _Lanes()
    on = asyncio.run(
        _run(fake, "openai", kind, config, script, lane=lanes, metrics=metrics)
    )
    assert lanes.admitted == 1  # the script's call: admitted by the lane
    assert len(handed_on) == hands_on
    off = asyncio.run(
        _run(fake, "openai", kind, config, script, lane=_never, metrics=metrics)
    )
    assert on == off
    _, _, records, misses, read, _ = on
    if metrics:  # both calls admitted and settled (or released, on an error)
        assert read["allowance.reservations.held"] == [((), 0)]
        assert read["allowance.budget.used_ratio"]
    assert misses == (case == "usage beyond the worst case")
    outcome = records[-1][7]
    assert outcome == {"error status": "error", "connection closed": "error"}.get(
        case, "unmetered" if "no usage" in case else "ok"
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_a_raw_response_is_settled_in_the_lane(
    fake: FakeProvider, handed_on: list[_express.Lane], sdk: str, kind: str
) -> None:
    """``with_raw_response`` (openai: a ``LegacyAPIResponse``; anthropic 2.x:
    an ``APIResponse`` whose body is read): parsed and charged by the lane,
    as the full plan charges it."""
    script = [Step("a", "u", "priced", ("hi",), False, 50, None, True, None)]
    config = Config("tokens", 1_000_000, None, "raise")
    lanes = _Lanes()
    on = asyncio.run(_run(fake, sdk, kind, config, script, lane=lanes))
    assert (lanes.admitted, handed_on) == (1, [])
    off = asyncio.run(_run(fake, sdk, kind, config, script, lane=_never))
    assert on == off
    assert on[2][-1][7] == "ok"  # the call log's outcome


def _cut_short(_: str, __: bytes) -> tuple[int, bytes]:
    """A provider's answer: 200 with JSON cut short."""
    return 200, b'{"id": "chatcmpl-1", "object": "chat.completion", "choi'


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_a_raw_response_that_does_not_parse_is_charged_in_full(
    monkeypatch: pytest.MonkeyPatch,
    handed_on: list[_express.Lane],
    sdk: str,
    kind: str,
) -> None:
    """The lane hands it on; the general path keeps the worst case, as with
    the lane off; ``create`` returns, and the caller's ``parse()`` raises the
    SDK's error (anthropic 2.x: an ``AsyncAPIResponse`` parsed by awaiting)."""
    import anthropic
    import openai

    unreadable = Loopback(_cut_short)
    step = Step("a", "u", "priced", ("hi",), False, 50, None, True, None)
    lanes = _Lanes()
    seen = []
    try:
        for lane in (lanes, _never):
            monkeypatch.setattr(_common, "admit", lane)
            if sdk == "openai":
                cls: Any = openai.OpenAI if kind == "sync" else openai.AsyncOpenAI
                url = f"{unreadable.url}/v1"
            else:
                cls = (
                    anthropic.Anthropic if kind == "sync" else anthropic.AsyncAnthropic
                )
                url = unreadable.url
            client = cls(base_url=url, api_key="test", max_retries=0)
            resource = client.chat.completions if sdk == "openai" else client.messages
            guard = allowance.Guard(budget=10_000, ledger="memory://")
            if lane is _never:
                guard._begin_fast = _never  # type: ignore[method-assign]
            allowance.wrap(client, guard=guard)
            try:
                for _ in range(2):  # the first opens the ledger (the general path)
                    raw = await aw(
                        resource.with_raw_response.create(**_request(sdk, step))
                    )
                    with pytest.raises(json.JSONDecodeError):
                        await aw(raw.parse())
            finally:
                await close(client)
            seen.append(
                (
                    [(r.outcome, r.usage, r.cost_micros) for r in guard.ledger.calls()],
                    [(s.spent, s.reserved) for s in guard.status()],
                )
            )
    finally:
        unreadable.stop()
    assert lanes.admitted == 1
    assert len(handed_on) == 1  # the lane's call, handed on
    assert seen[0] == seen[1]
    records, status = seen[0]
    assert [outcome for outcome, _, _ in records] == ["unmetered"] * 2
    assert status[0][1] == 0  # nothing left held
    assert status[0][0] > 0  # the worst case kept


async def test_calls_the_lane_cannot_take_go_the_general_way(
    fake: FakeProvider, lanes: _Lanes, tmp_path: Path
) -> None:
    client = _client(fake, "openai", "sync")
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"  # holds nothing in memory
    allowance.wrap(client, budget=10_000, ledger=ledger, threshold=0.5)
    fake.reset()
    step = Step("a", "u", "priced", ("hi",), False, 50, None, False, None)
    try:
        for _ in range(2):  # the first call also opens the ledger
            client.chat.completions.create(**_request("openai", step))
        assert lanes.admitted == 0
        assert len(client.allowance.guard.ledger.calls()) == 2
    finally:
        client.close()
        client.allowance.guard.close()


@pytest.mark.parametrize(
    "guard_options",
    [
        {"threshold": 0.1},  # warn at 100 tokens
        {"fallback": MINI, "threshold": 0.1},  # degrade to MINI at 100 tokens
        {"budget": [Budget(1_000, thresholds=[Threshold(0.1, "warn")])]},
        {"webhook": 0.1},  # a webhook threshold, posted to ``hook``
    ],
    ids=["warn", "degrade", "warn-budget", "webhook"],
)
@pytest.mark.parametrize("ledger", ["memory", "write-behind"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_lane_takes_calls_until_a_threshold_applies(
    fake: FakeProvider,
    lanes: _Lanes,
    tmp_path: Path,
    hook: _Hook,
    *,
    guard_options: dict[str, Any],
    kind: str,
    ledger: str,
) -> None:
    """Below a threshold the lane admits; the call that would fire it goes
    the general path (a warning fired once, or a degraded call, lets the
    lane back)."""
    client = _client(fake, "openai", kind)
    webhook = "webhook" in guard_options
    if webhook:
        at = guard_options["webhook"]
        guard_options = {
            "budget": [
                Budget(1_000, thresholds=[Threshold(at, "webhook", to=hook.url)])
            ]
        }
    options: dict[str, Any] = {"budget": 1_000, **guard_options}
    url = (
        "memory://"
        if ledger == "memory"
        else f"sqlite:///{tmp_path / 'wb.db'}?write_behind=0.01"
    )
    allowance.wrap(client, ledger=url, **options)
    step = Step("a", "u", "priced", ("hi",), False, 50, None, False, None)
    admitted: list[int] = []
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always", allowance.BudgetThresholdWarning)
            for _ in range(5):
                fake.reset()  # each call is charged 40 tokens
                fake.enqueue(
                    FakeReply(usage=FakeUsage(input_tokens=20, output_tokens=20))
                )
                before = lanes.admitted
                await aw(client.chat.completions.create(**_request("openai", step)))
                admitted.append(lanes.admitted - before)
                await asyncio.sleep(0.05)  # the write-behind thread's slice
        records = client.allowance.guard.ledger.calls()
    finally:
        await close(client)
        client.allowance.guard.close()
    # Held before each call: 0 (the general path opens the ledger, and asks
    # for the write-behind ledger's slice; in async the second call asks),
    # 40, 80, then 120: over the threshold's 100. The fifth call: a warning
    # fired once lets the lane back, and so does a degraded call (the lane
    # then degrades the next ones itself).
    degrade = "fallback" in guard_options
    second = 0 if ledger == "write-behind" and kind == "async" else 1
    assert admitted == [0, second, 1, 0, 1]
    assert [r.model for r in records] == [GPT] * 3 + [MINI if degrade else GPT] * 2
    warnings_issued = [
        w for w in warned if issubclass(w.category, allowance.BudgetThresholdWarning)
    ]
    assert len(warnings_issued) == (0 if degrade or webhook else 1)
    if webhook:  # posted once, as the warning is issued once
        assert hook.received.get(timeout=5)["data"]["action"] == "webhook"
    assert hook.received.empty()


def test_after_a_degraded_call_the_lane_degrades_until_one_is_made_as_asked(
    fake: FakeProvider, lanes: _Lanes
) -> None:
    """After a degraded call, the lane sends the next ones of its scope to
    the fallback while the gate stays closed; once it opens (here, after a
    reset), the call goes the full plan, which admits it as asked and sends
    the next ones back to the lane as asked."""
    client = _client(fake, "openai", "sync")
    allowance.wrap(
        client, budget=1_000, fallback=MINI, threshold=0.1, ledger="memory://"
    )
    step = Step("a", "u", "priced", ("hi",), False, 50, None, False, None)
    admitted: list[int] = []
    models: list[str] = []
    try:
        for n in range(7):
            if n == 5:
                client.allowance.guard.ledger.reset()
            fake.reset()
            fake.enqueue(FakeReply(usage=FakeUsage(input_tokens=20, output_tokens=20)))
            before = lanes.admitted
            models.append(
                client.chat.completions.create(**_request("openai", step)).model
            )
            admitted.append(lanes.admitted - before)
    finally:
        client.close()
        client.allowance.guard.close()
    # 0, 40, 80 held: as asked; 120, 160: degraded (the second by the lane);
    # reset: 0, then 40.
    assert models == [GPT] * 3 + [MINI] * 2 + [GPT] * 2
    assert admitted == [0, 1, 1, 0, 1, 0, 1]
    assert lanes.degraded == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_streams_use_the_write_behind_slice(
    fake: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Streams (not the lane's calls) hold and settle on the process's slice:
    only a call the slice cannot cover reserves on the file."""
    from allowance._ledger import WriteBehindLedger

    reserves: list[str] = []
    reserve = WriteBehindLedger.reserve

    def counting(self: WriteBehindLedger, *args: Any, **kwargs: Any) -> Any:
        reserves.append(kwargs["reservation_id"])
        return reserve(self, *args, **kwargs)

    monkeypatch.setattr(WriteBehindLedger, "reserve", counting)
    client = _client(fake, "openai", kind)
    url = f"sqlite:///{tmp_path / 'wb.db'}?write_behind=0.01"
    allowance.wrap(client, budget=100_000, ledger=url)
    fake.reset()
    step = Step("a", "u", "priced", ("hi",), False, 50, None, False, None)
    try:
        for _ in range(6):
            stream = await aw(
                client.chat.completions.create(**_request("openai", step), stream=True)
            )
            await drain(stream)
            await asyncio.sleep(0.05)  # the thread takes the slice asked for
        # The first call asks for a slice (async: the first call opens the
        # ledger on the general path, the second asks).
        assert len(reserves) == (1 if kind == "sync" else 2)
        records = client.allowance.guard.ledger.calls()
        assert [r.outcome for r in records] == ["ok"] * 6
        assert all(s.reserved == 0 for s in client.allowance.status())
    finally:
        await close(client)
        client.allowance.guard.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_degraded_calls_hold_on_the_write_behind_slice(
    fake: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Past a degrade threshold, calls go to the fallback and are held and
    charged on the process's slice: neither their reserve nor their commit
    reaches the file."""
    from allowance._ledger import SQLiteLedger

    through_file: list[str] = []
    reserve, commit = SQLiteLedger.reserve, SQLiteLedger.commit

    def counting_reserve(self: SQLiteLedger, *args: Any, **kwargs: Any) -> Any:
        through_file.append("reserve")
        return reserve(self, *args, **kwargs)

    def counting_commit(self: SQLiteLedger, *args: Any, **kwargs: Any) -> Any:
        through_file.append("commit")
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(SQLiteLedger, "reserve", counting_reserve)
    monkeypatch.setattr(SQLiteLedger, "commit", counting_commit)
    client = _client(fake, "openai", kind)
    url = f"sqlite:///{tmp_path / 'wb.db'}?write_behind=0.01"
    # A gate at 100 of 100,000 tokens: the calls after the first two degrade.
    allowance.wrap(client, budget=100_000, fallback=MINI, threshold=0.001, ledger=url)
    step = Step("a", "u", "priced", ("hi",), False, 50, None, False, None)
    models: list[str] = []
    try:
        for n in range(8):
            if n == 4:  # the slice and what the file holds beyond it are known
                through_file.clear()
            fake.reset()
            fake.enqueue(FakeReply(usage=FakeUsage(input_tokens=30, output_tokens=30)))
            response = await aw(
                client.chat.completions.create(**_request("openai", step))
            )
            models.append(response.model)
            await asyncio.sleep(0.03)  # the thread writes and tops up
        assert models == [GPT] * 2 + [MINI] * 6
        assert through_file == []
        client.allowance.guard.ledger.flush()
        records = client.allowance.guard.ledger.calls()
        assert [r.model for r in records] == models
        assert [r.requested_model for r in records] == [GPT] * 8
        assert client.allowance.status()[0].spent == 8 * 60
    finally:
        await close(client)
        client.allowance.guard.close()
