"""The fault suite: real `reactor run` OS processes against the embedded MongoDB server, the SMTP
sink and the Twilio fake (all three in this process, where faults are injected), one scenario
at a time. Each scenario runs several campaigns to hundreds of customers and then counts, per
(campaign, channel, customer), what the sinks received and what the ledger says:

    duplicates  messages a sink received more than once            (must be 0)
    lost        targeted (customer, channel) with no final ledger row (must be 0)
    uncertain   rows whose outcome cannot be known     (at most the concurrency bound per crash)

plus start lateness p99 and recovery time (from the end of the fault to every campaign's sends
being done).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pymongo import AsyncMongoClient

from ..embedded.mongo import MongoEmulator
from ..embedded.smtp_sink import SmtpSink
from ..embedded.twilio_fake import TwilioFake
from .common import percentile

CONCURRENCY = 4
Client = AsyncMongoClient[dict[str, Any]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ReactorProcess:
    name: str
    env: dict[str, str]
    port: int = field(default_factory=_free_port)
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            **self.env,
            "REACTOR_INSTANCE_ID": self.name,
            "METRICS_PORT": str(self.port),
            "METRICS_HOST": "127.0.0.1",
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "reactor",
            "run",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def terminate(self, timeout_s: float = 30) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


@dataclass
class World:
    emulator: MongoEmulator
    sink: SmtpSink
    twilio: TwilioFake
    client: Client
    customers: int
    env: dict[str, str]
    reactors: list[ReactorProcess] = field(default_factory=list)
    campaign_ids: list[Any] = field(default_factory=list)
    bad_ids: list[Any] = field(default_factory=list)

    async def spawn(self, name: str, *, wait: bool = True) -> ReactorProcess:
        reactor = ReactorProcess(name, self.env)
        self.reactors.append(reactor)
        await reactor.start()
        if wait:
            await reactor.ready()
        return reactor

    async def approve(
        self,
        n: int,
        *,
        start_in_s: float,
        window_s: float = 120,
        size: int | None = None,
        tag: str = "c",
    ) -> list[Any]:
        now = dt.datetime.now(dt.UTC)
        docs = []
        for i in range(n):
            name = f"{tag}{len(self.campaign_ids) + i}"
            audience = [str(c) for c in range(size or self.customers)]
            docs.append(
                {
                    "name": name,
                    "status": "approved",
                    "startDate": now + dt.timedelta(seconds=start_in_s),
                    "endDate": now + dt.timedelta(seconds=start_in_s + window_s),
                    "email": {"subject": f"[{name}] Hello {{{{name}}}}", "text": "Sale today."},
                    "sms": {"body": f"[{name}] Hi {{{{name}}}}, sale today."},
                    "targetedCustomerIds": audience,
                }
            )
        result = await self.client.marketing.campaigns.insert_many(docs)
        self.campaign_ids.extend(result.inserted_ids)
        return list(result.inserted_ids)

    async def all_sent(self) -> bool:
        count = await self.client.marketing.campaigns.count_documents(
            {"_id": {"$in": self.campaign_ids}, "execution.sendsDone": True}
        )
        return count == len(self.campaign_ids)

    async def stop_all(self) -> None:
        await asyncio.gather(*(r.terminate() for r in self.reactors))


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    """Wait until `check()`; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic()
        await asyncio.sleep(0.1)
    raise TimeoutError(f"condition not reached within {timeout_s}s")


