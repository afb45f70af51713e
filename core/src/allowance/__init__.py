"""allowance: keep AI agents inside their budgets.

Token or dollar budgets per session, tenant, user, run or agent, enforced before
the request reaches the provider, on one shared ledger.

Example:
    >>> import allowance, openai
    >>> client = allowance.wrap(openai.OpenAI(), budget="$2.00")
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING

from allowance._budget import Budget, BudgetStatus, Threshold
from allowance._errors import (
    AdapterUnavailableError,
    AllowanceError,
    AllowanceWarning,
    BudgetExceeded,
    BudgetThresholdWarning,
    ConfigurationError,
    LedgerError,
    LedgerUnavailableError,
    PluginError,
    PricingError,
    UsageError,
    Violation,
)
from allowance._guard import Guard
from allowance._ledger import open_ledger
from allowance._policy import Policy
from allowance._pricing import prices
from allowance._scope import budget, current_scope, scope, seen_by
from allowance._ticket import Ticket
from allowance._wrap import (
    ClientAllowance,
    active_guard,
    of,
    patch,
    unpatch,
    unwrap,
    wrap,
)
from allowance.plugins import hookimpl
from allowance.typing import CallRecord, Estimate, Event, Usage

if _TYPE_CHECKING:
    __version__: str
else:

    def __getattr__(name: str) -> str:
        """``__version__``, read from the installed metadata on first use.

        Lazily: ``importlib.metadata`` is about a third of the import time.
        (Hidden from type checkers, which would accept any attribute.)
        """
        if name == "__version__":
            from importlib.metadata import version  # noqa: PLC0415

            value = version("allowance")
            globals()["__version__"] = value
            return value
        msg = f"module 'allowance' has no attribute {name!r}"
        raise AttributeError(msg)


__all__ = [
    "AdapterUnavailableError",
    "AllowanceError",
    "AllowanceWarning",
    "Budget",
    "BudgetExceeded",
    "BudgetStatus",
    "BudgetThresholdWarning",
    "CallRecord",
    "ClientAllowance",
    "ConfigurationError",
    "Estimate",
    "Event",
    "Guard",
    "LedgerError",
    "LedgerUnavailableError",
    "PluginError",
    "Policy",
    "PricingError",
    "Threshold",
    "Ticket",
    "Usage",
    "UsageError",
    "Violation",
    "__version__",
    "active_guard",
    "budget",
    "current_scope",
    "hookimpl",
    "of",
    "open_ledger",
    "patch",
    "prices",
    "scope",
    "seen_by",
    "unpatch",
    "unwrap",
    "wrap",
]
