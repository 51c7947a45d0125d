"""Webhook benchmark: one reactor absorbs provider events about campaigns that are sending.

Setup: one `reactor run` process (the providers' fakes, the bench and the load generator in
other processes); three campaigns start and keep sending through the whole load (200 SMS/s and 200
emails/s): "texts" (SMS), "bounces" and "complaints" (email). The Twilio fake records each
message's StatusCallback but does not call it, so no ledger row has a delivery status yet.
Once enough has gone out, every event of the load is built from what the providers accepted:

- SMS delivery receipts (60 %): one per sent message, its final status (delivered,
  undelivered or failed, 3:1:1), posted to the message's own StatusCallback URL, signed as
  Twilio signs: each moves a row with no status to a final one and counts on "texts".
- hard bounces (10 %), each for a distinct address "bounces" sent to: a suppression and a
  count on "bounces"; soft bounces (15 %), two for each address of another set of "bounces":
  the address's soft-bounce count and the campaign's counter;
- complaints (10 %), each for a distinct address "complaints" sent to: a suppression and a
  count, and the complaint-rate auto-pause (0.1 % once 1,000 emails went out) must fire during
  the load: the bench checks that "complaints" is paused with that reason, inside the load;
- replays (5 %): an email event sent again at least 200 events after its first time (same
  provider id): they must change nothing, which the counters after the load show.

Two phases of fresh events (the load generator in its own process, open loop: each request at
its scheduled instant, its latency measured from that instant, so queueing counts):

- stepped: offered at 125, 250, 500, 1,000 and 2,000 events/s (3 s each; --quick 1.5 s),
  stopping after the first step whose p99 is over 50 ms: p50/p99 per step and per event
  type, and the highest offered rate within the goal (goal ≥ 1,000/s);
- saturating: the rest of the events offered at 4,000/s, more than one process on this
  machine absorbs: throughput = events completed ÷ the span from the first completion to the
  last (goal ≥ 1,000/s). A faster service completes them in a shorter span and shows more, up
  to the offered rate. 6,000 events at least (--quick 2,000).

After the load, the campaigns' counters and the ledger rows are read back: every event's
change is there once, and replays added nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from pymongo import AsyncMongoClient

from ..embedded.smtp_sink import SmtpSink
from ..embedded.twilio_fake import TwilioFake
from .common import emulator_process, free_port, percentile
from .fault_world import ReactorProcess
from .figures import Figure

Client = AsyncMongoClient[dict[str, Any]]
SOURCES = [
    "reactor/bench/webhooks.py",
    "reactor/public/webhooks.py",
    "reactor/public/feedback.py",
    "reactor/adapters/mongo/feedback.py",
    "reactor/batching.py",
    # What each event's writes cost: the suppression upserts, and the stand-in that serves all
    # of them (its update paths are most of a webhook's latency here).
    "reactor/adapters/mongo/suppressions.py",
    "reactor/embedded/mongo",
]

SEND_RATE = 200  # SMS/s and emails/s, through the whole load
STEPS = (125.0, 250.0, 500.0, 1000.0, 2000.0)  # offered events/s, stepped up
SATURATING_RATE = 4000.0
P99_GOAL_MS = 50.0
THROUGHPUT_GOAL = 1000.0
REPLAY_GAP = 200  # a replay comes at least this many events after its first time
# Of every 20 events: 12 SMS receipts, 2 hard bounces, 3 soft bounces, 2 complaints, 1 replay.
PATTERN = ["sms"] * 12 + ["hard_bounce"] * 2 + ["soft_bounce"] * 3 + ["complaint"] * 2
PATTERN += ["replay"]
SMS_FINALS = ("delivered", "delivered", "delivered", "undelivered", "failed")
KINDS = ("sms", "hard_bounce", "soft_bounce", "complaint", "replay")


@dataclass
class Sent:
    """What the providers accepted before the load: the material of every event."""

    sms: list[tuple[str, str]]  # (SID, its StatusCallback URL)
    bounces: list[str]  # addresses "bounces" sent to
    complaints: list[str]  # addresses "complaints" sent to


def needed(events: int) -> dict[str, int]:
    """How many of each kind `events` events hold (the pattern repeated)."""
    counts = dict.fromkeys(KINDS, 0)
    for i in range(events):
        counts[PATTERN[i % len(PATTERN)]] += 1
    return counts


def plan(events: int, sent: Sent, twilio: TwilioFake, base: str, token: str) -> list[list[Any]]:
    """The load: [url, "form"|"json", body, headers, kind] for `events` events, every one a
    change (or a stated replay). Raises ValueError when `sent` holds too little."""
    want = needed(events)
    if (
        len(sent.sms) < want["sms"]
        or len(sent.bounces) < want["hard_bounce"] + (want["soft_bounce"] + 1) // 2
        or len(sent.complaints) < want["complaint"]
    ):
        raise ValueError(f"too few messages sent for {events} events: {want}")
    soft_addresses = sent.bounces[want["hard_bounce"] :]
    taken = dict.fromkeys(KINDS, 0)
    email_events: list[tuple[int, dict[str, str]]] = []  # (position, event) for replays
    out: list[list[Any]] = []
    for i in range(events):
        kind = PATTERN[i % len(PATTERN)]
        k = taken[kind]
        taken[kind] += 1
        if kind == "sms":
            sid, callback = sent.sms[k]
            params = {
                "MessageSid": sid,
                "MessageStatus": SMS_FINALS[k % len(SMS_FINALS)],
                "AccountSid": twilio.account_sid,
            }
            headers = {"X-Twilio-Signature": twilio.signature(callback, params)}
            out.append([callback, "form", params, headers, kind])
            continue
        if kind == "replay":
            earlier = [e for at, e in email_events if at <= i - REPLAY_GAP]
            event = earlier[k % len(earlier)] if earlier else None
            if event is None:  # too early for a replay: a soft bounce instead
                kind, k = "soft_bounce", taken["soft_bounce"]
                taken["soft_bounce"] += 1
        if kind != "replay":
            if kind == "hard_bounce":
                address = sent.bounces[k]
            elif kind == "soft_bounce":
                address = soft_addresses[(k // 2) % len(soft_addresses)]
            else:
                address = sent.complaints[k]
            event = {"id": f"{kind}-{k}", "type": kind, "email": address}
            email_events.append((i, event))
        assert event is not None
        out.append(
            [
                f"{base}/webhooks/generic",
                "json",
                {"events": [event]},
                {"Authorization": f"Bearer {token}"},
                kind,
            ]
        )
    return out


async def _campaign(client: Client, name: str, channels: list[str], ids: range) -> Any:
    now = dt.datetime.now(dt.UTC)
    res = await client.marketing.campaigns.insert_one(
        {
            "name": name,
            "status": "approved",
            "channels": channels,
            "startDate": now + dt.timedelta(seconds=0.5),
            "endDate": now + dt.timedelta(hours=1),
            "email": {"subject": "Hello {{name}}", "text": "Hello {{name}}, 20% off."},
            "sms": {"body": "Sale {{name}}"},
            "targetedCustomerIds": [str(i) for i in ids],
        }
    )
    return res.inserted_id


def _replica_env(uri: str, port: int, token: str, providers: dict[str, str]) -> dict[str, str]:
    """`reactor run`'s environment: public listener on `port`, webhooks with `token`."""
    return {
        "MONGO_URI": uri,
        "LOG_LEVEL": "WARNING",
        "PUBLIC_HOST": "127.0.0.1",
        "PUBLIC_PORT": str(port),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "LINK_SECRET": secrets.token_hex(32),
        "WEBHOOK_TOKEN": token,
        "SMS_SEND_HOURS": "00:00-24:00",
        "SMS_RATE_PER_SECOND": str(SEND_RATE),
        "EMAIL_RATE_PER_SECOND": str(SEND_RATE),
        **{k: str(v) for k, v in providers.items()},
    }