@contextlib.asynccontextmanager
async def world(customers: int) -> AsyncIterator[World]:
    async with MongoEmulator() as emulator, SmtpSink(seed=3) as sink, TwilioFake(seed=3) as twilio:
        client: Client = AsyncMongoClient(emulator.uri, tz_aware=True)
        await client.retail_db.newdatabase.insert_many(
            [
                {
                    "customer_id": i,
                    "email": f"c{i}@shop.example",
                    "phone": f"+1415555{i:04d}",
                    "name": f"Customer {i}",
                }
                for i in range(customers)
            ]
        )
        await client.retail_db.newdatabase.create_index("customer_id")
        env = {
            "MONGO_URI": emulator.uri,
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "json",
            "LEASE_SECONDS": "2",
            "RECONCILE_INTERVAL_SECONDS": "2",
            "SHUTDOWN_GRACE_SECONDS": "5",
            "EMAIL_RATE_PER_SECOND": "150",
            "SMS_RATE_PER_SECOND": "150",
            "SEND_CONCURRENCY": str(CONCURRENCY),
            "SEND_MAX_ATTEMPTS": "50",
            "RETRY_BASE_SECONDS": "0.1",
            "RETRY_MAX_SECONDS": "1.0",
            **{k: str(v) for k, v in sink.settings_env().items()},
            **{k: str(v) for k, v in twilio.settings_env().items()},
        }
        w = World(emulator, sink, twilio, client, customers, env)
        try:
            yield w
        finally:
            await w.stop_all()
            await client.close()


async def account(w: World, *, crashes: int = 0, ambiguous: int = 0) -> dict[str, Any]:
    """Count sinks against the ledger, per (campaign, channel, customer). `ambiguous`: provider
    answers injected whose outcome cannot be known (a Twilio 5xx): each must be one uncertain
    row, never retried."""
    names = {}
    async for doc in w.client.marketing.campaigns.find(
        {"_id": {"$in": w.campaign_ids}}, {"name": 1, "execution": 1}
    ):
        names[doc["name"]] = doc
    received: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for m in w.sink.messages:
        name = m.subject.split("]", 1)[0].lstrip("[")
        received[(name, "email", m.to)] += 1
    for s in w.twilio.messages:
        name = s.body.split("]", 1)[0].lstrip("[")
        received[(name, "sms", s.to)] += 1
    duplicates = sum(n - 1 for n in received.values() if n > 1)
    states: collections.Counter[str] = collections.Counter()
    final = 0
    provider_5xx = 0
    async for row in w.client.marketing.deliveries.find(
        {"campaign": {"$in": [str(i) for i in w.campaign_ids]}}
    ):
        states[row["state"]] += 1
        if row["state"] == "uncertain" and str(row.get("error", "")).startswith("Twilio 5"):
            provider_5xx += 1
        if row["state"] in ("sent", "failed", "skipped", "uncertain"):
            final += 1
    expected = 0
    async for doc in w.client.marketing.campaigns.find({"_id": {"$in": w.campaign_ids}}):
        expected += len(set(doc.get("targetedCustomerIds", []))) * 2
    lateness = [
        d["execution"].get("startLatenessMs", 0.0) for d in names.values() if d.get("execution")
    ]
    return {
        "campaigns": len(w.campaign_ids),
        "deliveries_expected": expected,
        "duplicates": duplicates,
        "lost": expected - final,
        "uncertain": states["uncertain"],
        # Rows are written `pending` only for sends about to start, at most CONCURRENCY per
        # (campaign, channel) execution: that many per execution a crash can leave unknown.
        "uncertain_bound": max(1, crashes) * len(w.campaign_ids) * 2 * CONCURRENCY + ambiguous,
        "uncertain_from_provider_5xx": provider_5xx,
        "states": dict(states),
        "start_lateness_p99_ms": round(percentile(lateness, 0.99), 1) if lateness else None,
    }


# ---- scenarios -------------------------------------------------------------------------------


async def kill_owner(w: World, quick: bool) -> dict[str, Any]:
    a = await w.spawn("a")
    await w.approve(2, start_in_s=1)
    await until(lambda: _at_least(w, 40), 30)
    a.kill()
    killed_at = time.monotonic()
    await w.spawn("b")
    done_at = await until(w.all_sent, 90)
    return {**await account(w, crashes=1), "recovery_s": round(done_at - killed_at, 2)}


