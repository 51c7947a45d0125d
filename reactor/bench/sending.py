"""Sending benchmark, in one run against the same local SMTP sink:

* emails per second through the reactor, ledger on (MongoDB emulator in its own process);
* the ceiling: a bare pooled aiosmtplib sender (same pool, same concurrency, same messages);
* the old approach: one SMTP connection per message, sequential;
* a 100,000-id audience resolved in batches, with the peak memory it took;
* a configured rate held over 30 s (per-second deviation).

Targets: reactor >= 0.7 x ceiling and >= 20 x the old approach; rate within +-5 %.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import time
import tracemalloc
from typing import Any

import aiosmtplib
import anyio
from pymongo import AsyncMongoClient

from ..adapters.mongo import MongoRecipients
from ..adapters.smtp import SmtpEmailSender, build_mime
from ..app import Reactor
from ..config import RecipientsConfig, Settings
from ..embedded.smtp_sink import SmtpSink
from ..ports import EmailMessage
from .common import Steal, emulator_process, percentile

# Simulated SMTP round trips: loopback, a nearby relay, a provider in the same region.
RTTS_MS = (0, 5, 25)


def _message(i: int) -> EmailMessage:
    return EmailMessage(
        to=f"c{i}@example.com",
        subject=f"Hello Customer {i}",
        text=f"Hello Customer {i}, 20% off today.",
        html=f"<p>Hello <b>Customer {i}</b>, 20% off today.</p>",
        message_id=f"<bench.{i}@reactor.example.com>",
    )


def _settings(sink: SmtpSink, **kwargs: Any) -> Settings:
    """Pool size and concurrency are the shipped defaults (or SMTP_POOL_SIZE and
    SEND_CONCURRENCY from the environment), the same for the reactor and the ceiling."""
    sink_env = {k.lower(): v for k, v in sink.settings_env().items()}
    return Settings(**{"mongo_uri": "mongodb://unused", **sink_env, **kwargs})


async def ceiling(sink: SmtpSink, n: int) -> tuple[float, float]:
    """Emails per second, and CPU milliseconds per email (this process: sender and sink)."""
    settings = _settings(sink)
    config = settings.smtp_config()
    assert config is not None
    sender = SmtpEmailSender(config)
    queue = list(range(n))
    t0 = time.perf_counter()
    cpu0 = time.process_time()

    async def worker() -> None:
        while queue:
            await sender.send(_message(queue.pop()))

    async with anyio.create_task_group() as tg:
        for _ in range(settings.send_concurrency):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await sender.aclose()
    return n / elapsed, 1000 * cpu / n


async def old_approach(sink: SmtpSink, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        client = aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False)
        await client.connect()
        await client.send_message(build_mime(_message(i), "campaigns@reactor.example"))
        await client.quit()
    return n / (time.perf_counter() - t0)


async def through_reactor(
    uri: str, sink: SmtpSink, n: int, *, rate: float, instance: str
) -> tuple[float, list[float], float]:
    """Emails per second between the execution's start and its last send (the reactor's own
    timestamps), the sink's arrival times, and CPU milliseconds per email over about that
    window (this process: reactor, driver and sink; sampled by a 50 ms poll)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    settings = _settings(
        sink,
        mongo_uri=uri,
        metrics_port=0,
        metrics_host="127.0.0.1",
        reactor_instance_id=instance,
        email_rate_per_second=rate,
        lease_seconds=60,
    )
    reactor = Reactor(settings, serve_http=False)
    first = len(sink.messages)
    async with anyio.create_task_group() as tg:
        await tg.start(reactor.run)
        await reactor.ready.wait()
        now = dt.datetime.now(dt.UTC)
        res = await client.marketing.campaigns.insert_one(
            {
                "name": f"bench {instance}",
                "status": "approved",
                "channels": ["email"],
                "startDate": now + dt.timedelta(seconds=1),
                "endDate": now + dt.timedelta(hours=1),
                "email": {
                    "subject": "Hello {{name}}",
                    "text": "Hello {{name}}, 20% off today.",
                    "html": "<p>Hello <b>{{name}}</b>, 20% off today.</p>",
                },
                "targetedCustomerIds": [str(i) for i in range(n)],
            }
        )
        started = finished = None
        cpu_start = cpu_end = 0.0
        while True:  # rates come from the reactor's own timestamps; this samples CPU time
            doc = await client.marketing.campaigns.find_one(
                {"_id": res.inserted_id},
                {"execution.startedAt": 1, "execution.sendsDone": 1, "execution.sendsDoneAt": 1},
            )
            assert doc is not None
            exe = doc.get("execution") or {}
            if started is None and exe.get("startedAt"):
                started = exe["startedAt"]
                cpu_start = time.process_time()
            if exe.get("sendsDone"):
                finished = exe["sendsDoneAt"]
                cpu_end = time.process_time()
                break
            await anyio.sleep(0.05)
        reactor.request_shutdown()
    await client.close()
    assert started is not None
    assert finished is not None
    sent = len(sink.messages) - first
    arrivals = [m.received_at for m in sink.messages[first:]]
    cpu_ms = 1000 * (cpu_end - cpu_start) / max(1, sent)
    return sent / (finished - started).total_seconds(), arrivals, cpu_ms


