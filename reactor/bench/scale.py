"""Scale-out benchmark, in one run.

* One campaign sent by 1, 2 and 3 replicas (each `reactor run` in its own process), its
  audience cut into shards: emails per second as the sink sees them, with a provider 25 ms
  away (every SMTP reply delayed) and each replica's pool the limit; the ratios to one
  replica (targets 1.8x and 2.5x), and duplicates and lost customers (target 0).
* Three replicas share one 50/s email budget while six campaigns send at once, two from each:
  the rate the SMTP sink sees over the run (target ± 5 %) and in every full second (± 10 %).
* One replica alone on the same budget: it reaches the same rate.
* A segment of 25,000 to 200,000 customers frozen and resolved: time per recipient and peak
  memory (1,000,000 by hand: see `segments`).
* 1,000 campaigns due at once: until all are running (target 1 s).
"""

from __future__ import annotations

import collections
import datetime as dt
import time
import tracemalloc
from typing import Any

import anyio
from pymongo import AsyncMongoClient

from ..adapters.mongo import MongoAudiences, MongoRecipients
from ..app import Reactor
from ..config import RecipientsConfig, Settings
from ..domain.segments import Segment
from ..embedded.smtp_sink import SmtpSink
from .common import emulator_process, percentile
from .fault_world import ReactorProcess

Client = AsyncMongoClient[dict[str, Any]]
RATE = 50.0


def _per_second(arrivals: list[float]) -> dict[str, Any]:
    arrivals = sorted(arrivals)
    t0 = arrivals[0]
    buckets = collections.Counter(int(t - t0) for t in arrivals)
    full = [buckets[s] for s in range(1, int(arrivals[-1] - t0))]  # whole seconds only
    overall = (len(arrivals) - 1) / (arrivals[-1] - t0)
    return {
        "emails": len(arrivals),
        "seconds": round(arrivals[-1] - t0, 1),
        "overall_per_s": round(overall, 2),
        "overall_deviation_pct": round(100 * (overall - RATE) / RATE, 2),
        "per_second_min": min(full),
        "per_second_max": max(full),
        "worst_second_deviation_pct": round(100 * max(abs(x - RATE) for x in full) / RATE, 1),
    }


async def _phase(uri: str, replicas: int, seconds: float, tag: str) -> dict[str, Any]:
    client: Client = AsyncMongoClient(uri, tz_aware=True)
    async with SmtpSink() as sink:
        env = {k.lower(): v for k, v in sink.settings_env().items()}
        reactors = [
            Reactor(
                Settings(
                    mongo_uri=uri,
                    metrics_port=0,
                    metrics_host="127.0.0.1",
                    reactor_instance_id=f"{tag}-{i}",
                    email_rate_per_second=RATE,
                    # A collection of campaigns each, in one database: every replica sends its
                    # own campaigns at once, all leasing from the same `rate_budgets` bucket
                    # (with one collection, one replica would claim them all in this process).
                    campaigns_collection=f"campaigns_{i}",
                    **env,
                ),
                serve_http=False,
            )
            for i in range(replicas)
        ]
        per_campaign = int(RATE * seconds / 6) + 10
        async with anyio.create_task_group() as tg:
            for r in reactors:
                await tg.start(r.run)
            for r in reactors:
                await r.ready.wait()
            now = dt.datetime.now(dt.UTC)
            ids = []
            for c in range(6):
                first = c * per_campaign
                res = await client.marketing[f"campaigns_{c % replicas}"].insert_one(
                    {
                        "name": f"{tag} {c}",
                        "status": "approved",
                        "channels": ["email"],
                        "startDate": now + dt.timedelta(seconds=1),
                        "endDate": now + dt.timedelta(seconds=1 + seconds),
                        "email": {"subject": "Hi {{name}}", "text": "Sale"},
                        "targetedCustomerIds": [str(i) for i in range(first, first + per_campaign)],
                    }
                )
                ids.append(res.inserted_id)
            await anyio.sleep(seconds + 1.5)
            for r in reactors:
                r.request_shutdown()
        sent_by: dict[str, int] = {}  # each replica's campaigns are in its own collection
        for i in range(replicas):
            async for doc in client.marketing[f"campaigns_{i}"].find({"_id": {"$in": ids}}):
                sent = int((doc.get("performance") or {}).get("emailsSent", 0))
                sent_by[f"{tag}-{i}"] = sent_by.get(f"{tag}-{i}", 0) + sent
        arrivals = [m.received_at for m in sink.messages]
    await client.close()
    # The first and last second hold the ramp and the window's close.
    t0 = min(arrivals)
    steady = [t for t in arrivals if t0 + 1 <= t <= max(arrivals) - 1]
    return {"replicas": replicas, "sent_by_replica": sent_by, **_per_second(steady)}


