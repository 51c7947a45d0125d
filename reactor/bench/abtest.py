"""A/B decision benchmark: `domain.splits.decide`, the function production runs, on simulated
tests whose truth is known.

Each simulated test draws every variant's human clicks from a binomial with its true rate
(numpy, a fixed seed per scenario), then asks `decide` for the winner at confidence 0.95 with
`fallback: best_observed`:

* A/A, 2 variants at 5 %: how often a *significant* winner is declared (goal <= 5 %);
* A/A with 3 and 4 variants: the family-wise false-winner rate (goal <= 5 %);
* a true 20 % relative lift (5 % vs 6 %), 2,000 per variant: how often the variant the rest
  receives is the better one (goal >= 80 %), with the significant-winner share (the test's
  power) and the share of significant winners that are wrong published beside it.

Then end to end (`abtest_world`): three `reactor run` processes, a split campaign of 3,000
recipients (600 with --quick), the replica that claims the decision SIGKILLed mid-decision;
counted at the SMTP sink: customers not sent exactly one message, messages of the wrong variant,
results written, and the claims it took.

Sizes are fixed before looking: 2,000 simulated tests per scenario (500 with --quick).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..domain.splits import AbTest, Fallback, Metric, VariantCounts, decide
from .abtest_world import scenario
from .figures import Figure

SOURCES = [
    "reactor/bench/abtest.py",
    "reactor/bench/abtest_world.py",
    "reactor/domain/splits.py",
    "reactor/splits/decide.py",
    "reactor/adapters/mongo/splits.py",
]
PER_VARIANT = 2000
BASE_RATE = 0.05
LIFT = 0.20


def _ab() -> AbTest:
    return AbTest(
        test_share=0.2,
        metric=Metric.HUMAN_CLICKS,
        decide_after_s=3600.0,
        min_per_variant=1000,
        confidence=0.95,
        fallback=Fallback.BEST_OBSERVED,
    )


def simulate(rates: list[float], tests: int, seed: int) -> dict[str, Any]:
    """`tests` simulated decisions for variants with true `rates` (the last one best when they
    differ); how many declared a winner, and which."""
    rng = np.random.default_rng(seed)
    ab = _ab()
    keys = [f"v{i}" for i in range(len(rates))]
    best = keys[int(np.argmax(rates))] if len(set(rates)) > 1 else None
    significant = right_chosen = wrong_significant = 0
    t0 = time.perf_counter()
    for _ in range(tests):
        clicks = rng.binomial(PER_VARIANT, rates)
        counts = [
            VariantCounts(k, PER_VARIANT, clicks=int(c)) for k, c in zip(keys, clicks, strict=True)
        ]
        decision = decide(counts, ab)
        if decision.winner is not None:
            significant += 1
            if decision.winner != best:
                wrong_significant += 1
        if best is not None and decision.chosen == best:
            right_chosen += 1
    elapsed = time.perf_counter() - t0
    return {
        "rates": rates,
        "tests": tests,
        "significant_winner_rate": significant / tests,
        "right_chosen_rate": right_chosen / tests if best else None,
        "wrong_significant_rate": wrong_significant / tests,
        "decide_ms": 1000 * elapsed / tests,
    }


async def run(quick: bool) -> dict[str, Any]:
    tests = 500 if quick else 2000
    lifted = BASE_RATE * (1 + LIFT)
    return {
        "per_variant": PER_VARIANT,
        "confidence": 0.95,
        "aa2": simulate([BASE_RATE] * 2, tests, seed=1),
        "aa3": simulate([BASE_RATE] * 3, tests, seed=2),
        "aa4": simulate([BASE_RATE] * 4, tests, seed=3),
        "lift": simulate([BASE_RATE, lifted], tests, seed=4),
        "end_to_end": await scenario(600 if quick else 3000),
    }


def figures(result: dict[str, Any]) -> list[Figure]:
    pct = 100.0
    lift = result["lift"]
    n = result["aa2"]["tests"]
    return [
        Figure(
            "A/A, 2 variants: significant winner declared",
            pct * result["aa2"]["significant_winner_rate"],
            "%",
            goal=5.0,
            op="<=",
            note=f"{n} simulated tests at 5 %, {PER_VARIANT} per variant",
        ),
        Figure(
            "A/A, 3 variants: family-wise false winner",
            pct * result["aa3"]["significant_winner_rate"],
            "%",
            goal=5.0,
            op="<=",
        ),
        Figure(
            "A/A, 4 variants: family-wise false winner",
            pct * result["aa4"]["significant_winner_rate"],
            "%",
            goal=5.0,
            op="<=",
        ),
        Figure(
            "20 % lift (5 % vs 6 %): the rest gets the better variant",
            pct * lift["right_chosen_rate"],
            "%",
            goal=80.0,
            op=">=",
            note="significant winner, else fallback best_observed",
        ),
        Figure(
            "20 % lift: significant winner declared (power)",
            pct * lift["significant_winner_rate"],
            "%",
        ),
        Figure(
            "20 % lift: significant winner that is the worse variant",
            pct * lift["wrong_significant_rate"],
            "%",
            goal=2.5,
            op="<=",
        ),
        Figure("one decision", lift["decide_ms"], "ms"),
        *_end_to_end(result["end_to_end"]),
    ]


def _end_to_end(e2e: dict[str, Any]) -> list[Figure]:
    where = f"{e2e['customers']} recipients, 3 replicas, the decider SIGKILLed"
    return [
        Figure(
            "end to end: customers not sent exactly one message",
            e2e["customers_not_exactly_once"],
            goal=0,
            op="==",
            note=where,
        ),
        Figure("end to end: messages of the wrong variant", e2e["wrong_variant"], goal=0, op="=="),
        Figure("end to end: A/B results written", e2e["results_written"], goal=1, op="=="),
        Figure(
            "end to end: decision claims (the killed one's, then its successor's)",
            e2e["decision_attempts"],
            goal=2,
            op="==",
        ),
    ]