async def _generate(rate: float, requests: list[list[Any]]) -> dict[str, Any]:
    """The load generator in its own process: it must not be what limits the rate, nor take
    the reactor's CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"rate": rate, "requests": [r[:4] for r in requests]}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reactor.bench.loadgen", str(spec), str(out)
        )
        await proc.wait()
        return dict(json.loads(out.read_text()))


async def _steps(
    requests: list[list[Any]], step_events: list[int]
) -> tuple[list[dict[str, Any]], int]:
    """The offered rate stepped up, fresh events at each step, until a step's p99 is over
    its goal (the steps after it are not run: their events go to the saturating phase); and
    how many events the steps used."""
    out = []
    first = 0
    for rate, n in zip(STEPS, step_events, strict=True):
        part = requests[first : first + n]
        first += n
        out.append(_phase(rate, part, await _generate(rate, part)))
        if out[-1]["p99_ms"] > P99_GOAL_MS:
            break
    return out, first


def _phase(rate: float, requests: list[list[Any]], result: dict[str, Any]) -> dict[str, Any]:
    """Latency per event type, and throughput as completed ÷ the span of completions."""
    kinds = [requests[i][4] for i in result["indices"]]
    done = [a + v for a, v in zip(result["arrivals_s"], result["latencies_s"], strict=True)]
    span = max(done) - min(done) if done else 0.0
    by_kind: dict[str, Any] = {}
    for kind in KINDS:
        ms = [1000 * v for v, k in zip(result["latencies_s"], kinds, strict=True) if k == kind]
        if ms:
            by_kind[kind] = {
                "events": len(ms),
                "p50_ms": round(percentile(ms, 0.5), 1),
                "p99_ms": round(percentile(ms, 0.99), 1),
            }
    every = [1000 * v for v in result["latencies_s"]]
    return {
        "offered_per_s": rate,
        "events": len(every),
        "errors": result["errors"],
        "p50_ms": round(percentile(every, 0.5), 1),
        "p99_ms": round(percentile(every, 0.99), 1),
        "max_ms": round(max(every), 1) if every else float("nan"),
        "completed_per_s": round((len(done) - 1) / span, 1) if span > 0 else float("nan"),
        # When the slowest requests were offered (s after the phase's first), and how slow.
        "slowest": [
            [round(a - min(result["arrivals_s"]), 2), round(1000 * v, 1)]
            for a, v in sorted(
                zip(result["arrivals_s"], result["latencies_s"], strict=True),
                key=lambda p: -p[1],
            )[:8]
        ],
        "by_kind": by_kind,
    }


def _customers(n: int) -> list[dict[str, Any]]:
    return [
        {
            "customer_id": i,
            "email": f"c{i}@example.com",
            "phone": f"+1415{5550000 + i:07d}",
            "name": f"C{i}",
        }
        for i in range(n)
    ]


async def _wait_for(sink: SmtpSink, twilio: TwilioFake, want: dict[str, int], ranges: Any) -> Sent:
    """Until the providers accepted enough for every event; what they accepted."""
    with anyio.fail_after(300):
        while True:
            sent = _sent(sink, twilio, ranges)
            if (
                len(sent.sms) >= want["sms"]
                and len(sent.bounces) >= want["bounces"]
                and len(sent.complaints) >= want["complaints"]
            ):
                return sent
            await anyio.sleep(0.2)


def _sent(sink: SmtpSink, twilio: TwilioFake, ranges: dict[str, range]) -> Sent:
    by_campaign: dict[str, list[str]] = {"bounces": [], "complaints": []}
    for m in list(sink.messages):
        number = int(m.to.split("@", 1)[0].removeprefix("c"))
        for name in by_campaign:
            if number in ranges[name]:
                by_campaign[name].append(m.to)
    sms = [(m.sid, m.status_callback or "") for m in list(twilio.messages)]
    return Sent(sms, by_campaign["bounces"], by_campaign["complaints"])


@dataclass
class Sizes:
    """Chosen before the run: events per step, saturating events, what the providers must
    have accepted, and each campaign's audience (customer numbers)."""

    step_events: list[int]
    saturating_events: int
    want: dict[str, int]
    ranges: dict[str, range]

    @property
    def customers(self) -> int:
        return max(r.stop for r in self.ranges.values())


