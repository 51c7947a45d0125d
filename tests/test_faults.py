"""The multi-process fault suite at small sizes: real `reactor run` processes, real signals,
fail points and provider outages; every (campaign, channel, customer) counted."""

from __future__ import annotations

from typing import Any

import pytest

from reactor.bench.faults import SCENARIOS, run_scenario, table

# What each scenario reports beyond the common figures, and what it must be. A figure a scenario
# stops reporting fails its test (a KeyError), instead of vanishing silently.
SPECIFIC: dict[str, dict[str, Any]] = {
    "2 three instances, approvals in bursts": {"epochs_seen": [1]},  # each start claimed once
    "3 rolling restart (SIGTERM each in turn)": {"exit_codes": "all 0"},  # clean drains
    "5 history lost while down": {"history_lost_restarts": "at least 1"},
    # Each Twilio 500 may have been accepted: one uncertain row each, never retried.
    "6 SMTP down, Twilio 429 then 500": {
        "uncertain_from_provider_5xx": 20,
        "failed_rows": 0,  # outages and 429s are retried, never given up
        "failed_in_counters": 0,
    },
    # The replica that really sends the campaign is the one whose commands fail; the other
    # takes the campaign over.
    "7 MongoDB commands failing": {"injected_into_sender": True, "taken_over_by_other": True},
    "8 bad campaigns in a healthy burst": {"deliveries_for_bad": 0},
    "9 clocks 60 s ahead and 60 s behind": {"epochs_seen": [1]},  # no lease stolen
    # Taken over while stalled, and fenced: the stalled epoch marks nothing after the takeover.
    "10 owner SIGSTOPped for twice its lease": {
        "taken_over_by_other": True,
        "marks_by_stalled_epoch_after_takeover": 0,
    },
    # Twilio took them: found in its Messages list afterwards, each recorded sent, none twice.
    "12 Twilio 502 after accepting": {"resolved_with_provider": 10, "uncertain": 0},
    "13 SMTP greylisting": {"greylisted": "at least 1", "failed_rows": 0},
    "14 MongoDB unreachable at start": {"exited_while_waiting": 0},
    # Each refused DATA is deferred and sent later; none poisons the pool ('503 nested MAIL').
    "15 SMTP errors mid-transaction, three campaigns on one pool": {"failed_rows": 0},
    "16 SMTP TLS handshakes failing verification": {"failed_rows": 0, "tls_pauses": "at least 1"},
    # The cluster's email budget holds while a replica holding leased tokens dies.
    "17 a budget holder SIGKILLed, three replicas on one budget": {
        "rate_within_5pct": True,
        "owners_before_kill": "at least 2",  # the others were sending when it died
    },
    # The dead replica's shards are resumed by the others, each from the ledger.
    "18 a shard owner SIGKILLed, two replicas sending other shards": {
        "shards_taken_over": "at least 1"
    },
}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_fault_scenario_loses_nothing_and_sends_nothing_twice(scenario: str) -> None:
    result = await run_scenario(scenario, quick=True)
    print(table({scenario: result}))
    assert result["duplicates"] == 0, result
    assert result["lost"] == 0, result
    # The sinks and the ledger agree both ways (not the ledger alone).
    assert result["at_sink_not_sent"] == 0, result
    assert result["sent_not_at_sink"] == 0, result
    assert result["early_starts"] == 0, result  # by the database's clock
    assert result["uncertain"] <= result["uncertain_bound"], result
    assert result["states"].get("pending", 0) == 0, result
    for key, expected in SPECIFIC.get(scenario, {}).items():
        value = result[key]
        if expected == "all 0":
            assert value, key
            assert all(code == 0 for code in value), (key, value)
        elif isinstance(expected, str) and expected.startswith("at least "):
            assert value >= int(expected.removeprefix("at least ")), (key, value)
        else:
            assert value == expected, (key, value)


def test_every_specific_expectation_names_a_scenario() -> None:
    assert set(SPECIFIC) <= set(SCENARIOS)
