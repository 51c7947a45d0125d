"""Engagement load: the tracking hits one replica absorbs while a campaign sends.

Setup: a finished campaign whose deliveries the ledger holds (sent an hour ago) and whose link
table is recorded; then, while a second campaign sends 100 emails/s through the same reactor
(tracked, so its messages are rewritten too), the open-loop generator (`reactor.bench.loadgen`,
in a process of its own) fetches tracked links and pixels of the first campaign's recipients at
a fixed arrival rate for a fixed time. Every redirect's latency is measured from its scheduled
arrival. Then the events in `engagement` (implied opens aside) must equal the hits sent.
Twice: 2,000 recipients hit 10 times each, then as many recipients as hits (every hit a first).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from bson import ObjectId
from pymongo import AsyncMongoClient
from scipy import stats  # type: ignore[import-untyped]

from ..app import Reactor
from ..config import Settings
from ..domain.deliveries import delivery_id
from ..domain.engagement import HitKind
from ..domain.models import Channel
from ..embedded.smtp_sink import SmtpSink
from ..gctune import tune_for_service
from .common import emulator_process, free_port, percentile
from .fault_world import ReactorProcess

Client = AsyncMongoClient[dict[str, Any]]
SECRET = "bench-engagement-secret-0123456789abcdef"
LINKS = ["https://shop.example/spring", "https://shop.example/summer", "https://shop.example/faq"]
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36"


async def _seed(client: Client, n_old: int, n_new: int) -> ObjectId:
    await client.retail_db.newdatabase.insert_many(
        [
            {"customer_id": i, "email": f"c{i}@example.com", "name": f"C{i}"}
            for i in range(n_old + n_new)
        ]
    )
    await client.retail_db.newdatabase.create_index("customer_id")
    now = dt.datetime.now(dt.UTC)
    old = ObjectId()
    await client.marketing.campaigns.insert_one(
        {
            "_id": old,
            "name": "last week",
            "status": "completed",
            "startDate": now - dt.timedelta(hours=2),
            "endDate": now - dt.timedelta(hours=1),
            "email": {"subject": "x", "html": ""},
            "targetedCustomerIds": [],
            "trackedLinks": LINKS,
            "performance": {},
        }
    )
    hour_ago = now - dt.timedelta(hours=1)
    await client.marketing.deliveries.insert_many(
        [
            {
                "_id": delivery_id(str(old), "email", str(i)),
                "campaign": str(old),
                "channel": "email",
                "customer": str(i),
                "state": "sent",
                "epoch": 1,
                "updatedAt": hour_ago,
            }
            for i in range(n_old)
        ]
    )
    html = "".join(f'<a href="{u}">{u}</a>' for u in LINKS)
    await client.marketing.campaigns.insert_one(
        {
            "name": "now",
            "status": "approved",
            "channels": ["email"],
            "startDate": now + dt.timedelta(seconds=0.5),
            "endDate": now + dt.timedelta(hours=1),
            "email": {"subject": "Hi {{name}}", "html": f"<html><body>{html}</body></html>"},
            "targetedCustomerIds": [str(i) for i in range(n_old, n_old + n_new)],
        }
    )
    return old


def _requests(settings: Settings, campaign: str, n_old: int, total: int) -> list[list[Any]]:
    signer = settings.tracking_config().signer
    assert signer is not None
    base = settings.public_base_url
    issued = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    out: list[list[Any]] = []
    for i in range(total):
        customer = str(i % n_old)
        kind = HitKind.OPEN if i % 5 == 0 else HitKind.CLICK
        token = signer.sign(
            campaign=campaign,
            channel=Channel.EMAIL,
            customer=customer,
            kind=kind,
            link=0 if kind is HitKind.OPEN else i % len(LINKS),
            issued_at=issued,
        )
        path = "o" if kind is HitKind.OPEN else "c"
        out.append([f"{base}/{path}/{token}", "get", None, {"User-Agent": CHROME}])
    return out


async def _stored(client: Client) -> int:
    return await client.marketing.engagement.count_documents(
        {"reasons": {"$ne": "implied_by_human_click"}}
    )


def _settings(uri: str, sink: SmtpSink, db: str, tracking: str, rate: float) -> Settings:
    port = free_port()
    env = {k.lower(): v for k, v in sink.settings_env().items()}
    return Settings(
        **{
            "mongo_uri": uri,
            "campaigns_db": db,
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            "public_host": "127.0.0.1",
            "public_port": port,
            "public_base_url": f"http://127.0.0.1:{port}",
            "link_secret": SECRET,
            "tracking": tracking,
            "email_rate_per_second": rate,
            "reactor_instance_id": f"bench-engagement-{db}",
            **env,
        }
    )


async def _generate(rate: float, requests: list[list[Any]]) -> dict[str, Any]:
    """The open-loop generator, in a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"rate": rate, "requests": requests}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reactor.bench.loadgen", str(spec), str(out)
        )
        await proc.wait()
        result: dict[str, Any] = json.loads(out.read_text())
    return result


