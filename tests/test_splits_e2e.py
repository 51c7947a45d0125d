"""A split campaign on three real replicas, the decider SIGKILLed mid-decision (see
reactor/bench/abtest_world.py): one decision, every customer one message of one variant."""

from __future__ import annotations

import pytest

from reactor.bench.abtest_world import scenario


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_decider_killed_mid_decision_is_replaced_and_nobody_gets_two() -> None:
    result = await scenario(1000)
    assert result["customers_not_exactly_once"] == 0, result
    assert result["wrong_variant"] == 0, result
    assert result["messages"] == 1000, result
    assert result["results_written"] == 1, result
    assert result["decision_attempts"] == 2, result  # the killed claim, then its successor's
    assert result["decided_by"] != result["killed"], result
    assert result["winner"] == "B", result
    assert result["rest_with_winner_subject"] == 1000 - result["test_group"], result
    assert result["sent_before_decision"] == result["test_group"], result  # the rest waited
