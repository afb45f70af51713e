"""Model prices: user overrides, genai-prices, a fallback, and exact cost arithmetic.

Lookup order for ``(provider, model)``:

1. an override set with ``prices.set(model, ...)`` for that exact model name
   (one set for the provider wins over one set for every provider);
2. genai-prices' bundled snapshot, matched as genai-prices matches names (dated
   and aliased names such as ``gpt-4o-2024-08-06`` or ``claude-3-5-haiku-latest``
   resolve). ``"azure"`` is priced as ``"openai"`` first, then as genai-prices'
   ``azure`` entry; a provider genai-prices does not know, or a miss under a
   known one (an OpenAI-compatible server), lets genai-prices guess the
   provider from the model name;
3. the fallback set with ``prices.set_default(...)``;
4. nothing: ``PricingError``. A model is never priced at $0 by accident.

genai-prices is imported lazily (it takes ~0.3-0.5 s) and each ``(provider,
model)`` is looked up once; the resolved rates are cached, misses included.
Prices that change on a date (genai-prices' ``StartDateConstraint``) or by time
of day (``TimeOfDateConstraint``) are cached until the next change.

Arithmetic is exact: a price in USD per million tokens is, numerically, a price
in micro-dollars per token, so rates are kept as integers over a common
denominator and a cost is one integer ceil division. Costs are rounded up to the
next micro-dollar.

What genai-prices prices that a ``Usage`` cannot express is priced at zero, as
genai-prices itself does for such a usage: web searches, audio or image tokens
reported apart, Anthropic's 1-hour cache writes (billed here at the 5-minute
cache-write rate). A model whose genai-prices entry has prices but none per
input or output token (speech, transcription, OCR) has no token price here.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Final

from allowance._errors import ConfigurationError, PricingError

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo, ModelPrice, TieredPrices

    from allowance.typing import Usage

__all__ = ["PriceTable", "Rates", "prices"]

_FOREVER: Final = math.inf
_EXPECTED_PRICE: Final = (
    "a finite, non-negative number of USD per million tokens"
    " (an int, float, str or Decimal)"
)
# genai-prices price keys this module turns into per-token rates.
_TOKEN_KEYS: Final = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
)
# Providers priced as another provider first (then as themselves).
_PRICE_AS: Final[dict[str, tuple[str, ...]]] = {"azure": ("openai", "azure")}

_Lookup = tuple[
    "ModelInfo", str
]  # the genai-prices model and the provider id it was found under
_Entry = tuple["Rates | None", float]  # rates and the Unix time they stop being valid


@dataclass(frozen=True, slots=True)
class Rates:
    """Exact per-token prices of one model.

    Each price is an integer number of ``1/denominator`` micro-dollars per
    token (``Decimal("2.5")`` USD per million tokens is 2.5 micro-dollars per
    token: ``input=5, denominator=2``).

    Attributes:
        input: Price of an input token that is neither read from nor written
            to the cache.
        output: Price of an output token, reasoning included.
        cache_read: Price of an input token read from the cache.
        cache_write: Price of an input token written to the cache.
        denominator: The common denominator of every price here.
        request: A fixed price per call (a few providers charge per request).
        tiers: ``(start, rates)`` pairs, ascending: when a call's input tokens
            exceed ``start``, all its tokens are priced at ``rates`` (the
            "cliff" tiers genai-prices models, e.g. past 200k input tokens).
    """

    input: int
    output: int
    cache_read: int
    cache_write: int
    denominator: int = 1
    request: int = 0
    tiers: tuple[tuple[int, Rates], ...] = ()

    def at(self, input_tokens: int) -> Rates:
        """Return the rates that apply to a call with ``input_tokens`` input tokens."""
        for start, rates in reversed(self.tiers):
            if input_tokens > start:
                return rates
        return self


def _to_price(what: str, value: object) -> Decimal:
    """Return ``value`` as a Decimal price; ConfigurationError names ``what``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ConfigurationError(what, value, _EXPECTED_PRICE)
    try:
        price = Decimal(str(value).strip())
    except (InvalidOperation, ValueError) as err:
        raise ConfigurationError(what, value, _EXPECTED_PRICE) from err
    if not price.is_finite() or price < 0:
        raise ConfigurationError(what, value, _EXPECTED_PRICE)
    return price