async def run(quick: bool = False, *, first_hits: bool = False) -> dict[str, Any]:
    """`first_hits`: every hit is for a recipient not seen before (as many recipients as hits:
    each needs its ledger read and writes its firsts), as on a big campaign's first day; else
    2,000 recipients take 10 hits each, and after the first second their rows are remembered."""
    rate = 2000.0
    seconds = 3.0 if quick else 10.0
    n_old, n_new = (int(rate * seconds) if first_hits else 2000), 3000
    async with emulator_process() as uri, SmtpSink() as sink:
        client: Client = AsyncMongoClient(uri, tz_aware=True)
        old = await _seed(client, n_old, n_new)
        settings = _settings(uri, sink, "marketing", "opens_and_clicks", 100)
        reactor = Reactor(settings)
        tune_for_service()
        requests = _requests(settings, str(old), n_old, int(rate * seconds))
        async with anyio.create_task_group() as tg:
            await tg.start(reactor.run)
            await reactor.ready.wait()
            while len(sink.messages) < 50:
                await anyio.sleep(0.05)
            sent_before = len(sink.messages)
            result = await _generate(rate, requests)
            sent_during = len(sink.messages) - sent_before
            waited = time.perf_counter()
            while await _stored(client) < len(requests) and time.perf_counter() - waited < 30:
                await anyio.sleep(0.2)
            stored = await _stored(client)
            reactor.request_shutdown()
        await client.close()
    return _summary(result, rate, len(requests), stored, sent_during)


def _summary(
    result: dict[str, Any], rate: float, sent: int, stored: int, emails: int
) -> dict[str, Any]:
    ms = [1000 * v for v in result["latencies_s"]]
    elapsed = result["elapsed_s"]
    t_first = min(result["arrivals_s"])
    by_second: dict[int, list[float]] = {}
    for at, v in zip(result["arrivals_s"], ms, strict=True):
        by_second.setdefault(int(at - t_first), []).append(v)
    return {
        "offered_per_s": rate,
        "hits_sent": sent,
        # Hits answered without error over the offered schedule's length (sent ÷ rate): the
        # offered rate when every hit is answered, less for each error or unanswered hit. Its
        # ceiling is the offered rate (an open loop), so this says "absorbed 2,000/s", not how
        # much more one replica could take. (N ÷ elapsed would also count the last replies'
        # tail and fall below the offered rate however fast the service.)
        "absorbed_per_s": round((len(ms) - result["errors"]) / (sent / rate), 1),
        "errors": result["errors"],
        "p50_ms": round(percentile(ms, 0.5), 1),
        "p99_ms": round(percentile(ms, 0.99), 1),
        "max_ms": round(max(ms), 1),
        "p99_ms_per_second": [round(percentile(v, 0.99), 1) for _, v in sorted(by_second.items())],
        "events_stored": stored,
        "emails_sent_meanwhile_per_s": round(emails / elapsed, 1),
        "targets": {"per_s": 2000, "p99_ms": 25},
    }


NEWSLETTER = (
    "<html><body><h1>Spring, {{name}}</h1>"
    + "".join(
        f'<p><a href="https://shop.example/item/{i}?utm_source=mail">Item {i}</a> is back.</p>'
        for i in range(8)
    )
    + "</body></html>"
)


