from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime, time
from decimal import Decimal

import genai_prices
import pytest
from genai_prices.data_snapshot import DataSnapshot, get_snapshot
from genai_prices.types import (
    ClauseEquals,
    ConditionalPrice,
    ModelInfo,
    ModelPrice,
    StartDateConstraint,
    TimeOfDateConstraint,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allowance._errors import ConfigurationError, PricingError
from allowance._pricing import PriceTable, Rates, _next_change, prices
from allowance.typing import Usage


@pytest.fixture
def table() -> PriceTable:
    return PriceTable()


def genai_micros(provider: str | None, model: str, usage: Usage) -> int:
    calc = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            output_tokens=usage.output_tokens,
        ),
        model,
        provider_id=provider,
    )
    return math.ceil(calc.total_price * 1_000_000)


# -- the figures measured in research ------------------------------------------


def test_gpt_4o_1k_in_500_out_costs_7500_micros(table):
    assert table.cost_micros("openai", "gpt-4o", Usage(1000, 500)) == 7500


@pytest.mark.parametrize("model", ["claude-sonnet-4-20250514", "claude-sonnet-4-0"])
def test_claude_sonnet_4_with_cache_costs_8415_micros(table, model):
    usage = Usage(
        input_tokens=1000,
        output_tokens=500,
        cache_read_tokens=800,
        cache_write_tokens=100,
    )
    # 100 uncached x $3 + 800 read x $0.30 + 100 written x $3.75 + 500 out x $15
    assert table.cost_micros("anthropic", model, usage) == 8415


def test_rates_are_exact_integers(table):
    assert table.rates("openai", "gpt-4o") == Rates(
        input=10, output=40, cache_read=5, cache_write=10, denominator=4
    )


@pytest.mark.parametrize(
    ("provider", "model", "genai_provider"),
    [
        ("openai", "gpt-4o-2024-08-06", "openai"),
        ("anthropic", "claude-sonnet-4-20250514", "anthropic"),
        ("anthropic", "claude-3-5-haiku-latest", "anthropic"),
        ("azure", "gpt-4o", "openai"),
        ("my-proxy", "gpt-4o-mini", None),
        (None, "claude-3-5-haiku-latest", None),
    ],
)
def test_names_resolve_as_genai_prices_resolves_them(
    table, provider, model, genai_provider
):
    usage = Usage(123_456, 7_890, 10_000, 2_000)
    assert table.has_price(provider, model)
    assert table.cost_micros(provider, model, usage) == genai_micros(
        genai_provider, model, usage
    )


def test_cost_rounds_up_to_the_next_micro_dollar(table):
    table.set("tiny", input="0.075", output=Decimal("0.3"))
    assert table.cost_micros("openai", "tiny", Usage(1, 0)) == 1  # 0.075 micros
    assert table.cost_micros("openai", "tiny", Usage(1000, 0)) == 75
    assert table.cost_micros("openai", "tiny", Usage(1000, 1)) == 76  # 75.3
    assert table.cost_micros("openai", "tiny", Usage()) == 0


def test_cache_tokens_beyond_input_never_make_a_negative_charge(table):
    usage = Usage(input_tokens=10, output_tokens=0, cache_read_tokens=50)
    assert table.cost_micros("openai", "gpt-4o", usage) == math.ceil(50 * 1.25)


# -- equality with genai-prices ------------------------------------------------


def _priced_models(provider_ids: set[str] | None) -> list[tuple[str, str]]:
    """Return (provider, model) pairs genai-prices resolves to themselves."""
    pairs = []
    snapshot = get_snapshot()
    for provider in snapshot.providers:
        if provider_ids is not None and provider.id not in provider_ids:
            continue
        if provider.id == "azure":  # priced as openai first, by design
            continue
        for model in provider.models:
            try:
                found, info = snapshot.find_provider_model(
                    model.id, None, provider.id, None
                )
            except LookupError:
                continue
            if (
                found.id == provider.id
                and info is model
                and PriceTable().has_price(provider.id, model.id)
            ):
                pairs.append((provider.id, model.id))
    return pairs