def _sizes(quick: bool) -> Sizes:
    step_s = 1.5 if quick else 3.0
    step_events = [int(rate * step_s) for rate in STEPS]
    saturating_events = 2000 if quick else 6000
    counts = needed(sum(step_events) + saturating_events)
    want = {
        "sms": counts["sms"],
        "bounces": counts["hard_bounce"] + (counts["soft_bounce"] + counts["replay"]) // 2 + 1,
        "complaints": max(counts["complaint"], 1100),  # the pause needs 1,000 sent
    }
    # Each campaign keeps sending through the load: its audience is what the events need and
    # a minute more at its rate.
    more = SEND_RATE * 60
    sizes = {"texts": want["sms"] + more, "bounces": want["bounces"] + more}
    sizes["complaints"] = want["complaints"] + more
    ranges: dict[str, range] = {}
    first = 0
    for name, size in sizes.items():
        ranges[name] = range(first, first + size)
        first += size
    return Sizes(step_events, saturating_events, want, ranges)


async def _seed(client: Client, customers: int) -> None:
    rows = _customers(customers)
    for start in range(0, len(rows), 10_000):
        await client.retail_db.newdatabase.insert_many(rows[start : start + 10_000])
    await client.retail_db.newdatabase.create_index("customer_id")


async def run(quick: bool = False) -> dict[str, Any]:
    size = _sizes(quick)
    step_events, want, ranges = size.step_events, size.want, size.ranges
    latency_events, saturating_events = sum(step_events), size.saturating_events
    token = secrets.token_hex(16)
    async with emulator_process() as uri, SmtpSink() as sink, TwilioFake() as twilio:
        twilio.send_callbacks = False  # every receipt is the bench's, posted below
        client: Client = AsyncMongoClient(uri, tz_aware=True)
        await _seed(client, size.customers)
        port = free_port()
        env = _replica_env(uri, port, token, {**sink.settings_env(), **twilio.settings_env()})
        # The reactor in a process of its own, as deployed: the fake providers, the bench and
        # the load generator do not share its event loop or its CPU.
        reactor = ReactorProcess("bench-webhooks", env)
        try:
            await reactor.start()
            await reactor.ready()
            ids = {
                "texts": await _campaign(client, "texts", ["sms"], ranges["texts"]),
                "bounces": await _campaign(client, "bounces", ["email"], ranges["bounces"]),
                "complaints": await _campaign(
                    client, "complaints", ["email"], ranges["complaints"]
                ),
            }
            sent = await _wait_for(sink, twilio, want, ranges)
            requests = plan(
                latency_events + saturating_events,
                sent,
                twilio,
                f"http://127.0.0.1:{port}",
                token,
            )
            load_from = dt.datetime.now(dt.UTC)
            steps, used = await _steps(requests, step_events)
            saturating = await _generate(SATURATING_RATE, requests[used:])
            load_to = dt.datetime.now(dt.UTC)
            await anyio.sleep(1.5)  # group commits and counters settle
            checks = await _check(client, ids, requests)
        finally:
            await reactor.terminate()
        await client.close()
    return _report(steps, requests, used, saturating, checks, (load_from, load_to))


