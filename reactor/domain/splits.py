"""A/B splits, pure: the campaign's `variants` and `abTest` parsed and validated, each customer's
keyed assignment, and the significance test that picks the winner.

Assignment is an HMAC-SHA256 of (campaign, customer) under the split key, read as a number in
[0, 1): below `testShare` the customer is in the test group, and the position inside the share
picks one of the k variants evenly; at or above it the customer waits for the winner. Every
replica, shard, retry and resume computes the same answer without coordination.

The decision (`decide`) compares the variants' human rates (one customer = one unit: sent, and
did or did not open / click / unsubscribe). It is a closed test at level alpha = 1 - confidence:

1. omnibus: Pearson's chi-square test of homogeneity on the 2 x k table
   (`scipy.stats.chi2_contingency`, no continuity correction); not significant -> no winner;
2. the best observed variant against each other one: a pooled two-proportion z test (two-sided;
   Fisher's exact test, `scipy.stats.fisher_exact`, when an expected cell is below 5), with
   Holm's step-down correction over the k - 1 comparisons; the best wins only if it beats every
   other one.

A winner therefore needs both the omnibus test and every Holm-adjusted comparison to reject, so
the family-wise chance of declaring a winner among identical variants is at most alpha. Below
`minPerVariant` sends in any variant nothing is tested. Without a significant winner the
`fallback` decides what the rest receives (`control`: the first variant; `best_observed`: the
best rate seen; `manual`: nothing until an operator writes `abTest.winner`), and the result says
so. References: Agresti, *Categorical Data Analysis* (3rd ed.), 3.2 and 16.6 (chi-square and
Fisher); Holm (1979), *A simple sequentially rejective multiple test procedure*; Wilson (1927)
for the score interval.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import InvalidCampaign

MIN_VARIANTS = 2
MAX_VARIANTS = 8
MAX_KEY_CHARS = 64
KEY = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_KEY_CHARS}}}$")
MAX_DECIDE_MINUTES = 60 * 24 * 90
DEFAULT_CONFIDENCE = 0.95
CONTENT_FIELDS = {"email": ("subject", "html", "text"), "sms": ("body",)}
WAITS = None  # the assignment of a customer outside the test group


class Metric(StrEnum):
    HUMAN_CLICKS = "human_clicks"
    HUMAN_OPENS = "human_opens"
    UNSUBSCRIBES = "unsubscribes"  # lower wins

    @property
    def lower_wins(self) -> bool:
        return self is Metric.UNSUBSCRIBES


class Fallback(StrEnum):
    CONTROL = "control"
    BEST_OBSERVED = "best_observed"
    MANUAL = "manual"


@dataclass(frozen=True)
class Variant:
    """One variant: its key and the content fields it overrides (`email`: subject/html/text;
    `sms`: body); what it leaves out it inherits from the campaign."""

    key: str
    email: dict[str, str] = field(default_factory=dict)
    sms: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AbTest:
    test_share: float
    metric: Metric
    decide_after_s: float
    min_per_variant: int
    confidence: float = DEFAULT_CONFIDENCE
    fallback: Fallback = Fallback.CONTROL
    winner: str | None = None  # written by an operator: overrides any decision
    result: dict[str, Any] | None = None  # written once by the decider
    claimed_until: dt.datetime | None = None  # a decider's claim (abTest.decision.leaseUntil)


@dataclass(frozen=True)
class Split:
    variants: tuple[Variant, ...]
    ab: AbTest

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(v.key for v in self.variants)

    def variant(self, key: str) -> Variant | None:
        return next((v for v in self.variants if v.key == key), None)

    @property
    def chosen(self) -> str | None:
        """What the rest of the audience receives: the operator's winner, else the decision's
        choice; None while it is not known (or a `manual` fallback awaits the operator)."""
        if self.ab.winner is not None:
            return self.ab.winner
        if self.ab.result is not None:
            chosen = self.ab.result.get("chosen")
            return chosen if isinstance(chosen, str) and chosen in self.keys else None
        return None

    def decide_at(self, start_at: dt.datetime) -> dt.datetime:
        return start_at + dt.timedelta(seconds=self.ab.decide_after_s)


# ---- parsing -------------------------------------------------------------------------------


def _bad(where: str, detail: str) -> InvalidCampaign:
    return InvalidCampaign(f"bad_{where.split('.')[0].split('[')[0]}", f"{where} {detail}")


def _number(raw: dict[str, Any], name: str) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"abTest.{name}", f"must be a number, got {value!r}")
    return float(value)


def _whole(raw: dict[str, Any], name: str, *, low: int, high: int) -> int:
    value = _number(raw, name)
    if value is None:
        raise _bad(f"abTest.{name}", "is missing")
    if not value.is_integer() or not low <= value <= high:
        raise _bad(f"abTest.{name}", f"must be a whole number from {low} to {high}")
    return int(value)


def parse_variant(raw: Any, i: int, seen: set[str]) -> Variant:
    where = f"variants[{i}]"
    if not isinstance(raw, dict):
        raise _bad(where, "must be a document")
    key = raw.get("key")
    if not isinstance(key, str) or not KEY.match(key):
        # Keys become field names in the result and metric labels: letters, digits, _ and -.
        raise _bad(f"{where}.key", f"must be 1 to {MAX_KEY_CHARS} letters, digits, _ or -")
    if key in seen:
        raise _bad(f"{where}.key", f"repeats {key!r}")
    seen.add(key)
    overrides: dict[str, dict[str, str]] = {"email": {}, "sms": {}}
    for part, names in CONTENT_FIELDS.items():
        sub = raw.get(part)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise _bad(f"{where}.{part}", "must be a document")
        for name in names:
            value = sub.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise _bad(f"{where}.{part}.{name}", "must be a string")
            overrides[part][name] = value
    return Variant(key=key, email=overrides["email"], sms=overrides["sms"])


def parse_ab_test(raw: Any, keys: Sequence[str]) -> AbTest:
    if not isinstance(raw, dict):
        raise _bad("abTest", "must be a document when variants are given")
    share = _number(raw, "testShare")
    if share is None or not 0.0 < share <= 1.0:
        raise _bad("abTest.testShare", f"must be a number in (0, 1], got {raw.get('testShare')!r}")
    metric = raw.get("metric")
    if metric not in {m.value for m in Metric}:
        raise _bad("abTest.metric", f"must be one of {[m.value for m in Metric]}, got {metric!r}")
    minutes = _number(raw, "decideAfterMinutes")
    if minutes is None or not 0 < minutes <= MAX_DECIDE_MINUTES:
        raise _bad("abTest.decideAfterMinutes", f"must be a number in (0, {MAX_DECIDE_MINUTES}]")
    min_per = _whole(raw, "minPerVariant", low=1, high=10_000_000)
    confidence = _number(raw, "confidence")
    confidence = DEFAULT_CONFIDENCE if confidence is None else confidence
    if not 0.5 <= confidence < 1.0:
        raise _bad("abTest.confidence", f"must be in [0.5, 1), got {confidence!r}")
    fallback = raw.get("fallback", Fallback.CONTROL.value)
    if fallback not in {f.value for f in Fallback}:
        raise _bad("abTest.fallback", f"must be one of {[f.value for f in Fallback]}")
    winner = raw.get("winner")
    if winner is not None and winner not in keys:
        raise _bad("abTest.winner", f"names no variant: {winner!r}")
    result = raw.get("result")
    decision = raw.get("decision")
    lease = decision.get("leaseUntil") if isinstance(decision, dict) else None
    if isinstance(lease, dt.datetime):
        lease = lease.replace(tzinfo=dt.UTC) if lease.tzinfo is None else lease.astimezone(dt.UTC)
    return AbTest(
        test_share=share,
        metric=Metric(metric),
        decide_after_s=minutes * 60.0,
        min_per_variant=min_per,
        confidence=confidence,
        fallback=Fallback(fallback),
        winner=winner,
        result=result if isinstance(result, dict) else None,
        claimed_until=lease if isinstance(lease, dt.datetime) else None,
    )


def parse_split(variants: Any, ab_test: Any) -> Split | None:
    """The split of a campaign document, None without `variants`; raises InvalidCampaign
    (reason `bad_variants` / `bad_abTest`) naming the field."""
    if variants is None or variants == []:
        if ab_test is not None and ab_test != {}:
            raise _bad("abTest", "is given but there are no variants")
        return None
    if not isinstance(variants, list) or not MIN_VARIANTS <= len(variants) <= MAX_VARIANTS:
        raise _bad("variants", f"must be a list of {MIN_VARIANTS} to {MAX_VARIANTS} variants")
    seen: set[str] = set()
    parsed = tuple(parse_variant(raw, i, seen) for i, raw in enumerate(variants))
    return Split(variants=parsed, ab=parse_ab_test(ab_test, [v.key for v in parsed]))


# ---- assignment ----------------------------------------------------------------------------


def position(key: bytes, campaign: str, customer: str) -> float:
    """The customer's place in [0, 1) for this campaign: HMAC-SHA256 under `key`."""
    digest = hmac.new(key, f"{campaign}\x00{customer}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(key: bytes, campaign: str, customer: str, split: Split) -> str | None:
    """The customer's variant key, or None (WAITS) outside the test group."""
    u = position(key, campaign, customer)
    share = split.ab.test_share
    if u >= share:
        return WAITS
    k = len(split.variants)
    return split.variants[min(k - 1, int(u / share * k))].key


# ---- the decision --------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantCounts:
    """One variant's human-only counts: customers sent to, and of those, customers with a human
    open, a human click, an unsubscribe."""

    key: str
    sent: int
    opens: int = 0
    clicks: int = 0
    unsubscribes: int = 0

    def successes(self, metric: Metric) -> int:
        if metric is Metric.HUMAN_OPENS:
            return self.opens
        if metric is Metric.HUMAN_CLICKS:
            return self.clicks
        return self.unsubscribes


def _stats() -> Any:
    """scipy.stats, imported when a decision is first made (not when a campaign is parsed)."""
    import scipy.stats  # type: ignore[import-untyped]

    return scipy.stats


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ((0, 1) when n is 0)."""
    if n <= 0:
        return (0.0, 1.0)
    z = float(_stats().norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def omnibus_p(table: Sequence[tuple[int, int]]) -> float:
    """Chi-square test of homogeneity on [(successes, failures)] rows; 1.0 when a column is
    empty (every variant at 0 % or at 100 %: nothing differs)."""
    if sum(s for s, _ in table) == 0 or sum(f for _, f in table) == 0:
        return 1.0
    return float(_stats().chi2_contingency([list(r) for r in table], correction=False).pvalue)


def pairwise_p(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Two-sided p of equal proportions for (successes, n) pairs: pooled z test, or Fisher's
    exact test when an expected cell count is below 5."""
    (s1, n1), (s2, n2) = a, b
    total = s1 + s2
    pooled = total / (n1 + n2)
    if pooled in (0.0, 1.0):
        return 1.0
    expected = min(n1 * pooled, n1 * (1 - pooled), n2 * pooled, n2 * (1 - pooled))
    if expected < 5:
        return float(_stats().fisher_exact([[s1, n1 - s1], [s2, n2 - s2]]).pvalue)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = (s1 / n1 - s2 / n2) / se
    return float(2 * _stats().norm.sf(abs(z)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Decision:
    winner: str | None  # the significant winner, if any
    chosen: str | None  # what the rest receives (the winner, the fallback's pick, or None)
    p_value: float | None  # the closed test's p (max of omnibus and adjusted pairwise)
    reason: str
    fallback_used: bool
    variants: tuple[dict[str, Any], ...]
    omnibus_p: float | None = None
    pairwise: dict[str, float] = field(default_factory=dict)  # Holm-adjusted p vs the best

    def document(self, decided_at: dt.datetime | None = None) -> dict[str, Any]:
        """The `abTest.result` sub-document (decidedAt is the database's time when None)."""
        doc: dict[str, Any] = {
            "winner": self.winner,
            "chosen": self.chosen,
            "pValue": self.p_value,
            "omnibusP": self.omnibus_p,
            "pairwiseP": dict(self.pairwise),
            "reason": self.reason,
            "fallbackUsed": self.fallback_used,
            "variants": [dict(v) for v in self.variants],
        }
        if decided_at is not None:
            doc["decidedAt"] = decided_at
        return doc


def variant_rows(counts: Sequence[VariantCounts], metric: Metric) -> tuple[dict[str, Any], ...]:
    rows = []
    for c in counts:
        s = c.successes(metric)
        low, high = wilson(s, c.sent)
        rows.append(
            {
                "key": c.key,
                "sent": c.sent,
                "humanOpens": c.opens,
                "humanClicks": c.clicks,
                "unsubscribes": c.unsubscribes,
                "rate": s / c.sent if c.sent else 0.0,
                "ci95": [low, high],
            }
        )
    return tuple(rows)


def best_observed(counts: Sequence[VariantCounts], metric: Metric) -> str:
    """The best rate seen (ties to the earlier variant: the control first)."""

    def score(c: VariantCounts) -> float:
        rate = c.successes(metric) / c.sent if c.sent else 0.0
        return -rate if metric.lower_wins else rate

    return max(counts, key=score).key


def decide(counts: Sequence[VariantCounts], ab: AbTest) -> Decision:
    """Pick the winner of a test from its human-only counts (variants in the campaign's order,
    the first is the control). Pure: the same function runs in production and in the bench."""
    metric, alpha = ab.metric, 1.0 - ab.confidence
    rows = variant_rows(counts, metric)
    best = best_observed(counts, metric)
    if any(c.sent < ab.min_per_variant for c in counts):
        small = [c.key for c in counts if c.sent < ab.min_per_variant]
        return _fallback(
            counts, ab, rows, best, f"below minPerVariant={ab.min_per_variant}: {small}", None, {}
        )
    table = [(c.successes(metric), c.sent - c.successes(metric)) for c in counts]
    p_all = omnibus_p(table)
    by_key = {c.key: (c.successes(metric), c.sent) for c in counts}
    others = [c.key for c in counts if c.key != best]
    raw = [pairwise_p(by_key[best], by_key[k]) for k in others]
    adjusted = dict(zip(others, holm(raw), strict=True))
    p_value = max([p_all, *adjusted.values()])
    if p_all >= alpha:
        reason = f"omnibus chi-square not significant (p={p_all:.4g} >= {alpha:.4g})"
        return _fallback(counts, ab, rows, best, reason, p_value, adjusted, p_all)
    if p_value >= alpha:
        worst = max(adjusted, key=lambda k: adjusted[k])
        reason = (
            f"{best} does not beat {worst} after Holm correction "
            f"(p={adjusted[worst]:.4g} >= {alpha:.4g})"
        )
        return _fallback(counts, ab, rows, best, reason, p_value, adjusted, p_all)
    return Decision(
        winner=best,
        chosen=best,
        p_value=p_value,
        reason=f"{best} is significantly {'lowest' if metric.lower_wins else 'best'} "
        f"at confidence {ab.confidence:g} (p={p_value:.4g})",
        fallback_used=False,
        variants=rows,
        omnibus_p=p_all,
        pairwise=adjusted,
    )


def _fallback(
    counts: Sequence[VariantCounts],
    ab: AbTest,
    rows: tuple[dict[str, Any], ...],
    best: str,
    why: str,
    p_value: float | None,
    pairwise: dict[str, float],
    p_all: float | None = None,
) -> Decision:
    chosen: str | None
    if ab.fallback is Fallback.CONTROL:
        chosen = counts[0].key
    elif ab.fallback is Fallback.BEST_OBSERVED:
        chosen = best
    else:
        chosen = None
    then = f"fallback {ab.fallback.value}: " + (chosen or "waiting for an operator's abTest.winner")
    return Decision(
        winner=None,
        chosen=chosen,
        p_value=p_value,
        reason=f"no significant winner ({why}); {then}",
        fallback_used=True,
        variants=rows,
        omnibus_p=p_all,
        pairwise=pairwise,
    )