# One table for the property tests, so that lookups are cached across examples;
# not the process-wide ``prices``, which other tests may configure.
SHARED = PriceTable()
OPENAI_ANTHROPIC = _priced_models({"openai", "anthropic"})
EVERY_PROVIDER = _priced_models(None)


@st.composite
def usages(draw) -> Usage:
    input_tokens = draw(
        st.one_of(
            st.integers(0, 2_000_000),
            st.sampled_from([0, 1, 199_999, 200_000, 200_001, 272_000, 272_001]),
        )
    )
    read = draw(st.integers(0, input_tokens))
    write = draw(st.integers(0, input_tokens - read))
    output = draw(st.integers(0, 1_000_000))
    return Usage(input_tokens, output, read, write)


def test_the_library_keeps_one_table():
    assert isinstance(prices, PriceTable)


def test_the_model_lists_are_not_empty():
    providers = {provider for provider, _ in OPENAI_ANTHROPIC}
    assert providers == {"openai", "anthropic"}
    assert len(OPENAI_ANTHROPIC) > 100
    assert len(EVERY_PROVIDER) > 1000


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.sampled_from(OPENAI_ANTHROPIC), usage=usages())
def test_cost_equals_genai_prices_openai_anthropic(pair, usage):
    provider, model = pair
    assert SHARED.cost_micros(provider, model, usage) == genai_micros(
        provider, model, usage
    )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.sampled_from(EVERY_PROVIDER), usage=usages())
def test_cost_equals_genai_prices_every_provider(pair, usage):
    provider, model = pair
    assert SHARED.cost_micros(provider, model, usage) == genai_micros(
        provider, model, usage
    )


@settings(max_examples=200, deadline=None)
@given(pair=st.sampled_from(OPENAI_ANTHROPIC), usage=usages())
def test_worst_case_is_never_below_the_cost(pair, usage):
    provider, model = pair
    worst = SHARED.worst_case_micros(
        provider, model, usage.input_tokens, usage.output_tokens
    )
    assert worst >= SHARED.cost_micros(provider, model, usage)


# -- tiers ---------------------------------------------------------------------


def test_tiered_model_switches_every_price_past_the_threshold(table):
    rates = table.rates("anthropic", "claude-sonnet-4-5")
    assert rates is not None
    assert [start for start, _ in rates.tiers] == [200_000]
    below = Usage(200_000, 1000, 50_000, 10_000)
    above = Usage(200_001, 1000, 50_000, 10_000)
    for usage in (below, above):
        assert table.cost_micros(
            "anthropic", "claude-sonnet-4-5", usage
        ) == genai_micros("anthropic", "claude-sonnet-4-5", usage)
    # past 200k input tokens: $6 in, $22.50 out (instead of $3 / $15)
    assert table.cost_micros("anthropic", "claude-sonnet-4-5", Usage(200_001, 0)) == (
        200_001 * 6
    )
    assert table.cost_micros("anthropic", "claude-sonnet-4-5", Usage(200_000, 0)) == (
        200_000 * 3
    )


def test_worst_case_uses_the_tier_the_input_bound_reaches(table):
    model = "claude-sonnet-4-5"
    # cache writes are the dearest input: $3.75 below the tier, $7.50 above
    assert table.worst_case_micros("anthropic", model, 1000, 1000) == 3750 + 15_000
    assert table.worst_case_micros("anthropic", model, 300_000, 0) == 300_000 * 7.5


# -- overrides, default, errors ------------------------------------------------


def test_worst_case_prices_input_at_the_dearest_input_rate(table):
    # claude-sonnet-4: input $3, cache write $3.75, output $15
    assert (
        table.worst_case_micros("anthropic", "claude-sonnet-4-0", 1000, 500) == 11_250
    )
    assert table.worst_case_micros("openai", "gpt-4o", 1000, 500) == 7500


def test_override_beats_genai_prices(table):
    table.set("gpt-4o", input=1, output=2)
    assert table.cost_micros("openai", "gpt-4o", Usage(1000, 500)) == 2000
    table.remove("gpt-4o")
    assert table.cost_micros("openai", "gpt-4o", Usage(1000, 500)) == 7500


def test_override_matches_the_exact_name_only(table):
    table.set("gpt-4o", input=1, output=2)
    assert table.cost_micros("openai", "gpt-4o-2024-08-06", Usage(1000, 500)) == 7500