SHARD_RTT_S = 0.025
SHARD_POOL = 8


async def _one_campaign(uri: str, replicas: int, n: int, tag: str) -> dict[str, Any]:
    """One campaign of `n` recipients, shards of 250, sent by `replicas` processes."""
    client: Client = AsyncMongoClient(uri, tz_aware=True)
    collection = f"campaigns_{tag}"
    async with SmtpSink(reply_delay_s=SHARD_RTT_S) as sink:
        env = {
            "MONGO_URI": uri,
            "LOG_LEVEL": "WARNING",
            "CAMPAIGNS_COLLECTION": collection,
            "SMTP_POOL_SIZE": str(SHARD_POOL),
            "EMAIL_RATE_PER_SECOND": "100000",  # the pools are the limit, not the budget
            "SHARD_SIZE": "250",
            "RECONCILE_INTERVAL_SECONDS": "2",
            **{k: str(v) for k, v in sink.settings_env().items()},
        }
        procs = [ReactorProcess(f"{tag}-{i}", env) for i in range(replicas)]
        try:
            for proc in procs:
                await proc.start()
            for proc in procs:
                await proc.ready()
            now = dt.datetime.now(dt.UTC)
            res = await client.marketing[collection].insert_one(
                {
                    "name": tag,
                    "status": "approved",
                    "channels": ["email"],
                    "startDate": now + dt.timedelta(seconds=1),
                    "endDate": now + dt.timedelta(minutes=30),
                    "email": {"subject": "Hi {{name}}", "text": "Sale"},
                    "targetedCustomerIds": [str(i) for i in range(n)],
                }
            )
            with anyio.fail_after(600):
                while True:
                    doc = await client.marketing[collection].find_one({"_id": res.inserted_id})
                    if ((doc or {}).get("execution") or {}).get("sendsDone"):
                        break
                    await anyio.sleep(0.2)
            owners: collections.Counter[str] = collections.Counter()
            async for d in client.marketing.campaign_shards.find(
                {"campaign": str(res.inserted_id)}
            ):
                owners[str(d.get("owner"))] += 1
        finally:
            for proc in procs:
                await proc.terminate()
        arrivals = sorted(m.received_at for m in sink.messages)
        received = collections.Counter(m.to for m in sink.messages)
    await client.close()
    return {
        "replicas": replicas,
        "recipients": n,
        "emails_per_s": round((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), 1),
        "seconds": round(arrivals[-1] - arrivals[0], 1),
        "duplicates": sum(c - 1 for c in received.values() if c > 1),
        "lost": n - len(received),
        "shards_by_replica": dict(sorted(owners.items())),
    }


async def shards(quick: bool = False) -> dict[str, Any]:
    n = 1000 if quick else 3000
    async with emulator_process() as uri:
        client: Client = AsyncMongoClient(uri)
        await client.retail_db.newdatabase.insert_many(
            [{"customer_id": i, "email": f"c{i}@example.com", "name": f"C{i}"} for i in range(n)]
        )
        await client.retail_db.newdatabase.create_index("customer_id")
        await client.close()
        phases = [await _one_campaign(uri, r, n, f"shards{r}") for r in (1, 2, 3)]
    one = phases[0]["emails_per_s"]
    return {
        "provider_rtt_ms": SHARD_RTT_S * 1000,
        "smtp_pool_per_replica": SHARD_POOL,
        "phases": phases,
        "two_vs_one": round(phases[1]["emails_per_s"] / one, 2),
        "three_vs_one": round(phases[2]["emails_per_s"] / one, 2),
        "targets": {"two_vs_one": 1.8, "three_vs_one": 2.5, "duplicates": 0, "lost": 0},
    }


async def run(quick: bool = False) -> dict[str, Any]:
    starts = await burst(quick)
    audience = await segments(quick)
    sharded = await shards(quick)
    seconds = 10.0 if quick else 30.0
    async with emulator_process() as uri:
        client: Client = AsyncMongoClient(uri)
        await client.retail_db.newdatabase.insert_many(
            [
                {"customer_id": i, "email": f"c{i}@example.com", "name": f"C{i}"}
                for i in range(int(RATE * seconds) + 200)
            ]
        )
        await client.retail_db.newdatabase.create_index("customer_id")
        await client.close()
        shared = await _phase(uri, 3, seconds, "three")
        alone = await _phase(uri, 1, seconds, "alone")
    return {
        "one_campaign_many_replicas": sharded,
        "segment_audiences": audience,
        "burst_of_starts": starts,
        "budget_50_per_s_three_replicas": shared,
        "budget_50_per_s_one_replica": alone,
        "targets": {"overall_deviation_pct": 5, "worst_second_deviation_pct": 10},
    }


