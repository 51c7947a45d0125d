"""Webhook benchmark: one reactor absorbs provider events while a campaign sends.

Setup: a text campaign goes out first (so the ledger holds SMS rows with Twilio SIDs) and an
email campaign's first sends go out; then, while that email campaign keeps sending at its rate,
a load generator posts events at a fixed arrival rate (open loop: a slow answer does not slow
the arrivals) for a fixed time: Twilio status callbacks (signed, as Twilio sends them) mixed
with bounce and complaint events (the generic bearer-token endpoint, one per request). Every
request's latency is measured from its scheduled arrival, so queueing counts.

Target: ≥ 1,000 events/s with p99 ≤ 50 ms.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
from pymongo import AsyncMongoClient

from ..app import Reactor
from ..config import Settings
from ..embedded.smtp_sink import SmtpSink
from ..embedded.twilio_fake import TwilioFake
from ..gctune import tune_for_service
from .common import emulator_process, free_port, percentile

Client = AsyncMongoClient[dict[str, Any]]


async def _campaign(client: Client, name: str, channels: list[str], n: int, first: int = 0) -> Any:
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
            "targetedCustomerIds": [str(i) for i in range(first, first + n)],
        }
    )
    return res.inserted_id


async def _wait_done(client: Client, campaign_id: Any) -> None:
    while True:
        doc = await client.marketing.campaigns.find_one({"_id": campaign_id})
        if (doc or {}).get("execution", {}).get("sendsDone"):
            return
        await anyio.sleep(0.1)


async def run(quick: bool = False) -> dict[str, Any]:
    rate = 1000.0
    seconds = 3.0 if quick else 10.0
    n_sms = 1000 if quick else 3000
    n_email = 5000
    token = secrets.token_hex(16)
    async with (
        emulator_process() as uri,
        SmtpSink() as sink,
        TwilioFake() as twilio,
    ):
        client: Client = AsyncMongoClient(uri, tz_aware=True)
        await client.retail_db.newdatabase.insert_many(
            [
                {
                    "customer_id": i,
                    "email": f"c{i}@example.com",
                    "phone": f"+1415555{i % 10000:04d}",
                    "name": f"C{i}",
                }
                for i in range(n_sms + n_email)
            ]
        )
        await client.retail_db.newdatabase.create_index("customer_id")
        port = free_port()
        env = {k.lower(): v for k, v in {**sink.settings_env(), **twilio.settings_env()}.items()}
        settings = Settings(
            **{
                "mongo_uri": uri,
                "metrics_port": 0,
                "metrics_host": "127.0.0.1",
                "public_host": "127.0.0.1",
                "public_port": port,
                "public_base_url": f"http://127.0.0.1:{port}",
                "link_secret": secrets.token_hex(32),
                "webhook_token": token,
                "sms_send_hours": "00:00-24:00",
                "sms_rate_per_second": 2000,
                "email_rate_per_second": 100,
                "reactor_instance_id": "bench-webhooks",
                **env,
            }
        )
        reactor = Reactor(settings)
        tune_for_service()  # as `reactor run` does
        async with anyio.create_task_group() as tg:
            await tg.start(reactor.run)
            await reactor.ready.wait()
            texts = await _campaign(client, "texts", ["sms"], n_sms)
            await _wait_done(client, texts)
            await anyio.sleep(1.0)  # the fake's own callbacks settle
            # Each message's own StatusCallback URL, as Twilio calls it.
            sent = [(m.sid, m.status_callback or "") for m in twilio.messages]
            await _campaign(client, "emails", ["email"], n_email, first=n_sms)
            while len(sink.messages) < 50:
                await anyio.sleep(0.05)
            base = settings.public_base_url
            # Signed ahead of time, and sent from a process of its own: the generator must not
            # be what limits the rate, nor take the reactor's CPU.
            requests: list[list[Any]] = []
            total = int(rate * seconds)
            for i in range(total):
                if i % 10 < 7:
                    sid, callback = sent[i % len(sent)]
                    params = {
                        "MessageSid": sid,
                        "MessageStatus": ("undelivered", "failed", "read")[i % 3],
                        "AccountSid": twilio.account_sid,
                    }
                    headers = {"X-Twilio-Signature": twilio.signature(callback, params)}
                    requests.append([callback, "form", params, headers])
                else:
                    kind = ("hard_bounce", "soft_bounce", "complaint")[i % 3]
                    event = {"id": f"b{i}", "type": kind, "email": f"x{i}@bounce.example"}
                    requests.append(
                        [
                            f"{base}/webhooks/generic",
                            "json",
                            {"events": [event]},
                            {"Authorization": f"Bearer {token}"},
                        ]
                    )
            sent_before = len(sink.messages)
            with tempfile.TemporaryDirectory() as tmp:
                spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
                spec.write_text(json.dumps({"rate": rate, "requests": requests}))
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "reactor.bench.loadgen", str(spec), str(out)
                )
                await proc.wait()
                result = json.loads(out.read_text())
            latencies, arrivals = result["latencies_s"], result["arrivals_s"]
            receipt_ms = [
                1000 * v for v, i in zip(latencies, result["indices"], strict=True) if i % 10 < 7
            ]
            bounce_ms = [
                1000 * v for v, i in zip(latencies, result["indices"], strict=True) if i % 10 >= 7
            ]
            errors, elapsed = result["errors"], result["elapsed_s"]
            sent_during = len(sink.messages) - sent_before
            reactor.request_shutdown()
        await client.close()
    ms = [1000 * v for v in latencies]
    t_first = min(arrivals)
    by_second: dict[int, list[float]] = {}
    for at, v in zip(arrivals, ms, strict=True):
        by_second.setdefault(int(at - t_first), []).append(v)
    return {
        "p99_ms_receipts": round(percentile(receipt_ms, 0.99), 1),
        "p99_ms_bounces": round(percentile(bounce_ms, 0.99), 1),
        "p99_ms_per_second": [round(percentile(v, 0.99), 1) for _, v in sorted(by_second.items())],
        "events": len(latencies),
        "offered_per_s": rate,
        "seconds": round(elapsed, 2),
        "absorbed_per_s": round(len(latencies) / elapsed, 1),
        "errors": errors,
        "p50_ms": round(percentile(ms, 0.5), 1),
        "p99_ms": round(percentile(ms, 0.99), 1),
        "max_ms": round(max(ms), 1),
        "mix": "70% Twilio status callbacks, 30% bounces/complaints (one per request)",
        "emails_sent_meanwhile": sent_during,
        "targets": {"per_s": 1000, "p99_ms": 50},
    }
