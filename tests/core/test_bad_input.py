"""Bad input of every kind gets a typed error that names the value and the rule."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

import allowance
from allowance import Budget, ConfigurationError, Guard, Policy, Threshold

BAD_LIMITS: list[object] = [
    "2 dollars",
    "$",
    "$-1",
    "$1.0000001",  # finer than a micro-dollar
    "USD 5",
    "five",
    "",
    "50k toks",
    "1.5 tokens",
    "-5",
    -5,
    2.5,
    True,
    None,
    b"$1",
    [1],
    "1e3 tokens",
]


@pytest.mark.parametrize("value", BAD_LIMITS, ids=repr)
def test_bad_budget_limits_name_the_value(value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        Budget(value)  # type: ignore[arg-type]
    assert info.value.value == value
    assert info.value.expected
    assert "budget=" in str(info.value)


CASES: dict[str, Callable[[], object]] = {
    "per with a space": lambda: Budget("$1", per="my tenant"),
    "per empty": lambda: Budget("$1", per=""),
    "window fortnight": lambda: Budget("$1", window="fortnight"),  # type: ignore[arg-type]
    "unknown time zone": lambda: Budget("$1", window="day", tz="Mars/Olympus"),
    "name with colon": lambda: Budget("$1", name="a:b"),
    "name ending in a newline": lambda: Budget("$1", name="daily\n"),
    "per ending in a newline": lambda: Budget("$1", per="tenant\n"),
    "threshold 0": lambda: Threshold(0),
    "threshold above 1": lambda: Threshold(1.5),
    "threshold nan": lambda: Threshold(float("nan")),
    "threshold bool": lambda: Threshold(True),
    "threshold string": lambda: Threshold("80%"),  # type: ignore[arg-type]
    "threshold action": lambda: Threshold(0.5, "explode"),  # type: ignore[arg-type]
    "webhook without url": lambda: Threshold(0.5, "webhook"),
    "webhook ftp url": lambda: Threshold(0.5, "webhook", to="ftp://x"),
    "degrade to blank": lambda: Threshold(0.5, "degrade", to=" "),
    "callback not callable": lambda: Threshold(0.5, callback=3),  # type: ignore[arg-type]
    "warn with a target": lambda: Threshold(0.5, "warn", to="gpt-4o-mini"),
    "block with a target": lambda: Threshold(0.5, "block", to="gpt-4o-mini"),
    "degrade with a callback": lambda: Threshold(0.5, "degrade", callback=print),
    "block with a callback": lambda: Threshold(0.5, "block", callback=print),
    "warn with a secret": lambda: Threshold(0.5, secret="s3cret"),  # noqa: S106
    "degrade with allow_http": lambda: Threshold(0.5, "degrade", allow_http=True),
    "thresholds not Threshold": lambda: Budget("$1", thresholds=[0.5]),  # type: ignore[list-item]
    "policy budgets not Budget": lambda: Policy(["$1"]),  # type: ignore[list-item]
    "policy budgets an int": lambda: Policy(5),  # type: ignore[arg-type]
    "policy budgets a str": lambda: Policy("$1"),  # type: ignore[arg-type]
    "on_limit": lambda: Policy(on_limit="explode"),  # type: ignore[arg-type]
    "fail": lambda: Policy(fail="sideways"),  # type: ignore[arg-type]
    "fallback blank": lambda: Policy(fallback=""),
    "fallback mapping to int": lambda: Policy(fallback={"gpt-4o": 3}),  # type: ignore[dict-item]
    "fallback int": lambda: Policy(fallback=3),  # type: ignore[arg-type]
    "lease zero": lambda: Policy(lease_seconds=0),
    "lease a month": lambda: Policy(lease_seconds=30 * 86400),
    "guard policy and shorthand": lambda: Guard(Policy(), budget="$1"),
    "guard policy not a Policy": lambda: Guard("strict"),  # type: ignore[arg-type]
    "guard scope a list": lambda: Guard(budget="$1", scope=["tenant"]),  # type: ignore[arg-type]
    "guard scope a str": lambda: Guard(budget="$1", scope="tenant=acme"),  # type: ignore[arg-type]
    "status scope a list": lambda: Guard(budget="$1", ledger="memory://").status(
        ["tenant"]  # type: ignore[arg-type]
    ),
    "guard threshold without budget": lambda: Guard(threshold=0.8),
    "guard budget list of str": lambda: Guard(budget=["$1"]),  # type: ignore[list-item]
    "ledger scheme": lambda: Guard(ledger="postgres://db"),
    "ledger not a ledger": lambda: Guard(ledger=42),  # type: ignore[arg-type]
    "scope colon dimension": lambda: allowance.scope(**{"a:b": "x"}),
    "scope dimension ending in a newline": lambda: allowance.scope(**{"tenant\n": "x"}),
    "scope empty value": lambda: allowance.scope(tenant=""),
    "scope 10 kB value": lambda: allowance.scope(tenant="x" * 10_240),
    "scope float value": lambda: allowance.scope(tenant=1.5),  # type: ignore[arg-type]
    "scope bool value": lambda: allowance.scope(tenant=True),
    "scope lone surrogate": lambda: allowance.scope(tenant="acme\ud800"),
    "seen_by lone surrogate": lambda: allowance.seen_by("mine", agent="\udfff"),
    "guard scope lone surrogate": lambda: Guard(budget="$1", scope={"user": "\ud83d"}),
    "status lone surrogate": lambda: Guard(budget="$1", ledger="memory://").status(
        {"tenant": "\ud800"}
    ),
    "seen_by name not a str": lambda: allowance.seen_by(3),  # type: ignore[arg-type]
    "seen_by name empty": lambda: allowance.seen_by(""),
    "seen_by name with a comma": lambda: allowance.seen_by("a,b"),
    "seen_by name a list": lambda: allowance.seen_by(["x"]),  # type: ignore[arg-type]
    "open_ledger scheme": lambda: allowance.open_ledger("mysql://x"),
    "open_ledger sqlite without path": lambda: allowance.open_ledger("sqlite:///"),
    "price negative": lambda: allowance.prices.set("m", input=-1, output=1),
    "price text": lambda: allowance.prices.set("m", input="cheap", output=1),
    "estimate negative input": lambda: allowance.Estimate("openai", "m", -5, 10),
    "estimate fractional output": lambda: allowance.Estimate("openai", "m", 5, 2.5),  # type: ignore[arg-type]
    "estimate bool output": lambda: allowance.Estimate("openai", "m", 5, True),
    "price model not a str": lambda: allowance.prices.set(5, input=1, output=1),  # type: ignore[arg-type]
    "price provider empty": lambda: allowance.prices.set(
        "m", input=1, output=1, provider=""
    ),
}


@pytest.mark.parametrize("build", CASES.values(), ids=CASES.keys())
def test_bad_configuration_raises_a_typed_error(build: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError) as info:
        build()
    err = info.value
    assert isinstance(err, allowance.AllowanceError)
    assert isinstance(err, ValueError)
    assert "expected" in str(err)


def test_a_dimension_checked_once_is_still_checked_with_each_value() -> None:
    # Dimension names that passed are remembered; their values are not.
    with allowance.scope(tenant="acme"), allowance.scope(tenant=7):
        assert dict(allowance.current_scope()) == {"tenant": "7"}
    for bad in ("", "x" * 257, 1.5, True, None):
        with pytest.raises(ConfigurationError) as info:
            allowance.scope(tenant=bad)  # type: ignore[arg-type]
        assert info.value.value == bad
    with pytest.raises(ConfigurationError):
        allowance.seen_by("mine", **{"tenant ": "acme"})


def test_a_webhook_secret_given_to_another_action_is_not_shown() -> None:
    with pytest.raises(ConfigurationError) as info:
        Threshold(0.5, "warn", secret="s3cret-value")  # noqa: S106
    assert "s3cret-value" not in str(info.value)
    assert "s3cret-value" not in repr(info.value.value)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(ConfigurationError) as info:
        allowance.scope(tenant="x" * 10_240)
    assert len(str(info.value)) < 400
    assert "10240" in str(info.value)


def test_wrap_refuses_what_is_not_an_sdk_client() -> None:
    with pytest.raises(allowance.UsageError) as info:
        allowance.wrap(object(), budget="$1", ledger="memory://")
    assert "object" in str(info.value)


async def test_begin_takes_an_estimate_only() -> None:
    guard = Guard(budget=100, ledger="memory://")
    with pytest.raises(allowance.UsageError, match="not str") as info:
        guard.begin("gpt-4o")  # type: ignore[arg-type]
    assert info.value.value == "gpt-4o"
    with pytest.raises(allowance.UsageError, match="not dict"):
        await guard.abegin({"model": "gpt-4o"})  # type: ignore[arg-type]
    assert guard.status()[0].reserved == 0


def test_patch_names_an_unknown_adapter() -> None:
    with pytest.raises(allowance.AdapterUnavailableError) as info:
        allowance.patch(budget="$1", ledger="memory://", adapters=["nope"])
    assert "'nope'" in str(info.value)
    assert allowance.active_guard() is None


@pytest.mark.parametrize(
    "value",
    ["acme:eu", "Zürich ☃", "a b", "50%", "x/y", "{tag}", "line\nbreak", "a=b"],
)
def test_scope_values_with_separators_stay_distinct_keys(value: str) -> None:
    guard = Guard(budget=100, per="tenant", ledger="memory://")
    key = guard.status({"tenant": value})[0].key
    assert key.count(":") == 1  # the value cannot add a separator
    other = guard.status({"tenant": value + "!"})[0].key
    assert key != other


@pytest.mark.parametrize("value", ["Zürich ☃", "東京", "emoji 🚀"])
def test_non_ascii_scope_values_reach_a_sqlite_ledger(
    value: str, tmp_path: pathlib.Path
) -> None:
    guard = Guard(budget=100, per="tenant", ledger=f"sqlite:///{tmp_path / 'a.db'}")
    with allowance.scope(tenant=value):
        ticket = guard.begin(allowance.Estimate("openai", "m", 10, 10))
        ticket.commit(allowance.Usage(input_tokens=5, output_tokens=5))
        assert guard.status()[0].spent == 10
    guard.close()


def test_a_lone_surrogate_is_refused_before_any_ledger_sees_it() -> None:
    # SQLite and Redis cannot encode it as a key; it used to escape as a raw
    # UnicodeEncodeError from inside the ledger, after the guard had begun.
    with pytest.raises(ConfigurationError) as info:
        allowance.scope(tenant="acme\ud800")
    assert info.value.value == "acme\ud800"
    assert "UTF-8" in str(info.value)
