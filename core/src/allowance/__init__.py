"""allowance: keep AI agents inside their budgets.

Token or dollar budgets per session, tenant, user, run or agent, enforced before
the request reaches the provider, on one shared ledger.

Example:
    >>> import allowance, openai
    >>> client = allowance.wrap(openai.OpenAI(), budget="$2.00")
"""

from __future__ import annotations

from importlib.metadata import version as _version

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
from allowance._wrap import ClientAllowance, active_guard, patch, unpatch, unwrap, wrap
from allowance.plugins import hookimpl
from allowance.typing import CallRecord, Estimate, Event, Usage

__version__ = _version("allowance")

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
    "open_ledger",
    "patch",
    "prices",
    "scope",
    "seen_by",
    "unpatch",
    "unwrap",
    "wrap",
]
