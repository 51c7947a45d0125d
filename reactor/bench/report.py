"""Markdown for `python -m reactor.bench all`: the tables of its `reports/report.md` (the
published figures are `figures.py`'s, in docs/figures.md)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from .faults import table as faults_table


def _ms(summary: dict[str, Any]) -> str:
    return f"{summary['p50_ms']} / {summary['p99_ms']} / {summary['max_ms']}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        f"Measured {results['measured_at']} on {m['cpu']} ({m['cores']} cores, "
        f"{m['memory_gib']} GiB), Python {m['python']}; one run, so read ratios, not "
        "absolute figures.",
        "",
    ]
    for name, section in _SECTIONS.items():
        if name in results:
            out += section(results)
    return "\n".join(out)


def _emulator(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    e = results["emulator"]
    out += [
        "| Emulator | Figure |",
        "| --- | ---: |",
        f"| inserts/s, one at a time | {e['inserts_per_s_sequential']} |",
        f"| inserts/s, batches of 1,000 | {e['inserts_per_s_bulk_1000']} |",
        f"| insert ack → change event p50 / p99 / max (ms) | "
        f"{_ms(e['insert_ack_to_event'])} (target p99 ≤ {e['target_p99_ms']}) |",
        "",
    ]
    return out


def _scheduling(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    s = results["scheduling"]
    b = s["burst"]
    out += [
        "| Scheduling | p50 / p99 / max (ms) | Target |",
        "| --- | ---: | ---: |",
        f"| timer-fire lateness, {s['measured_starts']} starts among "
        f"{s['timers_armed_in_background']:,} armed | {_ms(s['timer_fire_lateness'])} "
        "| p99 ≤ 5 |",
        f"| start lateness to committed `running` | "
        f"{_ms(s['start_lateness_to_running'])} | p99 ≤ 50 |",
        f"| approval → armed | {_ms(s['approval_to_armed'])} | p99 ≤ 100 |",
        f"| burst: {b['campaigns_due_at_once']:,} due at once, lateness | "
        f"{_ms(b['start_lateness'])} | {b['starts_per_s']} starts/s |",
        f"| memory per armed timer | {s['memory_per_armed_timer_bytes']} bytes | ≤ 1,024 |",
        "",
    ]
    return out


def _sending(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    s = results["sending"]
    out += [
        f"| Sending (pool {s['pool_size']}, concurrency {s['concurrency']}, "
        f"median of {s.get('rounds', 1)} rounds) | reactor | ceiling (bare pool) | "
        "old (a connection per message) | vs ceiling | vs old | ceiling vs old | "
        "reactor process CPU per email (ms) | host steal %, ceiling / reactor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in sorted((k for k in s if k.startswith("rtt_")), key=lambda k: int(k[4:-2])):
        rtt = int(key[4:-2])
        label = (
            "sink on loopback, answers at once"
            if rtt == 0
            else f"sink answering after a {rtt} ms round trip"
        )
        r = s[key]
        out.append(
            f"| {label} (emails/s) | {r['reactor_emails_per_s']} | "
            f"{r['ceiling_emails_per_s']} | {r['old_approach_emails_per_s']} | "
            f"{r['reactor_vs_ceiling']} | {r['reactor_vs_old']} | "
            f"{r.get('ceiling_vs_old', '')} | "
            f"{r.get('reactor_cpu_ms_per_email') or 'n/a'} | {_steal(r)} |"
        )
    rl = s["rate_limit"]
    a = s["audience"]
    out += [
        "",
        f"Rate limit: configured {rl['configured_per_s']}/s, achieved "
        f"{rl['achieved_per_s']}/s ({rl['overall_deviation_pct']} %), per-second "
        f"min/max {rl['per_second_min']}/{rl['per_second_max']} over "
        f"{rl['seconds']} s. Audience: {a['ids']:,} ids resolved in batches of "
        f"{a['batch']:,} in {a['seconds']} s ({a['ids_per_s']:,} ids/s), peak "
        f"client memory {a['peak_memory_mib']} MiB.",
        "",
    ]
    return out


def _consent(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    u = results["consent"]["unsubscribe_to_every_replica"]
    c = results["consent"]["suppression_check"]
    out += [
        "| Consent | Figure | Target |",
        "| --- | ---: | ---: |",
        f"| one-click POST → suppression held by all {u['replicas']} replicas, "
        f"{u['unsubscribes']} unsubscribes mid-campaign, p50 / p99 / max (ms) | "
        f"{u['p50_ms']} / {u['p99_ms']} / {u['max_ms']} | p99 ≤ 1000 |",
        f"| of those, skipped `suppressed:unsubscribed` / sent anyway | "
        f"{u['skipped_suppressed']} / {u['sent_anyway']} | all / 0 |",
        f"| recipients/s with the suppression check ÷ without "
        f"({c['suppression_entries']:,} entries, median of {c['rounds']}) | "
        f"{c['checked_vs_unchecked']} ({c['checked_per_s']} vs {c['unchecked_per_s']}) | ≥ 0.9 |",
        "",
    ]
    return out


def _webhooks(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    w = results["webhooks"]
    sat = w["saturation_phase"]
    out += [
        "| Webhooks (one reactor, campaigns sending; every event a change) | Figure | Target |",
        "| --- | ---: | ---: |",
        f"| highest offered rate with p99 ≤ 50 ms | {w['highest_rate_within_p99_goal']}/s "
        "| ≥ 1000/s |",
        *(
            f"| p50 / p99 at {step['offered_per_s']:g}/s offered (ms) | "
            f"{step['p50_ms']} / {step['p99_ms']} | p99 ≤ 50 |"
            for step in w["steps"]
        ),
        f"| completed per second, {sat['offered_per_s']:g}/s offered | "
        f"{sat['completed_per_s']} | ≥ 1000 |",
        f"| changes missing / beyond the events | {w['changes']['missing']} / "
        f"{w['changes']['extra']} | 0 / 0 |",
        f"| complaint-rate pause during the load | {w['complaint_pause_during_load']} | True |",
        "",
    ]
    return out


def _scale(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    out += [
        "| Cluster-wide budget (50/s) | emails/s | overall deviation | worst second |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("budget_50_per_s_three_replicas", "three replicas sharing it"),
        ("budget_50_per_s_one_replica", "one replica alone"),
    ):
        b = results["scale"][key]
        out.append(
            f"| {label} ({b['seconds']} s) | {b['overall_per_s']} | "
            f"{b['overall_deviation_pct']} % | {b['worst_second_deviation_pct']} % |"
        )
    out.append("")
    return out


def _faults(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    out += [faults_table(results["faults"]), ""]
    return out


_SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "emulator": _emulator,
    "scheduling": _scheduling,
    "sending": _sending,
    "consent": _consent,
    "webhooks": _webhooks,
    "scale": _scale,
    "faults": _faults,
}


def _steal(row: dict[str, Any]) -> str:
    """Median host steal over the ceiling's and the reactor's rounds, e.g. "2.1 / 14.0"."""
    ceiling, reactor = (
        row.get("ceiling_steal_pct_per_round"),
        row.get("reactor_steal_pct_per_round"),
    )
    if not ceiling or not reactor:
        return ""
    return f"{statistics.median(ceiling):.1f} / {statistics.median(reactor):.1f}"
