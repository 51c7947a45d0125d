"""Send-in-local-time benchmark, the real reactor against the MongoDB emulator (its own process)
and the SMTP sink, in real time.

Real zones put their instants hours apart, so the bench compiles 30 synthetic zones (zic) whose
offsets are SPACING_S apart: `at` = the next UTC minute then falls SPACING_S after the previous
zone's in every zone, and the whole campaign plays out in minutes. The reactor reads them as
any IANA zone (the process's TZPATH); nothing in the reactor knows.

Measured, counted where the messages land (the sink):

* per-instant lateness: the first message of each instant's batch at the sink minus the instant
  (the database commits that send's `pending` mark before; the sink is later, so stricter);
* every batch finished within its spread (last arrival - instant <= spreadMinutes) at the budget;
* duplicates (a recipient received twice) and whoever never arrived;
* memory per armed instant: the timers the run arms from the plan it wrote to the database
  (per-instant shards of ids), measured with tracemalloc, over the instants armed.

Targets (issue 27): lateness p99 ≤ 50 ms, every batch within its spread, 0 duplicates,
≤ 2 KiB per armed instant. Sizes are fixed here, before any run.
"""

from __future__ import annotations

import collections
import datetime as dt
import gc
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zoneinfo
from pathlib import Path
from typing import Any

import anyio
from pymongo import AsyncMongoClient

from ..app import Reactor
from ..config import Settings
from ..embedded.smtp_sink import SmtpSink
from ..execution.localtime import timers_from_plan
from ..execution.run import LOCAL_BATCH_HOOKS
from .common import emulator_process, percentile
from .figures import Figure

SOURCES = [
    "reactor/bench/localtime.py",
    "reactor/domain/zones.py",
    "reactor/execution/localtime.py",
    "reactor/execution/run.py",
    "reactor/execution/shards.py",
    "reactor/adapters/mongo/shards.py",
]
ZONES = 30
SPREAD_MINUTES = 1


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"recipients": 3_000, "spacing_s": 4, "rate": 1000.0, "lead_s": 20}
    return {"recipients": 100_000, "spacing_s": 10, "rate": 1500.0, "lead_s": 120}


def compile_zones(spacing_s: int, into: Path) -> list[str]:
    """Zone k is UTC-(k x spacing_s): its wall clock shows `at` spacing_s later each."""
    source = into / "bench.zi"
    names = [f"Bench/Z{k:02d}" for k in range(ZONES)]
    lines = []
    for k, name in enumerate(names):
        minutes, seconds = divmod(k * spacing_s, 60)
        lines.append(f"Zone {name} -0:{minutes:02d}:{seconds:02d} - BZ{k:02d}\n")
    source.write_text("".join(lines))
    subprocess.run(["zic", "-d", str(into), str(source)], check=True, capture_output=True)
    zoneinfo.reset_tzpath(to=[str(into), *zoneinfo.TZPATH])
    return names


async def seed(uri: str, n: int, zones: list[str]) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    rows = [
        {
            "customer_id": i,
            "email": f"c{i}@x.example",
            "name": f"N{i}",
            "timezone": zones[i % ZONES],
        }
        for i in range(n)
    ]
    for start in range(0, n, 5000):
        await client.lt.orders.insert_many(rows[start : start + 5000])
    await client.lt.orders.create_index("customer_id")
    await client.close()


async def armed_memory(client: AsyncMongoClient[dict[str, Any]]) -> dict[str, Any]:
    """Bytes per armed instant: the campaign's persisted plan read back, and the timers the
    run arms from it (`timers_from_plan`, what it holds while it waits) built under
    tracemalloc, over the instants armed. The ids stay in the shards, in the database."""
    plan = await client.marketing.campaign_shard_plans.find_one({"source": "local"})
    instants = list((plan or {}).get("instants") or [])
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        timers = timers_from_plan("bench", instants)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # The instants' datetimes were allocated by the read (the timers keep them): counted too.
    grown += sum(sys.getsizeof(timer.due_at) for timer in timers)
    return {
        "instants_armed": len(timers),
        "armed_bytes_per_instant": round(grown / len(timers)) if timers else None,
        "local_shards": sum(int(row["shards"]) for row in instants),
    }


async def run(quick: bool) -> dict[str, Any]:
    sizes = _sizes(quick)
    n, spacing = sizes["recipients"], sizes["spacing_s"]
    with tempfile.TemporaryDirectory() as tzdir:
        zones = compile_zones(spacing, Path(tzdir))
        async with emulator_process() as uri, SmtpSink() as sink:
            await seed(uri, n, zones)
            return await _measure(uri, sink, zones, sizes)


def _settings(uri: str, sink: SmtpSink, rate: float) -> Settings:
    sink_env = {k.lower(): v for k, v in sink.settings_env().items()}
    return Settings(
        **{
            "mongo_uri": uri,
            **sink_env,
            "segmentation_db": "lt",
            "orders_collection": "orders",
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            "email_rate_per_second": rate,
            "lease_seconds": 30,
            "reactor_instance_id": "bench-localtime",
        }
    )


def _campaign(
    n: int, start_at: dt.datetime, first_due: dt.datetime, spacing: int
) -> dict[str, Any]:
    return {
        "name": "bench localtime",
        "status": "approved",
        "channels": ["email"],
        "startDate": start_at,
        "endDate": first_due + dt.timedelta(seconds=ZONES * spacing + 600),
        "email": {"subject": "Hello {{name}}", "text": "Hello {{name}}, 20% off."},
        "targetedCustomerIds": [str(i) for i in range(n)],
        "localTime": {
            "at": f"{first_due:%H:%M}",
            "spreadMinutes": SPREAD_MINUTES,
            "fallbackZone": "UTC",
        },
    }


