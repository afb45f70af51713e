"""Policy: which budgets apply and what happens at a limit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, get_args

from allowance._budget import Budget, Threshold, parse_limit
from allowance._errors import ConfigurationError

__all__ = ["Fail", "OnLimit", "Policy", "budgets_from_shorthand", "provider_of"]

OnLimit = Literal["raise", "stop", "warn"]
Fail = Literal["closed", "open"]
_ON_LIMIT: tuple[str, ...] = get_args(OnLimit)
_FAIL: tuple[str, ...] = get_args(Fail)

_OPENAI_PREFIXES = ("gpt-", "o1", "o3", "o4", "chatgpt-", "text-", "davinci", "babbage")
_ANTHROPIC_PREFIXES = ("claude",)


def provider_of(model: str) -> str | None:
    """Guess a model's provider from its name, or None when the name does not tell."""
    name = model.lower().rsplit("/", 1)[-1]
    if name.startswith(_OPENAI_PREFIXES):
        return "openai"
    if name.startswith(_ANTHROPIC_PREFIXES):
        return "anthropic"
    return None


class Policy:
    """The budgets a guard enforces and what it does when a call does not fit.

    Args:
        budgets: ``Budget`` objects; each applies to calls whose scope names its
            dimension. Several apply to one call at once.
        on_limit: ``"raise"`` (default): ``BudgetExceeded`` before any byte is
            sent. ``"stop"``: return a synthetic, empty response of the SDK's own
            type, marked ``allowance-stop`` in its id. ``"warn"``: log, let the
            call through and charge it.
        fallback: The cheaper model ``degrade`` thresholds switch to: one model
            name (used for models of the same provider) or a mapping
            ``{"gpt-4o": "gpt-4o-mini", "*": ...}``. A call whose model does not
            fit is also retried on the fallback before it is blocked.
        fail: ``"closed"`` (default): a ledger failure raises
            ``LedgerUnavailableError`` and nothing is sent. ``"open"``: the call
            goes through, the failure is logged at ERROR, and the charge is kept
            in memory and written once the ledger answers again.
        lease_seconds: How long a reservation holds budget if its process dies
            before committing (default 600 s; longer than any call should take).

    Raises:
        ConfigurationError: Any argument is malformed.

    Example:
        >>> Policy([Budget("$0.50", per="run"), Budget("$20", per="tenant")])
        Policy([Budget("$0.50", per='run'), Budget("$20.00", per='tenant')])
    """

    __module__ = "allowance"
    __slots__ = ("budgets", "fail", "fallback", "lease_seconds", "on_limit")

    def __init__(
        self,
        budgets: Iterable[Budget] = (),
        *,
        on_limit: OnLimit = "raise",
        fallback: str | Mapping[str, str] | None = None,
        fail: Fail = "closed",
        lease_seconds: float = 600.0,
    ) -> None:
        """Validate and store the policy; see the class docstring."""
        if isinstance(budgets, Budget):
            budgets = (budgets,)
        given: object = budgets
        if isinstance(given, str | bytes) or not hasattr(given, "__iter__"):
            raise ConfigurationError(
                "budgets", given, "a list of Budget(...) objects (allowance.Budget)"
            )
        items = tuple(budgets)
        for item in items:
            if not isinstance(item, Budget):
                raise ConfigurationError(
                    "budgets", item, "Budget(...) objects (allowance.Budget)"
                )
        self.budgets: tuple[Budget, ...] = items
        if on_limit not in _ON_LIMIT:
            raise ConfigurationError("on_limit", on_limit, f"one of {_ON_LIMIT}")
        self.on_limit: OnLimit = on_limit
        if fail not in _FAIL:
            raise ConfigurationError("fail", fail, f"one of {_FAIL}")
        self.fail: Fail = fail
        self.fallback = _check_fallback(fallback)
        lease: object = lease_seconds
        if (
            isinstance(lease, bool)
            or not isinstance(lease, int | float)
            or not 0 < lease < 7 * 86400
        ):
            raise ConfigurationError(
                "lease_seconds", lease_seconds, "seconds, more than 0 and under a week"
            )
        self.lease_seconds = float(lease_seconds)

    def __repr__(self) -> str:
        """Show the policy as it would be written (defaults left out)."""
        extra = ""
        if self.on_limit != "raise":
            extra += f", on_limit={self.on_limit!r}"
        if self.fallback is not None:
            extra += f", fallback={self.fallback!r}"
        if self.fail != "closed":
            extra += f", fail={self.fail!r}"
        return f"Policy({list(self.budgets)!r}{extra})"

    def fallback_for(
        self, model: str, provider: str, override: str | None = None
    ) -> str | None:
        """Return the cheaper model to use instead of ``model``, or None.

        A threshold's own ``to`` wins over the policy's ``fallback``. A single
        fallback name applies only to models of the same provider (when the
        names tell), so one policy can guard OpenAI and Anthropic clients.
        """
        target = override
        if target is None:
            fallback = self.fallback
            if fallback is None:
                return None
            if isinstance(fallback, str):
                target = fallback
            else:
                target = fallback.get(model, fallback.get("*"))
            if target is None:
                return None
        if target == model:
            return None
        target_provider = provider_of(target)
        if target_provider is not None and provider not in {target_provider, "azure"}:
            return None
        return target


def _check_fallback(
    fallback: str | Mapping[str, str] | None,
) -> str | Mapping[str, str] | None:
    expected = 'a model name ("gpt-4o-mini") or a mapping {"gpt-4o": "gpt-4o-mini"}'
    if fallback is None:
        return None
    if isinstance(fallback, str):
        if not fallback.strip():
            raise ConfigurationError("fallback", fallback, expected)
        return fallback
    if isinstance(fallback, Mapping):
        items: list[tuple[object, object]] = list(fallback.items())
        for source, target in items:
            if not (
                isinstance(source, str) and isinstance(target, str) and target.strip()
            ):
                raise ConfigurationError("fallback", fallback, expected)
        return dict(fallback)
    raise ConfigurationError("fallback", fallback, expected)


def shorthand_thresholds(
    threshold: float | None, fallback: str | Mapping[str, str] | None
) -> tuple[Threshold, ...]:
    """Turn ``threshold=`` into a threshold: degrade with a fallback, else warn."""
    if threshold is None:
        return ()
    return (Threshold(threshold, "degrade" if fallback is not None else "warn"),)


def budgets_from_shorthand(
    budget: int | str | Budget | Iterable[Budget] | None,
    per: str,
    window: Literal["hour", "day", "week", "month"] | None,
    threshold: float | None,
    fallback: str | Mapping[str, str] | None,
) -> list[Budget]:
    """Build the budgets of ``Guard``/``wrap``/``patch``'s shorthand arguments."""
    thresholds = shorthand_thresholds(threshold, fallback)
    if budget is None:
        if threshold is not None:
            raise ConfigurationError(
                "threshold", threshold, "a budget to take the ratio of (budget=...)"
            )
        return []
    if isinstance(budget, Budget):
        return [budget]
    if isinstance(budget, int | str) and not isinstance(budget, bool):
        parse_limit(budget)
        return [Budget(budget, per=per, window=window, thresholds=thresholds)]
    if isinstance(budget, Iterable):
        items: list[object] = list(budget)
        budgets = [b for b in items if isinstance(b, Budget)]
        if len(budgets) == len(items):
            return budgets
    raise ConfigurationError(
        "budget",
        budget,
        '"$<amount>", an int, "<n>k tokens", a Budget or a list of Budgets',
    )