async def _segment(uri: str, n: int) -> dict[str, Any]:
    """A segment of `n` customers (one order row each, half of them matching), frozen in chunks
    and every chunk's recipients resolved, as the shards of a replica would: the time per
    recipient, and the peak memory this process allocated meanwhile (tracemalloc)."""
    client: Client = AsyncMongoClient(uri, tz_aware=True)
    db = client[f"seg{n}"]
    rows = [
        {"customer_id": i, "email": f"c{i}@x.example", "name": f"C{i}", "tier": i % 2}
        for i in range(2 * n)
    ]
    for start in range(0, len(rows), 10_000):
        await db.orders.insert_many(rows[start : start + 10_000])
    del rows
    await db.orders.create_index("customer_id")
    audiences = MongoAudiences(client[f"state{n}"], db, "orders", "customer_id", batch_size=1000)
    recipients = MongoRecipients(db.orders, RecipientsConfig(db=f"seg{n}", collection="orders"))
    tracemalloc.start()
    t0 = time.perf_counter()
    chunks = await audiences.materialize("c", Segment(query={"tier": 0}), 500)
    frozen_s = time.perf_counter() - t0
    found = 0
    for index in range(chunks):
        ids = await audiences.chunk("c", index)
        for start in range(0, len(ids), 250):
            found += len(await recipients.resolve(ids[start : start + 250]))
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    await client.drop_database(f"seg{n}")
    await client.close()
    return {
        "recipients": n,
        "resolved": found,
        "chunks": chunks,
        "freeze_s": round(frozen_s, 2),
        "seconds": round(elapsed, 2),
        "us_per_recipient": round(1e6 * elapsed / n, 1),
        "peak_memory_mib": round(peak / 2**20, 2),
    }


async def segments(quick: bool = False, sizes: list[int] | None = None) -> dict[str, Any]:
    """The segment curve; `sizes` for other points (the README's 1,000,000 row:
    `asyncio.run(scale.segments(sizes=[100_000, 1_000_000]))`, about 5 minutes)."""
    if sizes is None:
        sizes = [5_000, 20_000] if quick else [25_000, 50_000, 100_000, 200_000]
    async with emulator_process() as uri:
        curve = [await _segment(uri, n) for n in sizes]
    base = curve[-2] if len(curve) > 2 else curve[0]
    last = curve[-1]
    return {
        "curve": curve,
        "largest_vs_previous_time_per_recipient": round(
            last["us_per_recipient"] / base["us_per_recipient"], 3
        ),
        "targets": {"peak_memory_mib": 100, "time_per_recipient_ratio": 1.1},
    }


async def burst(quick: bool = False) -> dict[str, Any]:
    """`n` campaigns due at the same instant, approved together well ahead (so every one is
    armed first), one replica: how long until all are `running`, and the start lateness."""
    n = 200 if quick else 1000
    async with emulator_process() as uri:
        client: Client = AsyncMongoClient(uri, tz_aware=True)
        reactor = Reactor(
            Settings(
                mongo_uri=uri,
                metrics_port=0,
                metrics_host="127.0.0.1",
                reactor_instance_id="burst",
                lease_seconds=60,
                reconcile_interval_seconds=3600,
            ),
            serve_http=False,
        )
        lateness: dict[str, float] = {}
        async with anyio.create_task_group() as tg:
            await tg.start(reactor.run)
            await reactor.ready.wait()
            assert reactor.scheduler is not None
            reactor.scheduler.on_started.append(
                lambda key, late: lateness.__setitem__(key.campaign, late)
            )
            due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=8 if not quick else 4)
            res = await client.marketing.campaigns.insert_many(
                [
                    {
                        "name": f"burst {i}",
                        "status": "approved",
                        "channels": ["email"],
                        "startDate": due,
                        "endDate": due + dt.timedelta(hours=1),
                        "email": {"subject": "s", "text": "t"},
                        "targetedCustomerIds": [],
                    }
                    for i in range(n)
                ]
            )
            keys = [str(i) for i in res.inserted_ids]
            with anyio.fail_after(120):
                while not all(k in lateness for k in keys):
                    await anyio.sleep(0.1)
            reactor.request_shutdown()
        await client.close()
    late_ms = [1000 * lateness[k] for k in keys]
    return {
        "campaigns_due_at_once": n,
        "all_running_after_s": round(max(late_ms) / 1000, 3),
        "start_lateness_p50_ms": round(percentile(late_ms, 0.5), 1),
        "start_lateness_p99_ms": round(percentile(late_ms, 0.99), 1),
        "targets": {"all_running_after_s": 1.0, "start_lateness_p99_ms": 1000},
    }