async def _send_rate(uri: str, sink: SmtpSink, db: str, n: int, tracking: str) -> float:
    """Emails per second one reactor (`reactor run` in a process of its own, as deployed: the
    SMTP sink that counts what arrives is not on its core) sends of an 8-link newsletter, first
    to last message at the sink."""
    client: Client = AsyncMongoClient(uri, tz_aware=True)
    port = free_port()
    env = {
        "MONGO_URI": uri,
        "CAMPAIGNS_DB": db,
        "LOG_LEVEL": "WARNING",
        "PUBLIC_HOST": "127.0.0.1",
        "PUBLIC_PORT": str(port),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "LINK_SECRET": SECRET,
        "TRACKING": tracking,
        "EMAIL_RATE_PER_SECOND": "100000",
        **{k: str(v) for k, v in sink.settings_env().items()},
    }
    reactor = ReactorProcess(f"bench-send-{db}", env)
    before = len(sink.messages)
    try:
        await reactor.start()
        await reactor.ready()
        now = dt.datetime.now(dt.UTC)
        await client[db].campaigns.insert_one(
            {
                "name": f"newsletter {tracking}",
                "status": "approved",
                "channels": ["email"],
                "startDate": now + dt.timedelta(seconds=0.5),
                "endDate": now + dt.timedelta(hours=1),
                "email": {"subject": "Spring", "html": NEWSLETTER},
                "targetedCustomerIds": [str(i) for i in range(n)],
            }
        )
        with anyio.fail_after(120):
            while len(sink.messages) == before:
                await anyio.sleep(0.005)
            while len(sink.messages) < before + n:
                await anyio.sleep(0.005)
    finally:
        await reactor.terminate()
        await client.close()
    arrived = sorted(m.received_at for m in sink.messages[before:])
    # Counted: let them go, so the sink (on the other core) does not grow round after round.
    del sink.messages[before:]
    return (len(arrived) - 1) / (arrived[-1] - arrived[0])


async def send_ratio(quick: bool) -> dict[str, Any]:
    """Sending with tracking on ÷ off, alternated in one run after a warm-up, in ABBA order
    (off, on, on, off, off, on...: a machine that slows or speeds up over the run favours
    neither), each a fresh reactor process sending an 8-link newsletter as fast as it can.

    The figure is the ratio of the sums of the rates; each round's own ratio (its two runs back
    to back) is reported beside it, and a 95 % interval for the ratio from them (Student's t on
    their logarithms): on this shared machine single rounds spread from 0.77 to 1.06 within one
    run, so the interval says whether a figure on either side of its goal is more than noise."""
    n = 1000 if quick else 5000
    rounds = 2 if quick else 12
    rates: dict[str, list[float]] = {"off": [], "opens_and_clicks": []}
    async with emulator_process() as uri, SmtpSink() as sink:
        client: Client = AsyncMongoClient(uri)
        await client.retail_db.newdatabase.insert_many(
            [{"customer_id": i, "email": f"c{i}@example.com", "name": f"C{i}"} for i in range(n)]
        )
        await client.retail_db.newdatabase.create_index("customer_id")
        await client.close()
        await _send_rate(uri, sink, "send_warmup", n // 2, "off")  # caches, pools, indexes
        for r in range(rounds):
            for mode in list(rates) if r % 2 == 0 else reversed(list(rates)):
                db = f"send_{mode}_{r}"
                rates[mode].append(round(await _send_rate(uri, sink, db, n, mode), 1))
    on, off = sum(rates["opens_and_clicks"]), sum(rates["off"])
    each = [a / b for a, b in zip(rates["opens_and_clicks"], rates["off"], strict=True)]
    return {
        "emails": n,
        "rounds": rounds,
        "per_s": rates,
        "round_ratios": [round(r, 3) for r in each],
        "on_over_off": round(on / off, 3),
        "interval_95": [round(x, 3) for x in ratio_interval(each)],
    }


def ratio_interval(ratios: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A `level` confidence interval for the ratio that paired rounds measure: Student's t on
    the mean of their logarithms (a ratio's noise is multiplicative), taken back."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = stats.t.ppf((1 + level) / 2, len(logs) - 1) * statistics.stdev(logs) / len(logs) ** 0.5
    return math.exp(mean - half), math.exp(mean + half)