async def audience(uri: str, n: int) -> dict[str, Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    rows = []
    for i in range(n):
        cid: Any = i if i % 2 else str(i)
        rows.append(
            {
                "customer_id": cid,
                "email": f"a{i}@x.example",
                "phone": "+14155550100",
                "name": f"N{i}",
            }
        )
        if i % 3 == 0:
            rows.append({"customer_id": cid, "email": "", "name": f"N{i}"})
    for start in range(0, len(rows), 5000):
        await client.aud.orders.insert_many(rows[start : start + 5000])
    await client.aud.orders.create_index("customer_id")
    recipients = MongoRecipients(client.aud.orders, RecipientsConfig(db="aud", collection="orders"))
    ids = [str(i) for i in range(n)]
    tracemalloc.start()
    t0 = time.perf_counter()
    found = 0
    for start in range(0, n, 1000):
        found += len(await recipients.resolve(ids[start : start + 1000]))
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    await client.close()
    return {
        "ids": n,
        "batch": 1000,
        "resolved": found,
        "seconds": round(elapsed, 2),
        "ids_per_s": round(n / elapsed),
        "peak_memory_mib": round(peak / 2**20, 2),
    }


def rate_deviation(arrivals: list[float], rate: float) -> dict[str, Any]:
    if len(arrivals) < 2:
        return {}
    t0 = arrivals[0]
    seconds = int(arrivals[-1] - t0)
    windows = [0] * max(1, seconds)
    for t in arrivals:
        k = int(t - t0)
        if k < len(windows):
            windows[k] += 1
    full = windows[1:-1] or windows  # the first and last seconds are partial
    overall = (len(arrivals) - 1) / (arrivals[-1] - t0)
    return {
        "configured_per_s": rate,
        "achieved_per_s": round(overall, 2),
        "overall_deviation_pct": round(100 * (overall - rate) / rate, 2),
        "per_second_min": min(full),
        "per_second_max": max(full),
        "per_second_p5": percentile([float(w) for w in full], 0.05),
        "per_second_p95": percentile([float(w) for w in full], 0.95),
        "seconds": len(full),
    }


def _append_known(values: list[float], value: float | None) -> None:
    """Keep a reading only where there is one (no /proc/stat: no steal figure, not zero)."""
    if value is not None:
        values.append(value)


async def run(quick: bool = False) -> dict[str, Any]:
    n = 600 if quick else 3000
    n_old = 60 if quick else 200
    n_audience = 20_000 if quick else 100_000
    rate_s = 6 if quick else 30
    rounds = 1 if quick else 5
    rate = 50.0
    defaults = Settings(mongo_uri="mongodb://unused")
    result: dict[str, Any] = {
        "pool_size": defaults.smtp_pool_size,
        "concurrency": defaults.send_concurrency,
        "rounds": rounds,
    }
    async with emulator_process() as uri:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
        await client.retail_db.newdatabase.insert_many(
            [
                {"customer_id": i, "email": f"c{i}@example.com", "name": f"Customer {i}"}
                for i in range(max(n, int(rate * rate_s)))
            ]
        )
        # As in production (the README asks for it): the orders collection is indexed on the
        # customer id the reactor matches on.
        await client.retail_db.newdatabase.create_index("customer_id")
        await client.close()
        for rtt_ms in RTTS_MS:
            # 0: the sink answers at once (CPU-bound, loopback); otherwise each SMTP reply comes
            # after a simulated round trip, as from a provider on a real network. The ceiling
            # and the reactor alternate for a few rounds (this machine's speed drifts by 2x
            # within a minute); the ratio reported is the median of the per-round ratios.
            ceilings: list[float] = []
            reactors: list[float] = []
            ceiling_cpu: list[float] = []
            reactor_cpu: list[float] = []
            ceiling_steal: list[float] = []
            reactor_steal: list[float] = []
            size = n if rtt_ms < 20 else n * 2 // 3
            async with SmtpSink(reply_delay_s=rtt_ms / 1000) as sink:
                old = await old_approach(sink, n_old if rtt_ms < 20 else n_old // 2)
                for r in range(rounds):
                    steal = Steal()
                    ceil, ceil_cpu = await ceiling(sink, size)
                    _append_known(ceiling_steal, steal.pct())
                    steal = Steal()
                    fast, _, fast_cpu = await through_reactor(
                        uri, sink, size, rate=100_000, instance=f"fast-{rtt_ms}-{r}"
                    )
                    _append_known(reactor_steal, steal.pct())
                    ceilings.append(ceil)
                    ceiling_cpu.append(ceil_cpu)
                    reactors.append(fast)
                    reactor_cpu.append(fast_cpu)
            ratios = [f / c for f, c in zip(reactors, ceilings, strict=True)]
            reactor_median = statistics.median(reactors)
            result[f"rtt_{rtt_ms}ms"] = {
                "emails": size,
                "ceiling_emails_per_s": round(statistics.median(ceilings), 1),
                "old_approach_emails_per_s": round(old, 1),
                "reactor_emails_per_s": round(reactor_median, 1),
                "reactor_vs_ceiling": round(statistics.median(ratios), 3),
                "reactor_vs_ceiling_per_round": [round(x, 3) for x in ratios],
                "reactor_vs_old": round(reactor_median / old, 1),
                # What a bare pooled sender gains over the old approach here: the most any
                # sender with this pool could show against it on this machine.
                "ceiling_vs_old": round(statistics.median(ceilings) / old, 1),
                # CPU per email in this process (sender + sink for the ceiling; reactor, driver
                # and sink for the reactor). Steadier than rates on a shared VM; on loopback,
                # where both are CPU-bound, its ratio is what the rate ratio would be without
                # the drift.
                "ceiling_cpu_ms_per_email": round(statistics.median(ceiling_cpu), 3),
                "reactor_cpu_ms_per_email": round(statistics.median(reactor_cpu), 3),
                "ceiling_vs_reactor_cpu_per_email": round(
                    statistics.median(c / r for c, r in zip(ceiling_cpu, reactor_cpu, strict=True)),
                    3,
                ),
                # CPU taken by the host while the VM wanted it, per round (% of all CPU time):
                # the reactor's phases also keep the database's vCPU busy.
                "ceiling_steal_pct_per_round": ceiling_steal,
                "reactor_steal_pct_per_round": reactor_steal,
            }
        async with SmtpSink() as sink:
            _, arrivals, _ = await through_reactor(
                uri, sink, int(rate * rate_s), rate=rate, instance="paced"
            )
            result["rate_limit"] = rate_deviation(arrivals, rate)
        result["audience"] = await audience(uri, n_audience)
    result["targets"] = {"vs_ceiling": 0.7, "vs_old": 20, "rate_deviation_pct": 5}
    return result


__all__ = ["asyncio", "run"]