def _report(
    steps: list[dict[str, Any]],
    requests: list[list[Any]],
    used: int,
    saturating: dict[str, Any],
    checks: dict[str, Any],
    load: tuple[dt.datetime, dt.datetime],
) -> dict[str, Any]:
    """The bench's result: the ladder, the saturating phase, and the checks after the load."""
    load_from, load_to = load
    paused_at = checks.pop("complaints_paused_at")
    return {
        "steps": steps,
        "highest_rate_within_p99_goal": max(
            (step["offered_per_s"] for step in steps if step["p99_ms"] <= P99_GOAL_MS), default=0
        ),
        "saturation_phase": _phase(SATURATING_RATE, requests[used:], saturating),
        "events_by_kind": {k: sum(1 for r in requests if r[4] == k) for k in KINDS},
        "changes": checks,
        "complaint_pause_during_load": bool(
            paused_at is not None and load_from <= paused_at <= load_to
        ),
        "complaint_pause_after_load_start_s": (
            round((paused_at - load_from).total_seconds(), 2) if paused_at else None
        ),
        "send_rate_per_channel_per_s": SEND_RATE,
        "targets": {"p99_ms": P99_GOAL_MS, "completed_per_s": THROUGHPUT_GOAL},
    }


async def _check(
    client: Client, ids: dict[str, Any], requests: Sequence[list[Any]]
) -> dict[str, Any]:
    """Every event's change, read back from the ledger and the campaigns' counters: expected
    (from the load) against found."""
    statuses: dict[str, int] = {}
    for r in requests:
        if r[4] == "sms":
            status = r[2]["MessageStatus"]
            statuses[status] = statuses.get(status, 0) + 1
    found_status = {
        str(row["_id"]): int(row["n"])
        async for row in await client.marketing.deliveries.aggregate(
            [
                {"$match": {"campaign": str(ids["texts"]), "deliveryStatus": {"$exists": True}}},
                {"$group": {"_id": "$deliveryStatus", "n": {"$sum": 1}}},
            ]
        )
    }
    docs = {
        name: await client.marketing.campaigns.find_one({"_id": cid}, {"targetedCustomerIds": 0})
        for name, cid in ids.items()
    }
    perf = {name: (doc or {}).get("performance") or {} for name, doc in docs.items()}
    kinds = {k: sum(1 for r in requests if r[4] == k) for k in KINDS}
    undelivered = statuses.get("undelivered", 0) + statuses.get("failed", 0)
    expected = {
        "sms rows delivered": statuses.get("delivered", 0),
        "sms rows undelivered": statuses.get("undelivered", 0),
        "sms rows failed": statuses.get("failed", 0),
        "texts.smsDelivered": statuses.get("delivered", 0),
        "texts.smsUndelivered": undelivered,
        "bounces.bounces": kinds["hard_bounce"],
        "bounces.softBounces": kinds["soft_bounce"],
        "complaints.complaints": kinds["complaint"],
    }
    found = {
        "sms rows delivered": found_status.get("delivered", 0),
        "sms rows undelivered": found_status.get("undelivered", 0),
        "sms rows failed": found_status.get("failed", 0),
        "texts.smsDelivered": int(perf["texts"].get("smsDelivered", 0)),
        "texts.smsUndelivered": int(perf["texts"].get("smsUndelivered", 0)),
        "bounces.bounces": int(perf["bounces"].get("bounces", 0)),
        "bounces.softBounces": int(perf["bounces"].get("softBounces", 0)),
        "complaints.complaints": int(perf["complaints"].get("complaints", 0)),
    }
    execution = (docs["complaints"] or {}).get("execution") or {}
    paused = (docs["complaints"] or {}).get("status") == "paused" and execution.get(
        "pausedReason"
    ) == "complaint_rate"
    return {
        "expected": expected,
        "found": found,
        "missing": sum(max(0, expected[k] - found[k]) for k in expected),
        "extra": sum(max(0, found[k] - expected[k]) for k in expected),
        "complaints_paused_at": execution.get("pausedAt") if paused else None,
        "still_sending": [
            n for n in ("texts", "bounces") if (docs[n] or {}).get("status") == "running"
        ],
    }


