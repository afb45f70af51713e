"""Budgets: a limit on one scope dimension, optionally per calendar window.

Ledger key layout (what ``allowance status`` shows)::

    <unit>:<dimension>=<value>[:<window>=<window id>]        e.g.
    usd:tenant=acme:day=2026-11-22
    tokens:session=3f2a9c:month=2026-11
    usd:run=r-17                                             (no window)

A budget with a ``name`` prefixes its keys with ``<name>/`` so that two budgets
on the same dimension, unit and window can keep separate counters; without a
name they share one counter (and the smaller limit wins). Values are
percent-escaped (``%``, ``:``, ``=``, ``/``, ``{``, ``}``, whitespace and
control characters), so a scope value may hold any text. Windows are
calendar-aligned in the budget's time zone (UTC unless told): ``hour``
(``2026-11-22T10``), ``day`` (``2026-11-22``), ``week`` (ISO, ``2026-W47``),
``month`` (``2026-11``); a time zone other than UTC is part of the window name
(``day@Europe/Paris``). A new window is a new key: nothing is reset.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Literal, cast, final, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from allowance._errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from allowance.typing import Event, Unit

__all__ = [
    "NAME_RULE",
    "Budget",
    "BudgetStatus",
    "Threshold",
    "escape_value",
    "format_amount",
    "is_name",
    "parse_limit",
]

Window = Literal["hour", "day", "week", "month"]
Action = Literal["warn", "degrade", "webhook", "block"]

_WINDOWS: tuple[str, ...] = get_args(Window)
_ACTIONS: tuple[str, ...] = get_args(Action)
_LIMIT_EXPECTED = (
    '"$<amount>" (USD, e.g. "$2.00"), an int of tokens (50_000), '
    'or "<n>[k|M] tokens" (e.g. "50k tokens", "1.5M tokens")'
)
_USD = re.compile(r"^\$\s*(\d+(?:\.\d*)?|\.\d+)$")
_TOKENS = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kKmM]?)\s*(?:tokens?)?$")
_DIMENSION = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" admits "\n"
_ESCAPE = re.compile(r"[%:=/{}\s\x00-\x1f\x7f]")
MICROS_PER_USD = 1_000_000
_DECEMBER = 12


NAME_RULE = "a name: a letter or _, then up to 63 letters, digits, _ . -"
"""What ``is_name`` accepts, for error messages."""


def is_name(value: object) -> bool:
    """Return True for a valid dimension or budget name."""
    return isinstance(value, str) and _DIMENSION.fullmatch(value) is not None


def parse_limit(value: object, *, what: str = "budget") -> tuple[int, Unit]:
    """Parse a budget limit into an integer amount and its unit.

    Args:
        value: ``"$2.00"`` (USD), an ``int`` of tokens, or ``"50k tokens"``.
        what: The name of the setting, for error messages.

    Returns:
        ``(amount, unit)``: micro-dollars for ``"usd"``, tokens for ``"tokens"``.

    Raises:
        ConfigurationError: The value is not one of the accepted forms, is
            negative, or has more precision than a micro-dollar or a token.

    Example:
        >>> parse_limit("$2.50")
        (2500000, 'usd')
        >>> parse_limit("1.5M tokens")
        (1500000, 'tokens')
    """
    if isinstance(value, bool) or value is None:
        raise ConfigurationError(what, value, _LIMIT_EXPECTED)
    if isinstance(value, int):
        if value < 0:
            raise ConfigurationError(what, value, "a limit >= 0")
        return value, "tokens"
    if not isinstance(value, str):
        raise ConfigurationError(what, value, _LIMIT_EXPECTED)
    text = value.strip()
    if match := _USD.match(text):
        micros = _scaled(match.group(1), MICROS_PER_USD)
        if micros is None:
            raise ConfigurationError(
                what, value, "a USD amount with at most 6 decimals (micro-dollars)"
            )
        return micros, "usd"
    if match := _TOKENS.match(text):
        scale = {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
        tokens = _scaled(match.group(1), scale)
        if tokens is None:
            raise ConfigurationError(what, value, "a whole number of tokens")
        return tokens, "tokens"
    raise ConfigurationError(what, value, _LIMIT_EXPECTED)


def _scaled(number: str, scale: int) -> int | None:
    try:
        exact = Decimal(number) * scale
    except InvalidOperation:  # pragma: no cover - the regex admits only digits
        return None
    if exact != exact.to_integral_value():
        return None
    return int(exact)


def format_amount(amount: int, unit: Unit) -> str:
    """Format an integer amount for people: ``$1.234567`` or ``12,345 tokens``."""
    if unit == "usd":  # in integers: a float loses micro-dollars past ~$9e9
        dollars, micros = divmod(abs(amount), MICROS_PER_USD)
        cents = f"{micros:06d}".rstrip("0").ljust(2, "0")
        return f"${'-' if amount < 0 else ''}{dollars}.{cents}"
    return f"{amount:,} tokens"


def escape_value(value: str) -> str:
    """Percent-escape a scope value so it is safe inside a ledger key."""
    if not _ESCAPE.search(value):
        return value
    return _ESCAPE.sub(lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), value)


@functools.lru_cache(maxsize=256)
def _ratio(at: float) -> tuple[int, int]:
    """``at`` as the fraction its shortest repr writes (0.29 -> 29/100)."""
    return Decimal(repr(at)).as_integer_ratio()


@dataclass(frozen=True, slots=True)
class Threshold:
    """An action taken when a budget's committed + reserved spend crosses a ratio.

    Args:
        at: The ratio of the limit, ``0 < at <= 1`` (``0.8`` = 80%).
        action: ``"warn"`` (log and call ``callback``), ``"degrade"`` (swap the
            model for ``to``, the cheaper model), ``"webhook"`` (POST the event
            to the URL ``to``, off the call path), ``"block"`` (treat
            ``at * limit`` as the limit).
        to: The fallback model for ``degrade`` (default: the policy's
            ``fallback``), or the URL for ``webhook``; other actions take none.
        callback: Called with the ``Event`` for ``warn`` and ``webhook`` (other
            actions take none); its errors are logged, never raised.
        secret: For ``webhook``: signs each POST with HMAC-SHA256 (headers
            ``X-Allowance-Timestamp`` and ``X-Allowance-Signature:
            sha256=<hex of HMAC(secret, "<timestamp>.<body>")>``); default the
            ``ALLOWANCE_WEBHOOK_SECRET`` environment variable, else unsigned.
        allow_http: For ``webhook``: allow a plain ``http://`` URL to a host
            other than the loopback (``localhost``, ``127.0.0.1``, ``::1``);
            without it such a URL is refused: events carry scope identifiers.

    Warn and webhook fire once per crossing per window (a ledger marker makes
    that hold across processes).

    Raises:
        ConfigurationError: ``at`` is not a ratio, the action is unknown, its
            target is malformed, or an argument is given that the action never
            reads (``to`` for warn or block, ``callback`` for degrade or
            block, ``secret`` or ``allow_http`` without ``webhook``).

    Example:
        >>> Threshold(0.8, "degrade", to="gpt-4o-mini")
        Threshold(at=0.8, action='degrade', to='gpt-4o-mini', callback=None)
    """

    at: float
    action: Action = "warn"
    to: str | None = None
    callback: Callable[[Event], object] | None = field(default=None, compare=False)
    secret: str | None = field(default=None, compare=False, repr=False)
    allow_http: bool = field(default=False, repr=False)

    __module__ = "allowance"

    def __post_init__(self) -> None:
        """Validate the ratio, the action and its target."""
        at: object = self.at
        if (
            isinstance(at, bool)
            or not isinstance(at, int | float)
            or not math.isfinite(at)
            or not 0 < at <= 1
        ):
            raise ConfigurationError("threshold", at, "a ratio 0 < at <= 1 (0.8 = 80%)")
        if self.action not in _ACTIONS:
            raise ConfigurationError(
                "threshold action", self.action, f"one of {', '.join(_ACTIONS)}"
            )
        if self.action == "webhook":
            from allowance._events import check_webhook_url  # noqa: PLC0415

            check_webhook_url(self.to, allow_http=self.allow_http)
            secret: object = self.secret
            if secret is not None and (not isinstance(secret, str) or not secret):
                raise ConfigurationError(
                    "webhook secret", "<hidden>", "a non-empty str"
                )
        if self.action == "degrade" and self.to is not None and not self.to.strip():
            raise ConfigurationError("degrade threshold to", self.to, "a model name")
        if self.callback is not None and not callable(self.callback):
            raise ConfigurationError("threshold callback", self.callback, "a callable")
        self._check_only_for_its_action()

    def floor_of(self, limit: int) -> int:
        """``floor(at * limit)``, exact for the ratio as written (0.29 * 100 = 29).

        Float arithmetic would give 28: 0.29 * 100 is 28.999999999999996.
        """
        num, den = _ratio(self.at)
        return limit * num // den

    def ceil_of(self, limit: int) -> int:
        """``ceil(at * limit)``, exact for the ratio as written."""
        num, den = _ratio(self.at)
        return -(-limit * num // den)

    def _check_only_for_its_action(self) -> None:
        """Refuse an argument the action never reads (it would be ignored)."""
        action = self.action
        if self.to is not None and action not in {"degrade", "webhook"}:
            raise ConfigurationError(
                "threshold to",
                self.to,
                "to only with action='degrade' (a model) or 'webhook' (a URL); "
                f"action={action!r} has no target",
            )
        if self.callback is not None and action not in {"warn", "webhook"}:
            raise ConfigurationError(
                "threshold callback",
                self.callback,
                "callback only with action='warn' or 'webhook'; "
                f"action={action!r} calls none (its calls emit events to plugins)",
            )
        if action != "webhook" and (self.secret is not None or self.allow_http):
            raise ConfigurationError(
                "threshold secret" if self.secret is not None else "allow_http",
                "<hidden>" if self.secret is not None else self.allow_http,
                f"secret and allow_http only with action='webhook', not {action!r}",
            )


@dataclass(frozen=True, slots=True)
class _WindowSpan:
    start: float
    end: float
    label: str


class Budget:
    """A limit on spend per scope dimension, optionally per calendar window.

    Args:
        limit: ``"$2.00"`` (USD), an ``int`` of tokens, or ``"50k tokens"``.
        per: The scope dimension the limit applies to, each identifier on its
            own (``"session"``, ``"tenant"``, ``"user"``, ``"run"``, ``"agent"``,
            or any name). A call whose scope lacks the dimension is not counted.
        window: ``"hour"``, ``"day"``, ``"week"`` or ``"month"``: the limit
            applies per calendar window; None (default) for all time.
        tz: IANA time zone the window is aligned to; UTC by default (no
            effect without ``window``).
        thresholds: ``Threshold`` actions at ratios of the limit.
        name: Keeps this budget's counters apart from other budgets on the same
            dimension, unit and window; also shown in reports and errors.

    Raises:
        ConfigurationError: Any argument is malformed.

    Example:
        >>> Budget("$20", per="tenant", window="day").key({"tenant": "acme"}, 0.0)
        'usd:tenant=acme:day=1970-01-01'
    """

    __module__ = "allowance"
    __slots__ = (
        "_span",
        "_tz",
        "label",
        "limit",
        "name",
        "per",
        "thresholds",
        "tz",
        "unit",
        "window",
    )

    def __init__(
        self,
        limit: int | str,
        *,
        per: str = "session",
        window: Window | None = None,
        tz: str = "UTC",
        thresholds: Iterable[Threshold] = (),
        name: str | None = None,
    ) -> None:
        """Validate and store the budget; see the class docstring."""
        self.limit, self.unit = parse_limit(limit)
        if not is_name(per):
            raise ConfigurationError(
                "per",
                per,
                NAME_RULE,
            )
        self.per = per
        if window is not None and window not in _WINDOWS:
            raise ConfigurationError("window", window, f"None or one of {_WINDOWS}")
        self.window = window
        try:
            self._tz = UTC if tz in {"UTC", "utc", "Z"} else ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError) as err:
            raise ConfigurationError("tz", tz, "an IANA time zone name") from err
        self.tz = "UTC" if self._tz is UTC else tz
        items = tuple(thresholds)
        for item in items:
            if not isinstance(item, Threshold):
                raise ConfigurationError("thresholds", item, "Threshold(...) objects")
        self.thresholds = tuple(sorted(items, key=lambda t: t.at))
        if name is not None and not is_name(name):
            raise ConfigurationError("name", name, NAME_RULE)
        self.name = name
        self.label = name or self._default_label()
        self._span: _WindowSpan | None = None

    def _default_label(self) -> str:
        text = f"{format_amount(self.limit, self.unit)} per {self.per}"
        return f"{text} per {self.window}" if self.window else text

    def __repr__(self) -> str:
        """Show the budget as it would be written."""
        shown = (
            f'"{format_amount(self.limit, "usd")}"'
            if self.unit == "usd"
            else str(self.limit)
        )
        extra = f", window={self.window!r}" if self.window else ""
        extra += f", tz={self.tz!r}" if self.tz != "UTC" else ""
        extra += f", name={self.name!r}" if self.name else ""
        extra += f", thresholds={list(self.thresholds)!r}" if self.thresholds else ""
        return f"Budget({shown}, per={self.per!r}{extra})"

    def applies(self, scope: Mapping[str, str]) -> bool:
        """Return True when the scope names this budget's dimension."""
        return self.per in scope

    def key(self, scope: Mapping[str, str], now: float) -> str:
        """Return the ledger key counting this budget for ``scope`` at ``now``."""
        base = f"{self.unit}:{self.per}={escape_value(scope[self.per])}"
        if self.name:
            base = f"{self.name}/{base}"
        if self.window is None:
            return base
        return f"{base}:{self.window_label(now)}"

    def window_label(self, now: float) -> str:
        """Return ``<window>=<id>`` of the window holding ``now`` (cached)."""
        span = self._span
        if span is None or not span.start <= now < span.end:
            span = self._span = self._compute_span(now)
        return span.label

    def window_end(self, now: float) -> float | None:
        """Return when the window holding ``now`` ends, or None without a window."""
        if self.window is None:
            return None
        self.window_label(now)
        assert self._span is not None  # noqa: S101 - set by window_label
        return self._span.end

    def _compute_span(self, now: float) -> _WindowSpan:
        local = datetime.fromtimestamp(now, self._tz)
        window = cast("Window", self.window)
        if window == "hour":
            start = local.replace(minute=0, second=0, microsecond=0)
            end = start + timedelta(hours=1)
            ident = start.strftime("%Y-%m-%dT%H")
        elif window == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = _next_midnight(start, days=1)
            ident = start.strftime("%Y-%m-%d")
        elif window == "week":
            day = local.replace(hour=0, minute=0, second=0, microsecond=0)
            start = day - timedelta(days=day.weekday())
            end = _next_midnight(start, days=7)
            year, week, _ = start.isocalendar()
            ident = f"{year}-W{week:02d}"
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            nxt = (
                start.replace(year=start.year + 1, month=1)
                if start.month == _DECEMBER
                else (start.replace(month=start.month + 1))
            )
            end = nxt
            ident = start.strftime("%Y-%m")
        name = window if self.tz == "UTC" else f"{window}@{self.tz}"
        return _WindowSpan(start.timestamp(), end.timestamp(), f"{name}={ident}")


def _next_midnight(start: datetime, *, days: int) -> datetime:
    # Wall-clock arithmetic: across a DST change a "day" is 23 or 25 hours long.
    naive = start.replace(tzinfo=None) + timedelta(days=days)
    return naive.replace(tzinfo=start.tzinfo)


@final
@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """Where one budget stands for one scope, now.

    Amounts are in the budget's unit: micro-dollars for ``"usd"``, tokens for
    ``"tokens"``.
    """

    budget: str
    key: str
    unit: Unit
    limit: int
    spent: int
    reserved: int
    window_ends: float | None

    __module__ = "allowance"

    @property
    def remaining(self) -> int:
        """What is left before the limit, counting reservations in flight."""
        return max(0, self.limit - self.spent - self.reserved)

    @property
    def ratio(self) -> float:
        """Committed plus reserved spend as a share of the limit."""
        return (self.spent + self.reserved) / self.limit if self.limit else 1.0

    def describe(self) -> str:
        """Return a one-line summary for people."""
        return (
            f"{self.budget} [{self.key}]: spent {format_amount(self.spent, self.unit)}"
            f", reserved {format_amount(self.reserved, self.unit)}"
            f", limit {format_amount(self.limit, self.unit)}"
        )