async def three_instances_bursts(w: World, quick: bool) -> dict[str, Any]:
    for name in ("a", "b", "c"):
        await w.spawn(name)
    t0 = time.monotonic()
    for _ in range(3):
        await w.approve(2 if quick else 4, start_in_s=0.5, size=w.customers // 2)
        await asyncio.sleep(1.0)
    done_at = await until(w.all_sent, 120)
    claims = await w.client.marketing.campaigns.distinct(
        "execution.epoch", {"_id": {"$in": w.campaign_ids}}
    )
    return {**await account(w), "epochs_seen": claims, "recovery_s": round(done_at - t0, 2)}


async def rolling_restart(w: World, quick: bool) -> dict[str, Any]:
    names = ["a", "b", "c"]
    for name in names:
        await w.spawn(name)
    await w.approve(3, start_in_s=0.5)
    await until(lambda: _at_least(w, 30), 30)
    codes = []
    for reactor in list(w.reactors):
        codes.append(await reactor.terminate())
        await w.spawn(f"{reactor.name}2")
    restarted_at = time.monotonic()
    done_at = await until(w.all_sent, 120)
    return {
        **await account(w, crashes=0),
        "exit_codes": codes,
        "recovery_s": round(done_at - restarted_at, 2),
    }


async def stream_closed_repeatedly(w: World, quick: bool) -> dict[str, Any]:
    await w.spawn("a")
    await w.spawn("b")
    admin = w.client.admin
    for _ in range(4):
        await admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": {"times": 2},
                "data": {"failCommands": ["getMore", "aggregate"], "closeConnection": True},
            }
        )
        await w.approve(1, start_in_s=0.5, size=w.customers // 2)
        await asyncio.sleep(0.5)
    fault_end = time.monotonic()
    done_at = await until(w.all_sent, 90)
    return {**await account(w), "recovery_s": round(done_at - fault_end, 2)}


async def history_lost_while_down(w: World, quick: bool) -> dict[str, Any]:
    a = await w.spawn("a")
    await asyncio.sleep(1.0)  # a resume token is persisted
    await a.terminate()
    await w.approve(2, start_in_s=2)
    w.emulator.drop_change_stream_history()
    back = await w.spawn("a")
    back_at = time.monotonic()
    done_at = await until(w.all_sent, 60)
    metrics = await _metrics(back)
    return {
        **await account(w),
        "history_lost_restarts": metrics.get(
            'reactor_change_stream_restarts_total{reason="history_lost"}', 0.0
        ),
        "recovery_s": round(done_at - back_at, 2),
    }


async def providers_failing(w: World, quick: bool) -> dict[str, Any]:
    await w.spawn("a")
    await w.approve(2, start_in_s=0.5)
    await until(lambda: _at_least(w, 20), 30)
    outage_s = 3 if quick else 20
    await w.sink.go_down()
    w.twilio.fail_next(10, 429, retry_after_s=1)
    w.twilio.fail_next(20, 500)
    await asyncio.sleep(outage_s)
    await w.sink.come_back()
    back_at = time.monotonic()
    done_at = await until(w.all_sent, 120)
    return {
        **await account(w, crashes=1, ambiguous=20),
        "smtp_outage_s": outage_s,
        "recovery_s": round(done_at - back_at, 2),
    }


async def mongo_failing(w: World, quick: bool) -> dict[str, Any]:
    await w.spawn("a")
    await w.spawn("b")
    await w.approve(2, start_in_s=1)
    await until(lambda: _at_least(w, 20), 30)
    commands = ["find", "update", "insert", "findAndModify", "aggregate", "getMore", "delete"]
    await w.client.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {"failCommands": commands, "errorCode": 91, "appName": "campaign-reactor/a"},
        }
    )
    await asyncio.sleep(3 if quick else 8)
    await w.client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    back_at = time.monotonic()
    done_at = await until(w.all_sent, 120)
    return {**await account(w, crashes=1), "recovery_s": round(done_at - back_at, 2)}