def figures(result: dict[str, Any]) -> list[Figure]:
    """The highest stepped rate within the p99 goal, each step's p99, p99 per event type at
    the last step within the goal (or the first step), saturated throughput, and the checks."""
    return _ladder_figures(result) + _check_figures(result)


def _ladder_figures(result: dict[str, Any]) -> list[Figure]:
    """The highest rate within the goal, each step's p99, and p99 per event type."""
    steps = result["steps"]
    out = [
        Figure(
            "highest offered rate with p99 within 50 ms",
            result["highest_rate_within_p99_goal"],
            "/s",
            THROUGHPUT_GOAL,
            ">=",
            note="offered " + ", ".join(f"{s['offered_per_s']:,.0f}" for s in steps) + "/s",
        )
    ]
    for step in steps:
        out.append(
            Figure(
                f"p99 at {step['offered_per_s']:,.0f} events/s offered, all events",
                step["p99_ms"],
                "ms",
                P99_GOAL_MS,
                "<=",
                note=f"{step['events']:,} events",
            )
        )
    within = [s for s in steps if s["p99_ms"] <= P99_GOAL_MS]
    shown = within[-1] if within else steps[0]
    for kind, row in shown["by_kind"].items():
        out.append(
            Figure(
                f"p99 at {shown['offered_per_s']:,.0f}/s, {kind.replace('_', ' ')}",
                row["p99_ms"],
                "ms",
                P99_GOAL_MS,
                "<=",
                note=f"{row['events']:,} events",
            )
        )
    return out


def _check_figures(result: dict[str, Any]) -> list[Figure]:
    """Saturated throughput, and what the load changed (nothing missing, replays nothing)."""
    steps, sat, changes = result["steps"], result["saturation_phase"], result["changes"]
    return [
        Figure(
            f"events completed per second, {sat['offered_per_s']:,.0f}/s offered (saturating)",
            sat["completed_per_s"],
            "/s",
            THROUGHPUT_GOAL,
            ">=",
            note=f"{sat['events']:,} events; p99 {sat['p99_ms']:,.0f} ms",
        ),
        Figure("event changes missing after the load", changes["missing"], "", 0, "=="),
        Figure("changes beyond the events (replays applied)", changes["extra"], "", 0, "=="),
        Figure(
            "complaint-rate auto-pause fired during the load",
            int(result["complaint_pause_during_load"]),
            "",
            1,
            "==",
        ),
        Figure(
            "failed requests",
            sum(s["errors"] for s in steps) + sat["errors"],
            "",
            0,
            "==",
        ),
    ]