async def _measure(
    uri: str, sink: SmtpSink, zones: list[str], sizes: dict[str, Any]
) -> dict[str, Any]:
    n, spacing = sizes["recipients"], sizes["spacing_s"]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    now = dt.datetime.now(dt.UTC)
    start_at = now + dt.timedelta(seconds=5)
    first_due = (now + dt.timedelta(seconds=sizes["lead_s"] + 60)).replace(second=0, microsecond=0)
    dues = {z: first_due + dt.timedelta(seconds=k * spacing) for k, z in enumerate(zones)}
    batches: list[tuple[dt.datetime, float, int]] = []
    LOCAL_BATCH_HOOKS.append(lambda key, due, late, size: batches.append((due, late, size)))
    wall_minus_mono = time.time() - time.monotonic()
    reactor = Reactor(_settings(uri, sink, sizes["rate"]), serve_http=False)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(reactor.run)
            await reactor.ready.wait()
            await client.marketing.campaigns.insert_one(_campaign(n, start_at, first_due, spacing))
            deadline = max(dues.values()) + dt.timedelta(seconds=SPREAD_MINUTES * 60 + 30)
            while len(sink.messages) < n and dt.datetime.now(dt.UTC) < deadline:
                await anyio.sleep(0.5)
            reactor.request_shutdown()
        marks = await _mark_lateness_ms(client, dues)
        armed = await armed_memory(client)
    finally:
        LOCAL_BATCH_HOOKS.clear()
        await client.close()
    summary = _summarise(sink, dues, batches, wall_minus_mono, n)
    return (
        summary | marks | armed | {"sizes": sizes, "zones": ZONES, "spread_minutes": SPREAD_MINUTES}
    )


async def _mark_lateness_ms(
    client: AsyncMongoClient[dict[str, Any]], dues: dict[str, dt.datetime]
) -> dict[str, Any]:
    """Per instant, its first ledger row's `createdAt` (the `pending` mark, stamped with the
    database's time as the reactor knows it when it writes) minus the instant."""
    first: dict[dt.datetime, dt.datetime] = {}
    rows = client.marketing.deliveries.find({"state": "sent"}, {"customer": 1, "createdAt": 1})
    async for row in rows:
        due = dues[f"Bench/Z{int(row['customer']) % ZONES:02d}"]
        at = row["createdAt"]
        if due not in first or at < first[due]:
            first[due] = at
    late = [1000 * (at - due).total_seconds() for due, at in first.items()]
    return {
        "mark_lateness_ms_p50": round(percentile(late, 0.5), 1) if late else None,
        "mark_lateness_ms_p99": round(percentile(late, 0.99), 1) if late else None,
        "mark_earliest_ms": round(min(late), 1) if late else None,
    }


def _summarise(
    sink: SmtpSink,
    dues: dict[str, dt.datetime],
    batches: list[tuple[dt.datetime, float, int]],
    wall_minus_mono: float,
    n: int,
) -> dict[str, Any]:
    by_instant: dict[dt.datetime, list[float]] = collections.defaultdict(list)
    for m in sink.messages:
        i = int(m.to.removeprefix("c").split("@")[0])
        due = dues[f"Bench/Z{i % ZONES:02d}"]
        by_instant[due].append(m.received_at + wall_minus_mono - due.timestamp())
    lateness_ms = [1000 * min(v) for v in by_instant.values()]
    spans_s = [max(v) for v in by_instant.values()]
    counts = collections.Counter(sink.recipients())
    return {
        "instants": len(dues),
        "instants_sent": len(by_instant),
        "batches_started": len(batches),
        # When each batch's timer woke (the run's own clock), before reading and marking:
        "wake_lateness_ms_p99": round(1000 * percentile([b[1] for b in batches], 0.99), 1)
        if batches
        else None,
        "lateness_ms_p50": round(percentile(lateness_ms, 0.5), 1) if lateness_ms else None,
        "lateness_ms_p99": round(percentile(lateness_ms, 0.99), 1) if lateness_ms else None,
        "lateness_ms_max": round(max(lateness_ms), 1) if lateness_ms else None,
        "earliest_ms": round(1000 * min(min(v) for v in by_instant.values()), 1)
        if by_instant
        else None,
        "batch_span_s_max": round(max(spans_s), 2) if spans_s else None,
        "batches_within_spread": sum(1 for s in spans_s if s <= SPREAD_MINUTES * 60),
        "received": len(sink.messages),
        "expected": n,
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "missing": n - len(counts),
    }


def figures(result: dict[str, Any]) -> list[Figure]:
    return [
        Figure(
            "localtime first pending mark after its instant, p99",
            result["mark_lateness_ms_p99"] if result["mark_lateness_ms_p99"] is not None else -1,
            "ms",
            50,
            "<=",
        ),
        Figure(
            "localtime first arrival at the sink after its instant, p99",
            result["lateness_ms_p99"] if result["lateness_ms_p99"] is not None else -1,
            "ms",
        ),
        Figure(
            "localtime earliest arrival after its instant",
            result["earliest_ms"] if result["earliest_ms"] is not None else -1,
            "ms",
            0,
            ">=",
        ),
        Figure(
            "localtime batches within their spread",
            result["batches_within_spread"],
            "batches",
            float(result["instants"]),
            "==",
        ),
        Figure("localtime duplicates", result["duplicates"], "messages", 0, "=="),
        Figure("localtime recipients never reached", result["missing"], "recipients", 0, "=="),
        Figure(
            "localtime memory per armed instant (the run's timers)",
            result["armed_bytes_per_instant"]
            if result["armed_bytes_per_instant"] is not None
            else 1e9,
            "bytes",
            2048,
            "<=",
        ),
        Figure("localtime instants armed", result["instants_armed"], "instants", ZONES, "=="),
    ]