def _make_rates(
    segments: list[tuple[int, tuple[Decimal, Decimal, Decimal, Decimal, Decimal]]],
) -> Rates:
    """Build ``Rates`` from ``(start, (input, output, read, write, per_call))``.

    Prices are in USD per million tokens, the per-call price in micro-dollars.
    The first segment is the base (its start is ignored); all share one
    denominator so that the hot path never converts.
    """
    ratios = [price.as_integer_ratio() for _, values in segments for price in values]
    denominator = math.lcm(*(den for _, den in ratios))
    scaled = [num * (denominator // den) for num, den in ratios]
    built = [
        Rates(
            input=scaled[i * 5],
            output=scaled[i * 5 + 1],
            cache_read=scaled[i * 5 + 2],
            cache_write=scaled[i * 5 + 3],
            denominator=denominator,
            request=scaled[i * 5 + 4],
        )
        for i in range(len(segments))
    ]
    base = built[0]
    if len(built) == 1:
        return base
    tiers = tuple(
        (start, rates)
        for (start, _), rates in zip(segments[1:], built[1:], strict=True)
    )
    return Rates(
        base.input,
        base.output,
        base.cache_read,
        base.cache_write,
        denominator,
        base.request,
        tiers,
    )


def _price_at(
    price: Decimal | TieredPrices | None, input_tokens: int
) -> Decimal | None:
    """Return the price genai-prices applies for a call with ``input_tokens`` input."""
    if price is None or isinstance(price, Decimal):
        return price
    applicable = price.base
    for tier in reversed(price.tiers):
        if input_tokens > tier.start:
            applicable = tier.price
            break
    return applicable


def _rates_from_model_price(model_price: ModelPrice) -> Rates | None:
    """Convert a genai-prices ``ModelPrice`` to ``Rates``; None when not token-priced.

    Mirrors genai-prices' arithmetic for a usage of input, cache-read,
    cache-write and output tokens: an unpriced cache kind falls back to the
    input price (its tokens stay in the input leaf), tiers apply to every key
    by total input tokens, and a per-request price is charged once per call.
    """
    from genai_prices.types import TieredPrices  # noqa: PLC0415 - genai-prices is lazy

    stored = {
        k: v
        for k, v in model_price.__dict__.items()
        if not k.startswith("_") and v is not None
    }
    if stored and "input_mtok" not in stored and "output_mtok" not in stored:
        return None  # priced per character, page or hour: no token price
    starts = sorted(
        {
            tier.start
            for key in (*_TOKEN_KEYS, "requests_kcount")
            if isinstance(price := stored.get(key), TieredPrices)
            for tier in price.tiers
        }
    )
    segments: list[tuple[int, tuple[Decimal, Decimal, Decimal, Decimal, Decimal]]] = []
    for start in (-1, *starts):
        at = start + 1  # any input count in (start, next start] selects the same prices
        input_ = _price_at(stored.get("input_mtok"), at) or Decimal(0)
        output = _price_at(stored.get("output_mtok"), at) or Decimal(0)
        read = _price_at(stored.get("cache_read_mtok"), at)
        write = _price_at(stored.get("cache_write_mtok"), at)
        per_k_requests = _price_at(stored.get("requests_kcount"), at) or Decimal(0)
        segments.append(
            (
                start,
                (
                    input_,
                    output,
                    input_ if read is None else read,
                    input_ if write is None else write,
                    per_k_requests
                    * 1000,  # USD per 1k requests -> micro-dollars per request
                ),
            )
        )
    return _make_rates(segments)


def _utc_time(value: dt_time) -> dt_time:
    """Return a time of day in UTC (naive times are UTC, as genai-prices reads them)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return datetime.combine(date(1970, 1, 1), value).astimezone(UTC).timetz()


def _next_change(model: ModelInfo, now: datetime) -> float:
    """Return the Unix time at which ``model``'s applicable prices may next change."""
    from genai_prices.types import StartDateConstraint, TimeOfDateConstraint  # noqa: PLC0415

    if not isinstance(model.prices, list):
        return _FOREVER
    candidates: list[datetime] = []
    for conditional in model.prices:
        constraint = conditional.constraint
        if isinstance(constraint, StartDateConstraint):
            at = datetime.combine(constraint.start_date, dt_time(0), UTC)
            if at > now:
                candidates.append(at)
        elif isinstance(constraint, TimeOfDateConstraint):
            for boundary in (constraint.start_time, constraint.end_time):
                at = datetime.combine(now.date(), _utc_time(boundary))
                candidates.append(at if at > now else at + timedelta(days=1))
    return min(candidates).timestamp() if candidates else _FOREVER


def _genai_find(provider: str | None, model: str) -> _Lookup | None:
    """Find ``model`` in genai-prices' snapshot without pricing anything."""
    from genai_prices.data_snapshot import find_provider_by_id, get_snapshot  # noqa: PLC0415

    snapshot = get_snapshot()
    attempts: list[str | None] = []
    if provider is not None:
        attempts.extend(
            candidate
            for candidate in _PRICE_AS.get(provider.lower(), (provider,))
            if find_provider_by_id(snapshot.providers, candidate) is not None
        )
    attempts.append(None)  # let genai-prices guess the provider from the model name
    for provider_id in attempts:
        try:
            found, info = snapshot.find_provider_model(model, None, provider_id, None)
        except LookupError:
            continue
        return info, found.id
    return None


class PriceTable:
    """Prices of models in USD per million tokens, with exact cost arithmetic.

    The library keeps one, ``allowance.prices``. Overrides and the fallback are
    process-wide; lookups of genai-prices are cached per ``(provider, model)``.

    Example:
        >>> table = PriceTable()
        >>> table.set("my-finetune", input="0.30", output=1.2)
        >>> table.cost_micros("openai", "my-finetune", Usage(1000, 500))
        900
    """

    def __init__(self) -> None:
        """Create an empty table: no overrides, no fallback."""
        self._overrides: dict[str, dict[str | None, Rates]] = {}
        self._default: Rates | None = None
        self._resolved: dict[tuple[str | None, str], _Entry] = {}
        self._found: dict[tuple[str | None, str], _Lookup | None] = {}
        self._lock = threading.Lock()

    # -- configuration -------------------------------------------------------

    def set(
        self,
        model: str,
        *,
        input: float | str | Decimal,  # noqa: A002 - USD per million input tokens, as users say it
        output: float | str | Decimal,
        cached: float | str | Decimal | None = None,
        cache_write: float | str | Decimal | None = None,
        provider: str | None = None,
    ) -> None:
        """Set the price of ``model``, overriding genai-prices.

        Args:
            model: The exact model name requests use (no alias matching).
            input: USD per million uncached input tokens.
            output: USD per million output tokens (reasoning included).
            cached: USD per million tokens read from the cache; defaults to
                ``input``.
            cache_write: USD per million tokens written to the cache; defaults
                to ``input``.
            provider: Apply only to this provider; None applies to every
                provider (a provider-specific override wins).

        Raises:
            ConfigurationError: A price is negative, NaN, infinite or not a
                number, ``model`` is not a non-empty string, or ``provider``
                neither None nor one.

        Example:
            >>> allowance.prices.set("gpt-4o", input=2.5, output=10, cached=1.25)
        """
        name: object = model  # typed str; checked, as callers may not be typed
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                what="model", value=model, expected="a non-empty model name"
            )
        source: object = provider
        if source is not None and (not isinstance(source, str) or not source):
            raise ConfigurationError(
                what="provider", value=provider, expected="None or a provider name"
            )
        rates = self._rates_from_args(input, output, cached, cache_write)
        with self._lock:
            self._overrides.setdefault(model, {})[provider] = rates
            self._resolved.clear()

    def set_default(
        self,
        *,
        input: float | str | Decimal,  # noqa: A002 - matches set()
        output: float | str | Decimal,
        cached: float | str | Decimal | None = None,
        cache_write: float | str | Decimal | None = None,
    ) -> None:
        """Set the price of models nobody knows (no override, not in genai-prices).

        Arguments are as for ``set``.

        Raises:
            ConfigurationError: A price is negative, NaN, infinite or not a number.
        """
        rates = self._rates_from_args(input, output, cached, cache_write)
        with self._lock:
            self._default = rates
            self._resolved.clear()

    def remove(self, model: str, provider: str | None = None) -> None:
        """Remove the override of ``model`` for ``provider`` (no-op when not set)."""
        with self._lock:
            by_provider = self._overrides.get(model)
            if by_provider is not None and by_provider.pop(provider, None) is not None:
                if not by_provider:
                    del self._overrides[model]
                self._resolved.clear()

    def clear(self) -> None:
        """Remove every override and the fallback price."""
        with self._lock:
            self._overrides.clear()
            self._default = None
            self._resolved.clear()

    @staticmethod
    def _rates_from_args(
        input_: object, output: object, cached: object, cache_write: object
    ) -> Rates:
        input_price = _to_price("input", input_)
        output_price = _to_price("output", output)
        read = input_price if cached is None else _to_price("cached", cached)
        write = (
            input_price
            if cache_write is None
            else _to_price("cache_write", cache_write)
        )
        return _make_rates([(-1, (input_price, output_price, read, write, Decimal(0)))])

    # -- lookup --------------------------------------------------------------

    def rates(self, provider: str | None, model: str) -> Rates | None:
        """Return the rates of ``model`` under ``provider``, or None when unknown.

        Order: override, genai-prices, fallback. The answer is cached.
        """
        entry = self._resolved.get((provider, model))
        if entry is None or (entry[1] != _FOREVER and entry[1] <= time.time()):
            entry = self._resolve(provider, model)
        return entry[0]

    def preload(self) -> None:
        """Import genai-prices and its data now, in this thread.

        Lazy imports are not safe everywhere: genai-prices imports ``httpx2``,
        and openai 2.x reads ``sys.modules["httpx2"]`` on every request, so a
        first price lookup in one thread while another thread sends a request
        can hand that thread a half-imported module. ``Guard`` calls this when
        it is built, before its calls start.
        """
        from genai_prices.data_snapshot import get_snapshot  # noqa: PLC0415

        get_snapshot()

    def has_price(self, provider: str | None, model: str) -> bool:
        """Return True when ``model`` under ``provider`` has a price (or a fallback)."""
        return self.rates(provider, model) is not None

    def _resolve(self, provider: str | None, model: str) -> _Entry:
        by_provider = self._overrides.get(model)
        if by_provider is not None:
            rates = by_provider.get(provider) or by_provider.get(None)
            if rates is not None:
                return self._remember(provider, model, (rates, _FOREVER))
        key = (provider, model)
        if key in self._found:
            found = self._found[key]
        else:
            found = self._found[key] = _genai_find(provider, model)
        if found is not None:
            info, _ = found
            now = datetime.now(tz=UTC)
            rates = _rates_from_model_price(info.get_prices(now))
            if rates is not None:
                return self._remember(provider, model, (rates, _next_change(info, now)))
        return self._remember(provider, model, (self._default, _FOREVER))

    def _remember(self, provider: str | None, model: str, entry: _Entry) -> _Entry:
        self._resolved[provider, model] = entry
        return entry

    # -- arithmetic ----------------------------------------------------------

    def cost_micros(self, provider: str | None, model: str, usage: Usage) -> int:
        """Return the cost of a call in micro-dollars, rounded up.

        Uncached input (``input - cache_read - cache_write``) is priced at the
        input rate, cache reads and writes at theirs, output (reasoning
        included) at the output rate; tiers by total input tokens.

        Raises:
            PricingError: No price is known for ``model``.
        """
        entry = self._resolved.get((provider, model))
        if entry is None or (entry[1] != _FOREVER and entry[1] <= time.time()):
            entry = self._resolve(provider, model)
        rates = entry[0]
        if rates is None:
            raise PricingError(model, provider)
        input_tokens = usage.input_tokens
        if rates.tiers:
            rates = rates.at(input_tokens)
        read = usage.cache_read_tokens
        write = usage.cache_write_tokens
        uncached = input_tokens - read - write
        # Conditionals, not max(): a builtin call costs more from cold caches.
        total = (
            (uncached if uncached > 0 else 0) * rates.input  # noqa: FURB136
            + read * rates.cache_read
            + write * rates.cache_write
            + usage.output_tokens * rates.output
            + rates.request
        )
        return -(-total // rates.denominator) if total > 0 else 0

    def worst_case_micros(
        self, provider: str | None, model: str, input_tokens: int, output_tokens: int
    ) -> int:
        """Return the most a call can cost with this input bound and output cap.

        Every input token is priced at the dearest input rate (a cache write
        costs more than plain input on Anthropic), every output token at the
        output rate, under the dearest tier the input bound can reach.

        Raises:
            PricingError: No price is known for ``model``.
        """
        base = self.rates(provider, model)
        if base is None:
            raise PricingError(model, provider)
        if not base.tiers:  # the common case: one linear price
            # Conditionals, not max(): a builtin call costs more from cold caches.
            dearest = base.input
            if base.cache_read > dearest:  # noqa: PLR1730
                dearest = base.cache_read
            if base.cache_write > dearest:  # noqa: PLR1730
                dearest = base.cache_write
            total = (
                (input_tokens if input_tokens > 0 else 0) * dearest  # noqa: FURB136
                + (output_tokens if output_tokens > 0 else 0) * base.output  # noqa: FURB136
                + base.request
            )
            return -(-total // base.denominator)
        input_tokens = max(input_tokens, 0)
        output_tokens = max(output_tokens, 0)
        total = 0
        for rates in (base, *(r for start, r in base.tiers if input_tokens > start)):
            dearest_input = max(rates.input, rates.cache_read, rates.cache_write)
            total = max(
                total,
                input_tokens * dearest_input
                + output_tokens * rates.output
                + rates.request,
            )
        return -(-total // base.denominator)


prices: Final = PriceTable()
"""The process-wide price table (``allowance.prices``)."""