def test_cache_prices_default_to_the_input_price(table):
    table.set("mine", input=2, output=8)
    assert table.rates("openai", "mine") == Rates(2, 8, 2, 2)
    table.set("mine", input=2, output=8, cached="0.5", cache_write=2.5)
    assert table.rates("openai", "mine") == Rates(4, 16, 1, 5, denominator=2)


def test_provider_specific_override_wins_and_stays_with_its_provider(table):
    table.set("shared", input=1, output=1)
    table.set("shared", input=5, output=5, provider="anthropic")
    assert table.cost_micros("anthropic", "shared", Usage(1, 1)) == 10
    assert table.cost_micros("openai", "shared", Usage(1, 1)) == 2
    table.set("only-anthropic", input=1, output=1, provider="anthropic")
    assert not table.has_price("openai", "only-anthropic")
    table.remove("shared", provider="anthropic")
    assert table.cost_micros("anthropic", "shared", Usage(1, 1)) == 2
    table.remove("never-set")  # a no-op


@pytest.mark.parametrize("value", [3, 3.0, "3", Decimal(3), " 3.000 "])
def test_prices_accept_int_float_str_decimal(table, value):
    table.set("m", input=value, output=value)
    assert table.cost_micros(None, "m", Usage(1000, 1000)) == 6000


def test_float_prices_convert_through_their_repr(table):
    table.set("m", input=0.1, output=0.2)
    assert table.rates(None, "m") == Rates(1, 2, 1, 1, denominator=10)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"input": -1, "output": 1}, "input"),
        ({"input": 1, "output": float("nan")}, "output"),
        ({"input": 1, "output": Decimal("NaN")}, "output"),
        ({"input": "abc", "output": 1}, "input"),
        ({"input": "$2", "output": 1}, "input"),
        ({"input": 1, "output": 1, "cached": "inf"}, "cached"),
        ({"input": 1, "output": 1, "cache_write": "-0.5"}, "cache_write"),
        ({"input": True, "output": 1}, "input"),
        ({"input": None, "output": 1}, "input"),
        ({"input": [1], "output": 1}, "input"),
        ({"input": 1, "output": float("inf")}, "output"),
    ],
)
def test_bad_prices_raise_configuration_error(table, kwargs, what):
    with pytest.raises(ConfigurationError) as info:
        table.set("m", **kwargs)
    assert info.value.what == what
    assert isinstance(info.value, ValueError)
    assert what in str(info.value)
    with pytest.raises(ConfigurationError):
        table.set_default(**kwargs)
    assert not table.has_price(None, "m")


def test_empty_model_name_is_rejected(table):
    with pytest.raises(ConfigurationError) as info:
        table.set("", input=1, output=1)
    assert info.value.what == "model"


def test_unknown_model_raises_pricing_error_naming_it(table):
    assert table.rates("openai", "no-such-model-xyz") is None
    assert not table.has_price("openai", "no-such-model-xyz")
    with pytest.raises(PricingError, match="no-such-model-xyz") as info:
        table.cost_micros("openai", "no-such-model-xyz", Usage(1, 1))
    assert info.value.value == "no-such-model-xyz"
    assert info.value.provider == "openai"
    assert isinstance(info.value, LookupError)
    with pytest.raises(PricingError, match="no-such-model-xyz"):
        table.worst_case_micros("openai", "no-such-model-xyz", 1, 1)


def test_models_without_token_prices_have_no_price(table):
    # tts-1 is priced per character, whisper-1 per hour: not by tokens
    assert not table.has_price("openai", "tts-1")
    assert not table.has_price("openai", "whisper-1")


def test_default_prices_unknown_models_only(table):
    table.set_default(input=1, output=2)
    assert table.cost_micros("openai", "no-such-model-xyz", Usage(1000, 500)) == 2000
    assert table.cost_micros("openai", "gpt-4o", Usage(1000, 500)) == 7500
    table.set("no-such-model-xyz", input=3, output=3)
    assert table.cost_micros("openai", "no-such-model-xyz", Usage(1000, 500)) == 4500


