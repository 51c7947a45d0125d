"""Scale-out benchmark, in one run: a cluster-wide rate budget.

* Three replicas share one 50/s email budget while six campaigns send at once, two from each:
  the rate the SMTP sink sees over the run (target ± 5 %) and in every full second (± 10 %).
* One replica alone on the same budget: it reaches the same rate.

The other goals of scale-out (shards of one campaign, audiences outside the document, bulk
claims) are not built yet; this prints only what is.
"""

from __future__ import annotations

import collections
import datetime as dt
from typing import Any

import anyio
from pymongo import AsyncMongoClient

from ..app import Reactor
from ..config import Settings
from ..embedded.smtp_sink import SmtpSink
from .common import emulator_process

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


async def run(quick: bool = False) -> dict[str, Any]:
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
        "budget_50_per_s_three_replicas": shared,
        "budget_50_per_s_one_replica": alone,
        "targets": {"overall_deviation_pct": 5, "worst_second_deviation_pct": 10},
    }
