"""The multi-process fault suite at small sizes: real `reactor run` processes, real signals,
fail points and provider outages; every (campaign, channel, customer) counted."""

from __future__ import annotations

import pytest

from reactor.bench.faults import SCENARIOS, run_scenario, table


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_fault_scenario_loses_nothing_and_sends_nothing_twice(scenario: str) -> None:
    result = await run_scenario(scenario, quick=True)
    print(table({scenario: result}))
    assert result["duplicates"] == 0, result
    assert result["lost"] == 0, result
    assert result["uncertain"] <= result["uncertain_bound"], result
    assert result["states"].get("pending", 0) == 0, result
    if "deliveries_for_bad" in result:
        assert result["deliveries_for_bad"] == 0
    if "history_lost_restarts" in result:
        assert result["history_lost_restarts"] >= 1
    if "epochs_seen" in result:
        assert result["epochs_seen"] == [1]  # each start claimed exactly once
    if "exit_codes" in result:
        assert all(code == 0 for code in result["exit_codes"])  # clean SIGTERM drains
