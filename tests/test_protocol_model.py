"""The claim / lease / fence / ledger protocol, explored exhaustively (reactor.domain.protocol_model).

With every mechanism on, all four properties hold; with each mechanism the model shows to
matter switched off, the specific property it protects breaks (so the model can fail), with the
shortest counterexample the breadth-first exploration finds. The two mechanisms that break
nothing in the model are asserted to break nothing, so the table in docs/reliability.md stays
true."""

from __future__ import annotations

import pytest

from reactor.domain.protocol_model import (
    OLD,
    Config,
    Mechanism,
    Property,
    explore,
    render,
    table,
)


def test_every_mechanism_on_is_safe_and_live() -> None:
    result = explore(Config())
    assert result.broken == {}
    assert result.states > 50_000  # the exploration is not vacuous


def test_two_customers_hold_too() -> None:
    """Two customers (one replica's rows next to another's), in tighter bounds."""
    cfg = Config(customers=2, max_time=4, max_epoch=2, max_ambiguous=0)
    result = explore(cfg)
    assert result.broken == {}
    assert result.states > 20_000
    broken = explore(
        Config(customers=2, max_time=5, max_epoch=2, off=frozenset({Mechanism.INSERT_ONLY_MARK})),
        stop_at=Property.AT_MOST_ONCE,
    )
    assert Property.AT_MOST_ONCE in broken.broken


@pytest.mark.parametrize(
    ("mechanism", "breaks", "steps"),
    [
        (Mechanism.LEASE, Property.ONE_SENDER, 4),
        (Mechanism.DB_CLOCK, Property.ONE_SENDER, 6),
        (Mechanism.SELF_FENCE, Property.ONE_SENDER, 7),
        (Mechanism.INSERT_ONLY_MARK, Property.AT_MOST_ONCE, 8),
        (Mechanism.SETTLE, Property.ENDS_FINAL, 3),
        (Mechanism.FORGET, Property.UNCERTAIN_ONLY_IN_DOUBT, 2),
        (Mechanism.FORGET_ONLY_UNSENT, Property.AT_MOST_ONCE, 4),
    ],
)
def test_switching_a_mechanism_off_breaks_its_property(
    mechanism: Mechanism, breaks: Property, steps: int
) -> None:
    result = explore(Config(off=frozenset({mechanism})), stop_at=breaks)
    assert breaks in result.broken
    assert len(result.broken[breaks]) == steps, result.broken[breaks]


def test_a_hand_off_that_forgets_a_sent_row_sends_twice() -> None:
    """The issue's four steps: the row of a send already handed to the provider is deleted
    at the hand-off, so whoever resumes marks it again."""
    cfg = Config(off=frozenset({Mechanism.FORGET_ONLY_UNSENT}))
    path = explore(cfg, stop_at=Property.AT_MOST_ONCE).broken[Property.AT_MOST_ONCE]
    assert path == ["r0 claims e1", "r0 marks c0", "r0 sends c0", "r0 hands off e1"]


def test_a_superseded_owner_without_the_self_fence_sends_after_the_takeover() -> None:
    cfg = Config(off=frozenset({Mechanism.SELF_FENCE}))
    path = explore(cfg, stop_at=Property.ONE_SENDER).broken[Property.ONE_SENDER]
    assert path.index("r1 claims e2") < path.index("r0 sends c0")


@pytest.mark.parametrize("mechanism", [Mechanism.CONDITIONAL_OUTCOME, Mechanism.CONDITIONAL_FORGET])
def test_mechanisms_the_model_does_not_need(mechanism: Mechanism) -> None:
    """Insert-only marks already keep every other writer off a row these writes touch; see
    docs/reliability.md for what they are for."""
    assert explore(Config(off=frozenset({mechanism}))).broken == {}


def test_the_old_protocol_sends_twice() -> None:
    """Lease expiry judged by a fast replica's clock, marks as epoch-fenced upserts."""
    result = explore(Config(off=OLD), stop_at=Property.AT_MOST_ONCE)
    path = result.broken[Property.AT_MOST_ONCE]
    assert sum("sends c0" in step for step in path) == 2


def test_the_table_reports_each_ablation() -> None:
    rows = table(Config(max_time=3, max_epoch=2))
    text = render(rows)
    assert rows[0].switched_off == "(none)"
    assert rows[0].broken == {}
    assert {row.switched_off for row in rows[1:-1]} == {m.value for m in Mechanism}
    settle = next(row for row in rows if row.switched_off == "settle")
    assert Property.ENDS_FINAL in settle.broken
    assert "| settle |" in text
    assert "BROKEN in 3 steps" in text


def test_the_bench_publishes_figures_that_can_miss() -> None:
    from reactor.bench import model as bench

    result = {
        "rows": [
            {"switched_off": "(none)", "states": 10, "broken": {}},
            {"switched_off": "lease", "states": 10, "broken": {}},
            {"switched_off": "conditional_forget", "states": 10, "broken": {}},
            {"switched_off": "settle", "states": 10, "broken": {"ends final": 3}},
        ]
    }
    figures = {f.name: f for f in bench.figures(result)}
    assert figures["properties broken with every mechanism on"].met is True
    assert (
        figures["lease off: properties broken"].met is False
    )  # a mechanism that stopped mattering
    assert figures["conditional_forget off: properties broken"].met is None
    assert figures["settle off: properties broken"].met is True
    assert figures["settle off: properties broken"].note == "ends final in 3 steps"
