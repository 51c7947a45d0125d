"""A/B splits, pure: parsing tables, the keyed assignment, and the decision against scipy."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import pytest
from bson import ObjectId
from scipy.stats import binomtest, chi2_contingency, fisher_exact  # type: ignore[import-untyped]

from reactor.domain.errors import InvalidCampaign
from reactor.domain.models import parse_campaign
from reactor.domain.splits import (
    AbTest,
    Fallback,
    Metric,
    VariantCounts,
    assign,
    decide,
    holm,
    omnibus_p,
    pairwise_p,
    wilson,
)
from reactor.domain.variants import with_variant

T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
KEY = b"k" * 32


def doc(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "_id": ObjectId(),
        "name": "Split",
        "status": "approved",
        "startDate": T0,
        "endDate": T0 + dt.timedelta(hours=4),
        "email": {"subject": "Hi {{name}}", "text": "Hello"},
        "targetedCustomerIds": ["1"],
        "variants": [{"key": "A"}, {"key": "B", "email": {"subject": "Yo {{name}}"}}],
        "abTest": {
            "testShare": 0.2,
            "metric": "human_clicks",
            "decideAfterMinutes": 60.0,  # Mongoose writes doubles
            "minPerVariant": 100.0,
        },
    }
    base.update(overrides)
    return base


def ab(**overrides: Any) -> dict[str, Any]:
    return {**doc()["abTest"], **overrides}


def test_a_valid_split_parses_with_defaults() -> None:
    c = parse_campaign(doc())
    assert c.split is not None
    assert c.split.keys == ("A", "B")
    assert c.split.ab.decide_after_s == 3600.0
    assert c.split.ab.min_per_variant == 100
    assert c.split.ab.confidence == 0.95
    assert c.split.ab.fallback is Fallback.CONTROL
    assert c.split.decide_at(c.start_at) == T0 + dt.timedelta(hours=1)
    b = with_variant(c, "B")
    assert b.email is not None
    assert b.email.subject == "Yo {{name}}"
    assert b.email.text == "Hello"  # inherited
    assert with_variant(c, "A").email == c.email


def test_no_variants_is_no_split() -> None:
    plain = doc()
    del plain["variants"], plain["abTest"]
    assert parse_campaign(plain).split is None
    assert parse_campaign({**plain, "variants": []}).split is None


@pytest.mark.parametrize(
    ("overrides", "reason", "field"),
    [
        ({"variants": [{"key": "A"}]}, "bad_variants", "variants"),
        ({"variants": [{"key": str(i)} for i in range(9)]}, "bad_variants", "variants"),
        ({"variants": [{"key": "A"}, {"key": "A"}]}, "bad_variants", "variants[1].key"),
        ({"variants": [{"key": "A"}, {"key": ""}]}, "bad_variants", "variants[1].key"),
        ({"variants": [{"key": "A"}, {"key": 2}]}, "bad_variants", "variants[1].key"),
        ({"variants": [{"key": "A"}, {"key": "a.b"}]}, "bad_variants", "variants[1].key"),
        ({"variants": [{"key": "A"}, {"key": "$x"}]}, "bad_variants", "variants[1].key"),
        (
            {"variants": [{"key": "A"}, {"key": "B", "email": {"subject": 3}}]},
            "bad_variants",
            "variants[1].email.subject",
        ),
        (
            {"variants": [{"key": "A"}, {"key": "B", "email": {"subject": "a\nb"}}]},
            "bad_variants",
            "variants[1] (B): email.subject",
        ),
        ({"abTest": None}, "bad_abTest", "abTest"),
        ({"abTest": ab(testShare=0)}, "bad_abTest", "abTest.testShare"),
        ({"abTest": ab(testShare=1.5)}, "bad_abTest", "abTest.testShare"),
        ({"abTest": ab(testShare="0.2")}, "bad_abTest", "abTest.testShare"),
        ({"abTest": ab(metric="opens")}, "bad_abTest", "abTest.metric"),
        ({"abTest": ab(decideAfterMinutes=0)}, "bad_abTest", "abTest.decideAfterMinutes"),
        ({"abTest": ab(minPerVariant=10.5)}, "bad_abTest", "abTest.minPerVariant"),
        ({"abTest": ab(confidence=1.0)}, "bad_abTest", "abTest.confidence"),
        ({"abTest": ab(fallback="coin")}, "bad_abTest", "abTest.fallback"),
        ({"abTest": ab(winner="C")}, "bad_abTest", "abTest.winner"),
    ],
)
def test_an_invalid_split_names_the_field(
    overrides: dict[str, Any], reason: str, field: str
) -> None:
    with pytest.raises(InvalidCampaign) as caught:
        parse_campaign(doc(**overrides))
    assert caught.value.reason == reason
    assert caught.value.detail.startswith(field)


def test_ab_test_without_variants_is_refused() -> None:
    plain = doc()
    del plain["variants"]
    with pytest.raises(InvalidCampaign, match="abTest"):
        parse_campaign(plain)


def test_assignment_is_deterministic_keyed_and_even() -> None:
    split = parse_campaign(doc(abTest=ab(testShare=0.3))).split
    assert split is not None
    customers = [str(i) for i in range(20_000)]
    first = [assign(KEY, "c1", c, split) for c in customers]
    assert first == [assign(KEY, "c1", c, split) for c in customers]
    counts = Counter(first)
    assert abs(counts[None] / 20_000 - 0.7) < 0.015
    assert abs(counts["A"] - counts["B"]) < 0.05 * counts["A"]
    # Another key or another campaign puts customers elsewhere.
    other = [assign(b"x" * 32, "c1", c, split) for c in customers]
    assert sum(a != b for a, b in zip(first, other, strict=True)) > 5000
    assert first != [assign(KEY, "c2", c, split) for c in customers]


def test_wilson_matches_scipy() -> None:
    for k, n in [(0, 10), (5, 100), (100, 2000), (50, 50)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_omnibus_and_pairwise_match_scipy() -> None:
    table = [(100, 1900), (130, 1870), (90, 1910)]
    assert omnibus_p(table) == pytest.approx(
        chi2_contingency([list(r) for r in table], correction=False).pvalue
    )
    # With large cells, the z test equals the 2x2 chi-square without correction.
    two = [[100, 1900], [130, 1870]]
    assert pairwise_p((100, 2000), (130, 2000)) == pytest.approx(
        chi2_contingency(two, correction=False).pvalue
    )
    # Small counts: Fisher's exact test.
    assert pairwise_p((1, 50), (6, 50)) == pytest.approx(fisher_exact([[1, 49], [6, 44]]).pvalue)
    assert omnibus_p([(0, 10), (0, 10)]) == 1.0


def test_holm_by_hand() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]


def _ab(**kw: Any) -> AbTest:
    base: dict[str, Any] = {
        "test_share": 0.2,
        "metric": Metric.HUMAN_CLICKS,
        "decide_after_s": 60.0,
        "min_per_variant": 100,
    }
    return AbTest(**{**base, **kw})


def test_a_clear_winner_wins() -> None:
    d = decide([VariantCounts("A", 2000, clicks=100), VariantCounts("B", 2000, clicks=160)], _ab())
    assert d.winner == "B"
    assert d.chosen == "B"
    assert not d.fallback_used
    assert d.p_value is not None
    assert d.p_value < 0.05
    row = d.variants[1]
    assert row["rate"] == 0.08
    assert row["ci95"][0] < 0.08 < row["ci95"][1]


def test_identical_variants_fall_back_and_say_so() -> None:
    counts = [VariantCounts("A", 2000, clicks=100), VariantCounts("B", 2000, clicks=104)]
    control = decide(counts, _ab())
    assert control.winner is None
    assert control.chosen == "A"
    assert control.fallback_used
    assert "no significant winner" in control.reason
    assert "fallback control" in control.reason
    assert decide(counts, _ab(fallback=Fallback.BEST_OBSERVED)).chosen == "B"
    assert decide(counts, _ab(fallback=Fallback.MANUAL)).chosen is None


def test_below_the_minimum_sample_nothing_is_tested() -> None:
    d = decide([VariantCounts("A", 99, clicks=0), VariantCounts("B", 2000, clicks=900)], _ab())
    assert d.winner is None
    assert d.p_value is None
    assert "minPerVariant" in d.reason


def test_unsubscribes_lower_wins() -> None:
    counts = [VariantCounts("A", 3000, unsubscribes=90), VariantCounts("B", 3000, unsubscribes=30)]
    d = decide(counts, _ab(metric=Metric.UNSUBSCRIBES))
    assert d.winner == "B"


def test_best_must_beat_every_other_variant() -> None:
    # C beats A clearly but not B: the omnibus test rejects, the Holm step does not.
    counts = [
        VariantCounts("A", 2000, clicks=80),
        VariantCounts("B", 2000, clicks=140),
        VariantCounts("C", 2000, clicks=150),
    ]
    d = decide(counts, _ab())
    assert d.omnibus_p is not None
    assert d.omnibus_p < 0.05
    assert d.winner is None
    assert "Holm" in d.reason
    assert d.pairwise["A"] < 0.05 < d.pairwise["B"]


def test_the_result_document() -> None:
    d = decide([VariantCounts("A", 2000, clicks=100), VariantCounts("B", 2000, clicks=160)], _ab())
    out = d.document(T0)
    assert out["winner"] == "B"
    assert out["decidedAt"] == T0
    assert [v["key"] for v in out["variants"]] == ["A", "B"]
    assert set(out["variants"][0]) >= {"sent", "humanOpens", "humanClicks", "rate", "ci95"}


def test_the_decision_timer_is_wanted_while_running_undecided_and_inside_the_window() -> None:
    from reactor.domain.schedule import TimerKind, decision_due, desired_timers

    running = parse_campaign(doc(status="running"))
    assert decision_due(running) == T0 + dt.timedelta(hours=1)
    kinds = {t.key.kind for t in desired_timers(running, T0, 86400)}
    assert kinds == {TimerKind.END, TimerKind.DECIDE}
    assert decision_due(parse_campaign(doc(status="paused"))) is None  # a pause defers it
    assert decision_due(parse_campaign(doc(status="approved"))) is None
    decided = doc(status="running", abTest={**ab(), "result": {"winner": "A"}})
    assert decision_due(parse_campaign(decided)) is None
    # A decider's live claim: due again when its lease ends (it may have died).
    lease = T0 + dt.timedelta(hours=1, seconds=30)
    claimed = doc(status="running", abTest={**ab(), "decision": {"leaseUntil": lease}})
    assert decision_due(parse_campaign(claimed)) == lease
    stale = doc(status="running", abTest={**ab(), "decision": {"leaseUntil": T0}})
    assert decision_due(parse_campaign(stale)) == T0 + dt.timedelta(hours=1)
    late = doc(status="running", abTest=ab(decideAfterMinutes=300.0))  # after the 4 h window
    assert decision_due(parse_campaign(late)) is None
    plain = doc(status="running")
    del plain["variants"], plain["abTest"]
    assert {t.key.kind for t in desired_timers(parse_campaign(plain), T0, 86400)} == {TimerKind.END}


def test_the_operator_winner_is_what_the_rest_gets() -> None:
    split = parse_campaign(doc(abTest={**ab(), "result": {"chosen": "A"}, "winner": "B"})).split
    assert split is not None
    assert split.chosen == "B"
    decided = parse_campaign(doc(abTest={**ab(), "result": {"chosen": "A"}})).split
    assert decided is not None
    assert decided.chosen == "A"
    undecided = parse_campaign(doc()).split
    assert undecided is not None
    assert undecided.chosen is None
