"""Notification benchmark: how soon after a campaign becomes `running` its signed
`campaign.started` reaches a receiver on loopback.

Setup: the emulator in its own process, two reactor replicas with a Standard Webhooks
destination from the environment, an SMTP sink, and a receiver (aiohttp, loopback) that verifies
every signature and records when each webhook-id first arrived. N campaigns (one recipient each)
start at instants spread over a few seconds. Latency per campaign = first arrival of its
`campaign.started` minus `execution.startedAt`, the database's time of the start claim (the emulator
and the receiver share this machine's clock). Counted at the receiver: every campaign's event
exactly once after dropping repeats by id, none missing.

Goal: p99 ≤ 1 s.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import time
from typing import Any

import anyio
from aiohttp import web
from pymongo import AsyncMongoClient
from standardwebhooks.webhooks import Webhook

from ..app import Reactor
from ..config import Settings
from ..embedded.smtp_sink import SmtpSink
from .common import emulator_process, percentile
from .figures import Figure

Client = AsyncMongoClient[dict[str, Any]]
SOURCES = ["reactor/bench/notify.py", "reactor/notify", "reactor/scheduling/scheduler.py"]


class _Receiver:
    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(secret)
        self.first: dict[str, tuple[float, dict[str, Any]]] = {}
        self.requests = 0
        self.bad = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.time()
        self.requests += 1
        try:
            payload = self._webhook.verify(body, dict(request.headers.items()))
        except Exception:
            self.bad += 1
            return web.Response(status=400)
        self.first.setdefault(request.headers["webhook-id"], (arrived, payload))
        return web.Response(text="ok")


async def run(quick: bool = False) -> dict[str, Any]:
    n = 30 if quick else 200
    spread_s = 3.0 if quick else 10.0
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    receiver = _Receiver(secret)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with emulator_process() as uri, SmtpSink() as sink:
            client: Client = AsyncMongoClient(uri, tz_aware=True)
            await client.retail_db.newdatabase.insert_one(
                {"customer_id": 1, "email": "c1@example.com", "name": "C1"}
            )
            env = {k.lower(): v for k, v in sink.settings_env().items()}
            reactors = [
                Reactor(
                    Settings(
                        mongo_uri=uri,
                        metrics_port=0,
                        metrics_host="127.0.0.1",
                        reactor_instance_id=f"bench-notify-{i}",
                        notify_webhook_url=f"http://127.0.0.1:{port}/hook",
                        notify_webhook_secret=secret,
                        notify_allow_loopback=True,  # the receiver is on 127.0.0.1
                        **env,
                    )
                )
                for i in range(2)
            ]
            async with anyio.create_task_group() as tg:
                for reactor in reactors:
                    await tg.start(reactor.run)
                for reactor in reactors:
                    await reactor.ready.wait()
                ids = await _campaigns(client, n, spread_s)
                deadline = time.monotonic() + spread_s + 30
                while len(_started(receiver)) < n and time.monotonic() < deadline:
                    await anyio.sleep(0.1)
                await anyio.sleep(1.0)  # repeats, if any, arrive too
                started_at = {
                    str(d["_id"]): d["execution"]["startedAt"]
                    async for d in client.marketing.campaigns.find(
                        {"_id": {"$in": ids}}, {"execution.startedAt": 1}
                    )
                }
                for reactor in reactors:
                    reactor.request_shutdown()
            await client.close()
    finally:
        await runner.cleanup()
    return _result(receiver, started_at, n)


async def _campaigns(client: Client, n: int, spread_s: float) -> list[Any]:
    now = dt.datetime.now(dt.UTC)
    docs = [
        {
            "name": f"bench {i}",
            "status": "approved",
            "channels": ["email"],
            "startDate": now + dt.timedelta(seconds=2 + spread_s * i / n),
            "endDate": now + dt.timedelta(hours=1),
            "email": {"subject": "Hi {{name}}", "text": "Hello"},
            "targetedCustomerIds": ["1"],
        }
        for i in range(n)
    ]
    return (await client.marketing.campaigns.insert_many(docs)).inserted_ids


def _started(receiver: _Receiver) -> dict[str, float]:
    """Campaign id -> first arrival of its campaign.started."""
    return {
        payload["data"]["campaign"]["id"]: at
        for at, payload in receiver.first.values()
        if payload["type"] == "campaign.started"
    }


def _result(receiver: _Receiver, started_at: dict[str, dt.datetime], n: int) -> dict[str, Any]:
    arrivals = _started(receiver)
    latencies_ms = [
        1000 * (arrivals[cid] - at.timestamp()) for cid, at in started_at.items() if cid in arrivals
    ]
    return {
        "campaigns": n,
        "started_received": len(arrivals),
        "missing": n - len(arrivals),
        "requests": receiver.requests,
        "bad_signatures": receiver.bad,
        "p50_ms": round(percentile(latencies_ms, 0.5), 1),
        "p99_ms": round(percentile(latencies_ms, 0.99), 1),
        "max_ms": round(max(latencies_ms), 1) if latencies_ms else float("nan"),
        "target": {"p99_ms": 1000},
    }


def figures(result: dict[str, Any]) -> list[Figure]:
    return [
        Figure(
            "campaign.started at a loopback receiver after `running`, p99",
            result["p99_ms"],
            "ms",
            goal=1000,
            op="<=",
            note=f"{result['campaigns']} campaigns, two replicas, signed and verified",
        ),
        Figure(
            "campaign.started events missing at the receiver", result["missing"], goal=0, op="=="
        ),
        Figure("signatures that failed verification", result["bad_signatures"], goal=0, op="=="),
    ]
