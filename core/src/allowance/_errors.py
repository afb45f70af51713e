"""Exceptions and warnings raised by allowance.

The tree::

    AllowanceError(Exception)
    ├── ConfigurationError(AllowanceError, ValueError)
    ├── BudgetExceeded(AllowanceError)
    ├── LedgerError(AllowanceError)
    │   └── LedgerUnavailableError
    ├── PricingError(AllowanceError, LookupError)
    ├── UsageError(AllowanceError)
    └── PluginError(AllowanceError)
        └── AdapterUnavailableError

    AllowanceWarning(UserWarning)
    └── BudgetThresholdWarning

Every error that is about a value carries it as ``.value`` and says what was
expected in ``.expected``; the message names both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, final

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "AdapterUnavailableError",
    "AllowanceError",
    "AllowanceWarning",
    "BudgetExceeded",
    "BudgetThresholdWarning",
    "ConfigurationError",
    "LedgerError",
    "LedgerUnavailableError",
    "PluginError",
    "PricingError",
    "UsageError",
    "Violation",
]


class AllowanceError(Exception):
    """Base class of every error allowance raises."""

    __module__ = "allowance"


@final
class ConfigurationError(AllowanceError, ValueError):
    """Raised when a budget, policy, threshold, scope, URL or option is malformed.

    Attributes:
        value: The offending value, as given.
        expected: A short description of what would have been accepted.
    """

    __module__ = "allowance"

    def __init__(self, what: str, value: object, expected: str) -> None:
        """Build the error from the name of the setting, its value and the rule."""
        self.what = what
        self.value = value
        self.expected = expected
        shown = repr(value)
        if len(shown) > 80:  # noqa: PLR2004 - keep messages readable for 10 kB values
            shown = f"{shown[:60]}...{shown[-12:]} ({len(shown)} characters)"
        super().__init__(f"{what}={shown}: expected {expected}")


@final
@dataclass(frozen=True, slots=True)
class Violation:
    """One budget that a call would have pushed over its limit.

    Attributes:
        budget: The budget's name.
        dimension: The scope dimension the budget is kept per (``"tenant"``, ...).
        key: The ledger key of the counter (dimension value and window included).
        used: Committed plus reserved spend on that key before the call.
        requested: What the call would have reserved on that key.
        limit: The limit in force for the key (lowered by a ``block`` threshold).
        unit: ``"usd"`` (amounts in micro-dollars) or ``"tokens"``.
    """

    budget: str
    dimension: str
    key: str
    used: int
    requested: int
    limit: int
    unit: Literal["usd", "tokens"]

    __module__ = "allowance"

    def describe(self) -> str:
        """Return a one-line human description of the violation."""
        if self.unit == "usd":
            return (
                f"budget {self.budget!r} ({self.key}): used ${self.used / 1e6:.6f}"
                f" + this call ${self.requested / 1e6:.6f}"
                f" > limit ${self.limit / 1e6:.6f}"
            )
        return (
            f"budget {self.budget!r} ({self.key}): used {self.used} tokens"
            f" + this call {self.requested} > limit {self.limit} tokens"
        )


class BudgetExceeded(AllowanceError):  # noqa: N818 - a signal, named as users say it
    """Raised before a call is sent when it would push a budget over its limit.

    Nothing reached the provider. ``.violations`` lists every budget the call
    did not fit in; ``.model`` is the model that was asked for.
    """

    __module__ = "allowance"

    def __init__(self, violations: Sequence[Violation], *, model: str = "") -> None:
        """Build the error from the budgets that the call would have overspent."""
        self.violations = tuple(violations)
        self.model = model
        detail = "; ".join(v.describe() for v in self.violations) or "no budget fits"
        prefix = f"call to {model!r} blocked: " if model else "call blocked: "
        super().__init__(prefix + detail)


class LedgerError(AllowanceError):
    """Raised when the ledger cannot record or check spend.

    Attributes:
        fail_open: Whether the guard was configured to let calls through on
            ledger failure (then this error is logged, not raised, at call time).
    """

    __module__ = "allowance"

    def __init__(self, message: str, *, fail_open: bool = False) -> None:
        """Build the error with a message and the guard's failure mode."""
        self.fail_open = fail_open
        super().__init__(message)


@final
class LedgerUnavailableError(LedgerError):
    """Raised when the ledger cannot be reached, opened or written at all."""

    __module__ = "allowance"


@final
class PricingError(AllowanceError, LookupError):
    """Raised when a USD budget applies to a model whose price is unknown.

    Never priced at $0: set an override with ``allowance.prices.set(...)`` or
    a fallback with ``allowance.prices.set_default(...)``.
    """

    __module__ = "allowance"

    def __init__(self, model: str, provider: str | None = None) -> None:
        """Build the error naming the model (and provider) without a price."""
        self.value = model
        self.provider = provider
        self.expected = "a model with a known price"
        where = f" (provider {provider!r})" if provider else ""
        super().__init__(
            f"model={model!r}{where}: no price known; a USD budget needs one. "
            f"Set allowance.prices.set({model!r}, input=..., output=...) "
            "(USD per million tokens) or allowance.prices.set_default(...)"
        )


@final
class UsageError(AllowanceError):
    """Raised when the library is used in a way it does not support.

    For example ``allowance.of(client)`` on a client that was never wrapped,
    or wrapping an object that is not a supported SDK client.
    """

    __module__ = "allowance"

    def __init__(
        self, message: str, *, value: object = None, expected: str = ""
    ) -> None:
        """Build the error with a message, the offending value and the rule."""
        self.value = value
        self.expected = expected
        super().__init__(message)


class PluginError(AllowanceError):
    """Raised when plugins conflict (two adapters with one name) or misbehave."""

    __module__ = "allowance"


@final
class AdapterUnavailableError(PluginError):
    """Raised when an adapter the user named is not installed or not supported."""

    __module__ = "allowance"

    def __init__(self, name: str, reason: str) -> None:
        """Build the error naming the adapter and why it cannot be used."""
        self.value = name
        self.expected = "an installed adapter"
        super().__init__(f"adapter={name!r} is unavailable: {reason}")


class AllowanceWarning(UserWarning):
    """Base class of allowance's warnings."""

    __module__ = "allowance"


@final
class BudgetThresholdWarning(AllowanceWarning):
    """Issued when spend crosses a ``warn`` threshold (once per crossing per window)."""

    __module__ = "allowance"
