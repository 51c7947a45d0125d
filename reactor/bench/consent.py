"""Consent benchmark, in one run against one emulator process and one SMTP sink:

* unsubscribe → skipped on every replica: three reactors, one campaign sending; recipients at
  the tail of its audience press one-click unsubscribe (a real POST to the public listener) and
  the time until every replica holds the suppression is taken per unsubscribe (p50/p99/max);
  afterwards each of those recipients must be `skipped` (suppressed:unsubscribed), none sent;
* the suppression check's cost: the same campaign sent with the check and without it (against
  a list of 10,000 entries, 1 % of the audience on it), alternating rounds; recipients handled
  per second, and the ratio.

Targets: p99 ≤ 1 s (the rule allows 48 h); the check costs ≤ 10 % of emails per second.
"""

from __future__ import annotations

import datetime as dt
import secrets
import statistics
import time
from typing import Any

import aiohttp
import anyio
from pymongo import AsyncMongoClient

from ..adapters.mongo import MongoSuppressions
from ..app import Reactor
from ..config import Settings
from ..domain.consent import Kind, Reason, Suppression, suppression_id
from ..embedded.smtp_sink import SmtpSink
from .common import emulator_process, free_port, percentile

Client = AsyncMongoClient[dict[str, Any]]


def _settings(uri: str, sink: SmtpSink, instance: str, **extra: Any) -> Settings:
    env = {k.lower(): v for k, v in sink.settings_env().items()}
    return Settings(
        **{
            "mongo_uri": uri,
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            "reactor_instance_id": instance,
            "lease_seconds": 30,
            **env,
            **extra,
        }
    )


class _Unchecked(Reactor):
    """A reactor whose sends skip the suppression check: the baseline the check is costed
    against (never a configuration a user can choose)."""

    def _build(self, *args: Any, **kwargs: Any) -> Any:
        parts = super()._build(*args, **kwargs)
        parts.executor._suppressions = None
        return parts


async def _campaign(client: Client, name: str, n: int, start_in_s: float = 1.0) -> Any:
    now = dt.datetime.now(dt.UTC)
    res = await client.marketing.campaigns.insert_one(
        {
            "name": name,
            "status": "approved",
            "channels": ["email"],
            "startDate": now + dt.timedelta(seconds=start_in_s),
            "endDate": now + dt.timedelta(hours=1),
            "email": {"subject": "Hello {{name}}", "text": "Hello {{name}}, 20% off today."},
            "targetedCustomerIds": [str(i) for i in range(n)],
        }
    )
    return res.inserted_id


async def _sends_done(client: Client, campaign_id: Any) -> dict[str, Any]:
    while True:
        doc = await client.marketing.campaigns.find_one({"_id": campaign_id})
        exe = (doc or {}).get("execution") or {}
        if exe.get("sendsDone"):
            return doc or {}
        await anyio.sleep(0.05)


async def unsubscribe_latency(uri: str, sink: SmtpSink, n: int, k: int) -> dict[str, Any]:
    client: Client = AsyncMongoClient(uri, tz_aware=True)
    port = free_port()
    public = {
        "public_host": "127.0.0.1",
        "public_base_url": f"http://127.0.0.1:{port}",
        "link_secret": secrets.token_hex(32),
        "email_rate_per_second": 100,
    }
    configs = [
        _settings(uri, sink, f"r{i}", public_port=port if i == 0 else 0, **public) for i in range(3)
    ]
    links = configs[0].links()
    assert links is not None
    reactors = [Reactor(c) for c in configs]
    arrived: dict[str, list[float]] = {}

    def seen(sid: str, reason: str | None) -> None:
        if reason is not None:
            arrived.setdefault(sid, []).append(time.monotonic())

    latencies: list[float] = []
    tail = list(range(n - k, n))
    async with anyio.create_task_group() as tg:
        for reactor in reactors:
            await tg.start(reactor.run)
            assert reactor.suppressions is not None
            reactor.suppressions.on_entry = seen
        for reactor in reactors:
            await reactor.ready.wait()
        phase_started = time.monotonic()
        campaign_id = await _campaign(client, "consent latency", n)
        while not sink.messages:
            await anyio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            for customer in tail:
                token = links.unsubscribe_token(
                    str(campaign_id), str(customer), "email", dt.datetime.now(dt.UTC)
                )
                sid = suppression_id(Kind.CUSTOMER, str(customer), "email")
                t0 = time.monotonic()
                async with http.post(
                    links.unsubscribe_url(token), data={"List-Unsubscribe": "One-Click"}
                ) as resp:
                    assert resp.status == 200
                with anyio.fail_after(10):
                    while len(arrived.get(sid, [])) < len(reactors):
                        await anyio.sleep(0.002)
                latencies.append(max(arrived[sid]) - t0)
                await anyio.sleep(0.1)
        await _sends_done(client, campaign_id)
        for reactor in reactors:
            reactor.request_shutdown()
    rows = await client.marketing.deliveries.find(
        {"campaign": str(campaign_id), "customer": {"$in": [str(c) for c in tail]}}
    ).to_list()
    await client.close()
    unsubscribed = {f"c{c}@example.com" for c in tail}  # the orders' addresses (run() seeds)
    ms = sorted(1000 * v for v in latencies)
    return {
        "replicas": len(reactors),
        "audience": n,
        "unsubscribes": k,
        "p50_ms": round(percentile(ms, 0.5), 1),
        "p99_ms": round(percentile(ms, 0.99), 1),
        "max_ms": round(max(ms), 1),
        "skipped_suppressed": sum(r.get("reason") == "suppressed:unsubscribed" for r in rows),
        # Counted where it lands: messages the SMTP sink took for an unsubscribed recipient.
        "sent_anyway": sum(
            1 for m in sink.messages if m.to in unsubscribed and m.received_at >= phase_started
        ),
        "sent_anyway_in_ledger": sum(r.get("state") == "sent" for r in rows),
    }


