"""The fault suite: real `reactor run` OS processes against the embedded MongoDB server, the SMTP
sink and the Twilio fake (all three in this process, where faults are injected), one scenario
at a time. Each scenario runs several campaigns to hundreds of customers and then counts, per
(campaign, channel, customer), what the sinks received and what the ledger says:

    duplicates  messages a sink received more than once            (must be 0)
    lost        targeted (customer, channel) with no final ledger row (must be 0)
    at sink, not sent   a message a sink took whose row is not `sent`/`uncertain` (must be 0)
    sent, not at sink   a `sent` row no sink took                       (must be 0)
    uncertain   rows whose outcome cannot be known     (at most the concurrency bound per crash)

plus start lateness p99 and recovery time (from the end of the fault to every campaign's sends
being done).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..embedded.tls import make_test_pki
from .fault_scenarios import (
    bad_campaigns_in_burst,
    budget_holder_killed,
    heartbeats_failing,
    history_lost_while_down,
    kill_owner,
    mongo_failing,
    mongo_unreachable_at_start,
    owner_stalled,
    providers_failing,
    rolling_restart,
    shard_owner_killed,
    skewed_clocks,
    smtp_errors_mid_transaction,
    smtp_greylisting,
    smtp_tls_rejected,
    stream_closed_repeatedly,
    three_instances_bursts,
    twilio_accepts_then_502,
)
from .fault_world import (
    World,
    world,
)
from .figures import Figure

SCENARIOS: dict[str, Callable[[World, bool], Awaitable[dict[str, Any]]]] = {
    "1 owner SIGKILLed, another takes over": kill_owner,
    "2 three instances, approvals in bursts": three_instances_bursts,
    "3 rolling restart (SIGTERM each in turn)": rolling_restart,
    "4 change stream closed repeatedly": stream_closed_repeatedly,
    "5 history lost while down": history_lost_while_down,
    "6 SMTP down, Twilio 429 then 500": providers_failing,
    "7 MongoDB commands failing": mongo_failing,
    "8 bad campaigns in a healthy burst": bad_campaigns_in_burst,
    "9 clocks 60 s ahead and 60 s behind": skewed_clocks,
    "10 owner SIGSTOPped for twice its lease": owner_stalled,
    "11 owner's lease renewals failing": heartbeats_failing,
    "12 Twilio 502 after accepting": twilio_accepts_then_502,
    "13 SMTP greylisting": smtp_greylisting,
    "14 MongoDB unreachable at start": mongo_unreachable_at_start,
    "15 SMTP errors mid-transaction, three campaigns on one pool": smtp_errors_mid_transaction,
    "16 SMTP TLS handshakes failing verification": smtp_tls_rejected,
    "17 a budget holder SIGKILLed, three replicas on one budget": budget_holder_killed,
    "18 a shard owner SIGKILLed, two replicas sending other shards": shard_owner_killed,
}
TLS_SCENARIOS = {"16 SMTP TLS handshakes failing verification"}


async def run_scenario(name: str, quick: bool) -> dict[str, Any]:
    customers = 120 if quick else 400
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        pki = await asyncio.to_thread(make_test_pki, Path(tmp)) if name in TLS_SCENARIOS else None
        async with world(customers, tls=pki) as w:
            result = await SCENARIOS[name](w, quick)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["ok"] = (
        result["duplicates"] == 0
        and result["lost"] == 0
        and result["at_sink_not_sent"] == 0
        and result["sent_not_at_sink"] == 0
        and result["early_starts"] == 0
        and result["uncertain"] <= result["uncertain_bound"]
    )
    return result


async def run(quick: bool = False) -> dict[str, Any]:
    results = {}
    for name in SCENARIOS:
        results[name] = await run_scenario(name, quick)
        print(f"  {name}: {results[name]}", flush=True)
    print(table(results))
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | deliveries | duplicates | lost | at sink, not sent | sent, not at sink | "
        "early starts | uncertain (bound) | start p99 ms | recovery s | ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['deliveries_expected']} | {r['duplicates']} | {r['lost']} | "
            f"{r['at_sink_not_sent']} | {r['sent_not_at_sink']} | {r['early_starts']} | "
            f"{r['uncertain']} ({r['uncertain_bound']}) | {r['start_lateness_p99_ms']} | "
            f"{r['recovery_s']} | {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines)


SOURCES = [
    "reactor/bench/faults.py",
    "reactor/bench/fault_scenarios.py",
    "reactor/bench/fault_world.py",
    "reactor/execution",
    "reactor/adapters/mongo/ledger.py",
    "reactor/adapters/mongo/campaigns.py",
    "reactor/adapters/mongo/shards.py",
]


def figures(results: dict[str, dict[str, Any]]) -> list[Figure]:
    """Per scenario: the receipts' disagreements with the ledger (goal 0) and the uncertain
    rows against their bound; recovery for information."""
    out: list[Figure] = []
    for name, r in results.items():
        wrong = (
            r["duplicates"]
            + r["lost"]
            + r["at_sink_not_sent"]
            + r["sent_not_at_sink"]
            + r["early_starts"]
        )
        out.append(
            Figure(
                f"{name}: duplicates + lost + sink/ledger mismatches + early starts "
                f"({r['deliveries_expected']} deliveries)",
                wrong,
                goal=0,
                op="==",
            )
        )
        out.append(
            Figure(
                f"{name}: uncertain rows (bound {r['uncertain_bound']})",
                r["uncertain"],
                goal=r["uncertain_bound"],
                op="<=",
            )
        )
        out.append(Figure(f"{name}: recovery", r["recovery_s"], "s"))
    return out