def test_clear_removes_overrides_and_default(table):
    table.set("gpt-4o", input=1, output=1)
    table.set_default(input=1, output=1)
    table.clear()
    assert table.cost_micros("openai", "gpt-4o", Usage(1000, 500)) == 7500
    assert not table.has_price("openai", "no-such-model-xyz")


# -- caching and laziness ------------------------------------------------------


def test_genai_prices_is_consulted_once_per_model(table, monkeypatch):
    calls: list[tuple[str, str | None]] = []
    original = DataSnapshot.find_provider_model

    def spy(self, model_ref, provider, provider_id, provider_api_url):
        calls.append((model_ref, provider_id))
        return original(self, model_ref, provider, provider_id, provider_api_url)

    monkeypatch.setattr(DataSnapshot, "find_provider_model", spy)
    for _ in range(50):
        table.cost_micros("openai", "gpt-4o", Usage(1000, 500))
        table.worst_case_micros("openai", "gpt-4o", 1000, 500)
    assert calls == [("gpt-4o", "openai")]

    for _ in range(50):
        assert not table.has_price("openai", "no-such-model-xyz")
    misses = len(calls) - 1
    assert misses >= 1
    table.has_price("openai", "no-such-model-xyz")
    assert len(calls) == 1 + misses

    # changing overrides or the default looks nothing up in genai-prices again
    table.set("other", input=1, output=1)
    table.set_default(input=1, output=1)
    table.cost_micros("openai", "gpt-4o", Usage(1000, 500))
    table.cost_micros("openai", "no-such-model-xyz", Usage(1000, 500))
    assert len(calls) == 1 + misses


def _model(*prices: ConditionalPrice) -> ModelInfo:
    return ModelInfo(id="m", match=ClauseEquals(equals="m"), prices=list(prices))


def test_dated_prices_are_cached_until_the_next_start_date():
    now = datetime(2030, 1, 1, 12, tzinfo=UTC)
    info = _model(
        ConditionalPrice(prices=ModelPrice(input_mtok=Decimal(1))),
        ConditionalPrice(
            constraint=StartDateConstraint(start_date=date(2029, 1, 1)),
            prices=ModelPrice(input_mtok=Decimal(2)),
        ),
        ConditionalPrice(
            constraint=StartDateConstraint(start_date=date(2031, 6, 1)),
            prices=ModelPrice(input_mtok=Decimal(3)),
        ),
    )
    assert _next_change(info, now) == datetime(2031, 6, 1, tzinfo=UTC).timestamp()


def test_time_of_day_prices_are_cached_until_the_next_boundary():
    info = _model(
        ConditionalPrice(prices=ModelPrice(input_mtok=Decimal(1))),
        ConditionalPrice(
            constraint=TimeOfDateConstraint(
                start_time=time(16, 30, tzinfo=UTC), end_time=time(0, 30, tzinfo=UTC)
            ),
            prices=ModelPrice(input_mtok=Decimal("0.5")),
        ),
    )
    noon = datetime(2030, 1, 1, 12, tzinfo=UTC)
    assert (
        _next_change(info, noon) == datetime(2030, 1, 1, 16, 30, tzinfo=UTC).timestamp()
    )
    evening = datetime(2030, 1, 1, 20, tzinfo=UTC)
    assert (
        _next_change(info, evening)
        == datetime(2030, 1, 2, 0, 30, tzinfo=UTC).timestamp()
    )


def test_expired_rates_are_resolved_again(table):
    assert table.rates("openai", "gpt-4o") is not None
    rates, _ = table._resolved["openai", "gpt-4o"]
    table._resolved["openai", "gpt-4o"] = (None, 1.0)  # expired in 1970
    assert table.rates("openai", "gpt-4o") == rates


def test_importing_pricing_does_not_import_genai_prices():
    script = textwrap.dedent(
        """
        import sys

        from allowance._pricing import PriceTable
        from allowance.typing import Usage

        assert "genai_prices" not in sys.modules, "imported at import time"
        table = PriceTable()
        table.set("mine", input=1, output=1)
        assert table.cost_micros("openai", "mine", Usage(10, 10)) == 20
        assert "genai_prices" not in sys.modules, "imported for an override"
        assert table.cost_micros("openai", "gpt-4o", Usage(1000, 500)) == 7500
        assert "genai_prices" in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