async def check_cost(uri: str, sink: SmtpSink, n: int, rounds: int) -> dict[str, Any]:
    client: Client = AsyncMongoClient(uri, tz_aware=True)
    store = MongoSuppressions(client.marketing)
    listed = [
        Suppression(Kind.EMAIL, f"nobody{i}@elsewhere.example", "all", Reason.MANUAL, "bench")
        for i in range(10_000 - n // 100)
    ] + [
        Suppression(Kind.CUSTOMER, str(i), "email", Reason.MANUAL, "bench")
        for i in range(0, n, 100)
    ]
    for start in range(0, len(listed), 1000):
        await store.add(listed[start : start + 1000], now=dt.datetime.now(dt.UTC))
    rates: dict[str, list[float]] = {"checked": [], "unchecked": []}
    for r in range(rounds):
        for kind, cls in (("checked", Reactor), ("unchecked", _Unchecked)):
            reactor = cls(_settings(uri, sink, f"{kind}-{r}", email_rate_per_second=100_000))
            async with anyio.create_task_group() as tg:
                await tg.start(reactor.run)
                await reactor.ready.wait()
                campaign_id = await _campaign(client, f"cost {kind} {r}", n)
                doc = await _sends_done(client, campaign_id)
                reactor.request_shutdown()
            exe = doc["execution"]
            perf = doc.get("performance") or {}
            handled = int(perf.get("emailsSent", 0)) + int(perf.get("emailsSkipped", 0))
            seconds = (exe["sendsDoneAt"] - exe["startedAt"]).total_seconds()
            rates[kind].append(handled / seconds)
    await client.close()
    ratios = [c / u for c, u in zip(rates["checked"], rates["unchecked"], strict=True)]
    return {
        "audience": n,
        "suppression_entries": len(listed),
        "rounds": rounds,
        "checked_per_s": round(statistics.median(rates["checked"]), 1),
        "unchecked_per_s": round(statistics.median(rates["unchecked"]), 1),
        "checked_vs_unchecked": round(statistics.median(ratios), 3),
        "per_round": [round(x, 3) for x in ratios],
    }


async def run(quick: bool = False) -> dict[str, Any]:
    n_latency = 800 if quick else 3000
    k = 20 if quick else 100
    n_cost = 1000 if quick else 3000
    rounds = 1 if quick else 3
    async with emulator_process() as uri:
        client: Client = AsyncMongoClient(uri)
        await client.retail_db.newdatabase.insert_many(
            [
                {"customer_id": i, "email": f"c{i}@example.com", "name": f"Customer {i}"}
                for i in range(max(n_latency, n_cost))
            ]
        )
        await client.retail_db.newdatabase.create_index("customer_id")
        await client.close()
        async with SmtpSink() as sink:
            latency = await unsubscribe_latency(uri, sink, n_latency, k)
        async with SmtpSink() as sink:
            cost = await check_cost(uri, sink, n_cost, rounds)
    return {
        "unsubscribe_to_every_replica": latency,
        "suppression_check": cost,
        "targets": {"p99_ms": 1000, "checked_vs_unchecked_min": 0.9},
    }
