"""The claim / lease / fence / ledger protocol, explored exhaustively (reactor.domain.protocol_model):
every interleaving of two and three replicas with crashes, stalls, failed renewals and skewed
clocks. The reactor's protocol holds; the one it replaced, and a weakened one, are caught."""

from __future__ import annotations

import dataclasses

import pytest

from reactor.domain import protocol_model as model
from reactor.domain.protocol_model import Config, Protocol, explore


def test_the_current_protocol_holds_for_two_replicas() -> None:
    result = explore(Protocol.CURRENT, Config(replicas=2))
    assert result.violation is None
    assert result.unfinished is None
    assert result.states > 50_000  # the exploration is not vacuous


def test_the_current_protocol_holds_for_three_replicas() -> None:
    result = explore(Protocol.CURRENT, Config(replicas=3, max_time=5, skews=(2, -2, 0)))
    assert result.violation is None
    assert result.unfinished is None
    assert result.states > 50_000


def test_the_old_protocol_sends_twice() -> None:
    """Lease expiry judged by a fast replica's clock, ledger writes fenced by `epoch <= mine`:
    the duplicate the issue saw with a replica 40 s ahead."""
    result = explore(Protocol.OLD, Config(replicas=2))
    assert result.violation is not None
    assert "r0 claims e2" in result.violation or "r1 claims e2" in result.violation
    assert sum(step.endswith("sends c0") for step in result.violation) == 2


def test_a_mark_that_overwrites_a_pending_row_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop one guard (a mark may take over an earlier epoch's pending row) and the explorer
    finds the stalled owner's late send."""
    original = model._may_mark

    def weaker(protocol: Protocol, row: tuple[str, int] | None, r: model.Replica, c: int) -> bool:
        if row is not None and row[0] == model.PENDING and row[1] < r.epoch:
            return True
        return original(protocol, row, r, c)

    monkeypatch.setattr(model, "_may_mark", weaker)
    result = explore(Protocol.CURRENT, Config(replicas=2))
    assert result.violation is not None


def test_a_settle_of_a_live_owners_row_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the final settle in finish() (no one settles a stalled owner's late mark), some
    customer is left pending forever: the liveness check catches it."""

    def no_settle(state: model.State, cfg: Config, protocol: Protocol) -> model.State | None:
        done = original(state, cfg, protocol)
        if done is None:
            return None
        ledger = tuple(
            row if before is None or before[0] != model.PENDING else before
            for row, before in zip(done.ledger, state.ledger, strict=True)
        )
        return dataclasses.replace(done, ledger=ledger)

    original = model.finish
    monkeypatch.setattr(model, "finish", no_settle)
    result = explore(Protocol.CURRENT, Config(replicas=2))
    assert result.unfinished is not None