async def bad_campaigns_in_burst(w: World, quick: bool) -> dict[str, Any]:
    await w.spawn("a")
    now = dt.datetime.now(dt.UTC)
    bad = [
        {"name": "bad-date", "status": "approved", "startDate": "soon", "endDate": now},
        {"name": "bad-window", "status": "approved", "startDate": now, "endDate": now},
        {
            "name": "bad-channel",
            "status": "approved",
            "startDate": now,
            "endDate": now + dt.timedelta(hours=1),
            "channels": ["fax"],
        },
        {
            "name": "bad-content",
            "status": "approved",
            "startDate": now,
            "endDate": now + dt.timedelta(hours=1),
            "channels": ["email"],
            "email": {"text": "x"},
        },
        {
            "name": "bad-status",
            "status": "aproved",
            "startDate": now,
            "endDate": now + dt.timedelta(hours=1),
        },
        {
            "name": "bad-targets",
            "status": "approved",
            "startDate": now,
            "endDate": now + dt.timedelta(hours=1),
            "sms": {"body": "x"},
            "targetedCustomerIds": "1,2,3",
        },
    ]
    t0 = time.monotonic()
    result = await w.client.marketing.campaigns.insert_many(bad)
    w.bad_ids.extend(result.inserted_ids)
    await w.approve(3, start_in_s=0.5, size=w.customers // 2)
    done_at = await until(w.all_sent, 90)

    async def all_rejected() -> bool:
        n = await w.client.marketing.campaigns.count_documents(
            {"_id": {"$in": w.bad_ids}, "execution.lastError": {"$exists": True}}
        )
        return n == len(w.bad_ids)

    await until(all_rejected, 30)
    sent_for_bad = await w.client.marketing.deliveries.count_documents(
        {"campaign": {"$in": [str(i) for i in w.bad_ids]}}
    )
    return {
        **await account(w),
        "bad_campaigns": len(bad),
        "bad_rejected": len(bad),
        "deliveries_for_bad": sent_for_bad,
        "recovery_s": round(done_at - t0, 2),
    }


SCENARIOS: dict[str, Callable[[World, bool], Awaitable[dict[str, Any]]]] = {
    "1 owner SIGKILLed, another takes over": kill_owner,
    "2 three instances, approvals in bursts": three_instances_bursts,
    "3 rolling restart (SIGTERM each in turn)": rolling_restart,
    "4 change stream closed repeatedly": stream_closed_repeatedly,
    "5 history lost while down": history_lost_while_down,
    "6 SMTP down, Twilio 429 then 500": providers_failing,
    "7 MongoDB commands failing": mongo_failing,
    "8 bad campaigns in a healthy burst": bad_campaigns_in_burst,
}


async def _at_least(w: World, n: int) -> bool:
    return len(w.sink.messages) + len(w.twilio.messages) >= n


async def _metrics(reactor: ReactorProcess) -> dict[str, float]:
    out: dict[str, float] = {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{reactor.port}/metrics") as resp,
    ):
        for line in (await resp.text()).splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
    return out


async def run_scenario(name: str, quick: bool) -> dict[str, Any]:
    customers = 120 if quick else 400
    t0 = time.monotonic()
    async with world(customers) as w:
        result = await SCENARIOS[name](w, quick)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["ok"] = (
        result["duplicates"] == 0
        and result["lost"] == 0
        and result["uncertain"] <= result["uncertain_bound"]
    )
    return result


async def run(quick: bool = False) -> dict[str, Any]:
    results = {}
    for name in SCENARIOS:
        results[name] = await run_scenario(name, quick)
        print(f"  {name}: {results[name]}", flush=True)
    print(table(results))
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | deliveries | duplicates | lost | uncertain (bound) | start p99 ms | "
        "recovery s | ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['deliveries_expected']} | {r['duplicates']} | {r['lost']} | "
            f"{r['uncertain']} ({r['uncertain_bound']}) | {r['start_lateness_p99_ms']} | "
            f"{r['recovery_s']} | {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines)
