# ruff: noqa: S101, PLR2004 - a test suite: asserts and literal expectations
"""The behaviour every adapter shows, through its real framework or SDK.

Subclass ``AdapterConformance`` in a test module, name the adapter and say how
to make one model call through it against the fake provider::

    from allowance.testing.conformance import AdapterConformance

    class TestChatOpenAI(AdapterConformance):
        adapter = "langchain"
        underlying = ("openai",)   # the SDK adapter beneath, if any

        def make_call(self, fake, *, model, max_tokens):
            llm = ChatOpenAI(base_url=fake.openai_base_url, api_key="test",
                             model=model, max_tokens=max_tokens)
            return llm.invoke("Say hello.")

Every test runs with the adapter installed alone and, when ``underlying`` is
set, with the SDK adapters beneath it too: one call is charged once either way.
Overriding a test to skip it fails ``test_no_overrides_DO_NOT_OVERRIDE``: mark
the override ``@pytest.mark.xfail(reason="...")`` instead, saying why.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

import allowance
from allowance import plugins
from allowance.testing._fake_models import FakeReply, FakeUsage
from allowance.testing._suite import unmarked_overrides

if TYPE_CHECKING:
    from collections.abc import Iterator

    from allowance.testing._fake_provider import FakeProvider
    from allowance.typing import CallRecord

__all__ = ["AdapterConformance"]

_MAX_TOKENS = 16


class AdapterConformance:
    """What every adapter must show; subclasses set ``adapter`` and ``make_call``.

    Attributes:
        adapter: The adapter's registered name.
        underlying: Names of SDK adapters the framework calls through (their
            layer charges, the adapter attributes): tested on and off.
        model: The model ``make_call`` is asked to use.
        blocks_before_request: False for adapters that can only observe (then
            blocking must come from ``underlying``).
        blocked_errors: What a refused call raises through the framework.
    """

    adapter: ClassVar[str]
    underlying: ClassVar[tuple[str, ...]] = ()
    model: ClassVar[str] = "gpt-4o-mini"
    blocks_before_request: ClassVar[bool] = True
    blocked_errors: ClassVar[tuple[type[BaseException], ...]] = (
        allowance.BudgetExceeded,
    )

    fake: FakeProvider

    # -- what subclasses provide ----------------------------------------------

    def make_call(self, fake: FakeProvider, *, model: str, max_tokens: int) -> Any:
        """Make one model call through the adapter's framework. Must override."""
        msg = (
            f"{type(self).__name__} must implement make_call(fake, model=, max_tokens=)"
        )
        raise NotImplementedError(msg)

    # -- fixtures -------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _conformance_fake(self, fake_provider: FakeProvider) -> Iterator[None]:
        self.fake = fake_provider
        try:
            yield
        finally:
            allowance.unpatch()

    @classmethod
    def pytest_generate_tests(cls, metafunc: pytest.Metafunc) -> None:
        """Run each test with the adapter alone and with the SDK adapters beneath."""
        if "layers" not in metafunc.fixturenames:
            return
        alone = (cls.adapter,)
        options = [alone, (*alone, *cls.underlying)] if cls.underlying else [alone]
        ids = ["alone", "with-sdk"][: len(options)]
        metafunc.parametrize("layers", options, ids=ids)

    def install(self, layers: tuple[str, ...], **options: Any) -> allowance.Guard:
        """``allowance.patch`` with ``layers`` on a fresh memory ledger."""
        options.setdefault("ledger", "memory://")
        return allowance.patch(adapters=list(layers), **options)

    def call(self) -> Any:
        """One call with the suite's model and output cap."""
        return self.make_call(self.fake, model=self.model, max_tokens=_MAX_TOKENS)

    @staticmethod
    def records(guard: allowance.Guard) -> list[CallRecord]:
        """The guard's call log."""
        return guard.ledger.calls()

    # -- the guard ------------------------------------------------------------

    def test_no_overrides_DO_NOT_OVERRIDE(self) -> None:  # noqa: N802 - a warning sign
        """No conformance test is overridden or deleted without ``xfail(reason=...)``.

        If this fails: remove the override, or mark it
        ``@pytest.mark.xfail(reason="...")`` saying why the adapter differs.
        """
        problems = unmarked_overrides(AdapterConformance, type(self))
        assert not problems, "; ".join(problems)

    # -- the behaviour --------------------------------------------------------

    def test_is_registered_and_available(self) -> None:
        """The adapter is found through the plugin manager and is available.

        If this fails: the entry point (group ``allowance``) or ``available()``.
        """
        adapter = plugins.adapters()[self.adapter]
        assert adapter.available()

    def test_install_is_idempotent_and_uninstall_stops_charging(
        self, layers: tuple[str, ...]
    ) -> None:
        """Installing twice charges a call once; after ``unpatch`` nothing is charged.

        If this fails: a repeat install wrapped twice, or uninstall left a hook.
        """
        self.install(layers, budget=100_000)
        guard = self.install(layers, budget=100_000)
        self.call()
        assert len(self.records(guard)) == 1
        allowance.unpatch()
        self.call()
        assert len(self.records(guard)) == 1

    def test_one_call_one_charge_with_the_provider_usage(
        self, layers: tuple[str, ...]
    ) -> None:
        """A call is logged once, charged the usage the provider reported.

        If this fails: two layers both charged the call, or usage was estimated
        where the provider's figures were available.
        """
        self.fake.usage = FakeUsage(input_tokens=42, output_tokens=7)
        guard = self.install(layers, budget=100_000)
        self.call()
        (record,) = self.records(guard)
        assert (record.usage.input_tokens, record.usage.output_tokens) == (42, 7)
        assert record.outcome == "ok"
        assert self.adapter in record.adapters
        (status,) = guard.status()
        assert (status.spent, status.reserved) == (49, 0)

    def test_blocks_before_any_request(self, layers: tuple[str, ...]) -> None:
        """A call that fits no budget raises and sends nothing.

        If this fails: the adapter raised too late (after the request), or its
        framework swallowed the error.
        """
        if not self.blocks_before_request and layers == (self.adapter,):
            pytest.skip("this adapter only observes; blocking needs the SDK beneath")
        self.install(layers, budget=1)
        with pytest.raises(self.blocked_errors):
            self.call()
        assert self.fake.generation_count == 0

    def test_releases_the_reservation_on_a_provider_error(
        self, layers: tuple[str, ...]
    ) -> None:
        """An HTTP 500 charges nothing and holds nothing.

        If this fails: the error path did not release the reservation.
        """
        guard = self.install(layers, budget=100_000)
        self.fake.enqueue(*[FakeReply(status=500)] * 5)
        with pytest.raises(Exception):  # noqa: B017, PT011 - the framework's own error type
            self.call()
        (status,) = guard.status()
        assert (status.spent, status.reserved) == (0, 0)

    def test_scope_is_attributed_across_threads(self, layers: tuple[str, ...]) -> None:
        """``allowance.scope`` reaches calls made in copied-context threads.

        If this fails: the adapter runs the call outside the caller's context.
        """
        guard = self.install(layers, budget=100_000)
        with allowance.scope(tenant="acme"), ThreadPoolExecutor(2) as pool:
            ctx = contextvars.copy_context()
            pool.submit(ctx.run, self.call).result(timeout=30)
        (record,) = self.records(guard)
        assert record.scope["tenant"] == "acme"

    def test_concurrent_calls_never_overspend(self, layers: tuple[str, ...]) -> None:
        """12 concurrent calls against a budget that fits 4: exactly 4 are sent.

        If this fails: admission is not atomic (check-then-add), or commits free
        budget that in-flight calls then take.
        """
        probe = self.install(layers, budget=100_000)
        self.call()
        worst = self.records(probe)[0].estimate_tokens
        allowance.unpatch()
        sent_before = self.fake.generation_count
        self.fake.usage = FakeUsage(
            input_tokens=worst - _MAX_TOKENS, output_tokens=_MAX_TOKENS
        )
        guard = self.install(layers, budget=4 * worst)

        def one() -> bool:
            try:
                self.call()
            except self.blocked_errors:
                return False
            return True

        with ThreadPoolExecutor(12) as pool:
            futures = [
                pool.submit(contextvars.copy_context().run, one) for _ in range(12)
            ]
            admitted = sum(f.result(timeout=60) for f in futures)
        assert admitted == 4
        assert self.fake.generation_count - sent_before == 4
        (status,) = guard.status()
        assert status.spent <= status.limit
        assert status.reserved == 0

    def test_a_failing_observer_never_breaks_a_call(
        self, layers: tuple[str, ...]
    ) -> None:
        """An event observer that raises is logged; the call succeeds and is charged.

        If this fails: observer exceptions leak into the call path.
        """

        class Broken:
            @allowance.hookimpl
            def allowance_event(self, event: allowance.Event) -> None:
                raise RuntimeError(event.kind)

        broken = Broken()
        plugins.register(broken)
        try:
            guard = self.install(layers, budget=100_000)
            self.call()
        finally:
            plugins.unregister(broken)
        assert len(self.records(guard)) == 1
