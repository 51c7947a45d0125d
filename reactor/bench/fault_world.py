"""The fault suite's world: the embedded MongoDB server, the SMTP sink and the Twilio fake in
this process (where faults are injected), real `reactor run` processes against them, and the
account of what the sinks received against what the ledger says."""

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
from ..embedded.tls import TestPki
from ..embedded.twilio_fake import TwilioFake
from .common import percentile

CONCURRENCY = 4
LEASE_S = 2.0  # the replicas' LEASE_SECONDS


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
    # Run under Debian's faketime with this wall-clock offset ("+60s", "-60s"): a replica whose
    # clock is off. Monotonic time is left alone, as NTP leaves it.
    clock_offset: str | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            **self.env,
            "REACTOR_INSTANCE_ID": self.name,
            "METRICS_PORT": str(self.port),
            "METRICS_HOST": "127.0.0.1",
        }
        command = [sys.executable, "-m", "reactor", "run"]
        if self.clock_offset:
            command = ["faketime", "-f", self.clock_offset, *command]
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        # A process group of its own: faketime runs the replica as its child, and a signal
        # meant for the replica must reach it (not only faketime, leaving an orphan behind).
        self.proc = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

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

    def pause(self) -> None:
        """SIGSTOP: a VM pause or a stop-the-world collection, as the process sees it."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self._signal(signal.SIGKILL)

    async def terminate(self, timeout_s: float = 30) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self._signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self._signal(signal.SIGKILL)
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

    async def spawn(
        self, name: str, *, wait: bool = True, clock_offset: str | None = None
    ) -> ReactorProcess:
        reactor = ReactorProcess(name, self.env, clock_offset=clock_offset)
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

    async def fail_commands(self, commands: list[str], *, error_code: int, replica: str) -> None:
        """Every listed command from one replica answers `error_code` until `heal()`."""
        await self.client.admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": "alwaysOn",
                "data": {
                    "failCommands": commands,
                    "errorCode": error_code,
                    "appName": f"campaign-reactor/{replica}",
                },
            }
        )

    async def heal(self) -> None:
        await self.client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})

    async def owner(self, campaign_id: Any) -> ReactorProcess:
        """The replica that owns a running campaign now."""
        doc = await self.client.marketing.campaigns.find_one({"_id": campaign_id})
        name = ((doc or {}).get("execution") or {}).get("owner")
        return next(r for r in self.reactors if r.name == name)

    async def sender_of(self, campaign_id: Any) -> ReactorProcess:
        """The replica sending a campaign now: the owner of one of its claimed shards, or,
        unsharded, the campaign's owner."""
        shard = await self.client.marketing.campaign_shards.find_one(
            {"campaign": str(campaign_id), "state": "claimed"}, sort=[("index", 1)]
        )
        if shard is None:
            return await self.owner(campaign_id)
        return next(r for r in self.reactors if r.name == shard["owner"])

    async def executions(self, campaign_id: Any) -> list[dict[str, Any]]:
        """The campaign's execution attempts (one per epoch), oldest first."""
        cursor = self.client.marketing.campaign_executions.find(
            {"campaign": str(campaign_id)}, sort=[("epoch", 1)]
        )
        return await cursor.to_list()

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
async def world(customers: int, *, tls: TestPki | None = None) -> AsyncIterator[World]:
    """The stand-ins and the seeded orders; with `tls`, the SMTP sink offers STARTTLS with that
    PKI's certificate and the replicas trust its CA."""
    async with (
        MongoEmulator() as emulator,
        SmtpSink(seed=3, tls=tls) as sink,
        TwilioFake(seed=3) as twilio,
    ):
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
            "LEASE_SECONDS": str(LEASE_S),
            "RECONCILE_INTERVAL_SECONDS": "2",
            "SHUTDOWN_GRACE_SECONDS": "5",
            "EMAIL_RATE_PER_SECOND": "150",
            "SMS_RATE_PER_SECOND": "150",
            "SEND_CONCURRENCY": str(CONCURRENCY),
            "SEND_MAX_ATTEMPTS": "50",
            "RETRY_BASE_SECONDS": "0.1",
            "RETRY_MAX_SECONDS": "1.0",
            # Temporary refusals come back in seconds here, not the production minutes.
            "TEMPFAIL_RETRY_SECONDS": "0.5,1,2,4,8",
            "CHANNEL_PAUSE_MAX_SECONDS": "2",
            "SMS_RESOLVE_AFTER_SECONDS": "1",
            "SMS_SEND_HOURS": "00:00-24:00",  # the scenarios run at any hour
            **{k: str(v) for k, v in sink.settings_env().items()},
            **{k: str(v) for k, v in twilio.settings_env().items()},
        }
        w = World(emulator, sink, twilio, client, customers, env)
        try:
            yield w
        finally:
            await w.stop_all()
            await client.close()


def _received(w: World) -> collections.Counter[tuple[str, str, str]]:
    """What the sinks took, per (campaign name, channel, recipient)."""
    received: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for m in w.sink.messages:
        name = m.subject.split("]", 1)[0].lstrip("[")
        received[(name, "email", m.to)] += 1
    for s in w.twilio.messages:
        name = s.body.split("]", 1)[0].lstrip("[")
        received[(name, "sms", s.to)] += 1
    return received


@dataclass
class _LedgerCount:
    """The deliveries ledger as the account reads it."""

    states: collections.Counter[str] = field(default_factory=collections.Counter)
    recorded: dict[tuple[str, str, str], str] = field(default_factory=dict)  # name, channel, to
    final: int = 0
    provider_5xx: int = 0
    resolved: int = 0  # uncertain rows found in Twilio's list afterwards, recorded sent


async def _count_ledger(w: World, name_of: dict[str, str]) -> _LedgerCount:
    """The ledger's rows of the world's campaigns, per state and per (campaign name, channel,
    recipient)."""
    count = _LedgerCount()
    async for row in w.client.marketing.deliveries.find(
        {"campaign": {"$in": [str(i) for i in w.campaign_ids]}}
    ):
        count.states[row["state"]] += 1
        key = (name_of.get(row["campaign"], "?"), row["channel"], str(row.get("to")))
        count.recorded[key] = row["state"]
        if row["state"] == "uncertain" and str(row.get("error", "")).startswith("Twilio 5"):
            count.provider_5xx += 1
        if row.get("reason") == "resolved_with_provider":
            count.resolved += 1
        if row["state"] in ("sent", "failed", "skipped", "uncertain"):
            count.final += 1
    return count


async def _expected_deliveries(w: World) -> int:
    """One email and one text per distinct target of every campaign."""
    expected = 0
    async for doc in w.client.marketing.campaigns.find({"_id": {"$in": w.campaign_ids}}):
        expected += len(set(doc.get("targetedCustomerIds", []))) * 2
    return expected


async def _early_starts(w: World) -> int:
    """Campaigns started before their startDate, as the database's clock tells (startedAt is
    its $$NOW)."""
    early = 0
    async for doc in w.client.marketing.campaigns.find({"_id": {"$in": w.campaign_ids}}):
        started = (doc.get("execution") or {}).get("startedAt")
        if started is not None and started < doc["startDate"]:
            early += 1
    return early


async def account(w: World, *, crashes: int = 0, ambiguous: int = 0) -> dict[str, Any]:
    """Count sinks against the ledger, per (campaign, channel, customer). `ambiguous`: provider
    answers injected whose outcome cannot be known (a Twilio 5xx): each must be one uncertain
    row, never retried."""
    names = {}
    async for doc in w.client.marketing.campaigns.find(
        {"_id": {"$in": w.campaign_ids}}, {"name": 1, "execution": 1}
    ):
        names[doc["name"]] = doc
    received = _received(w)
    duplicates = sum(n - 1 for n in received.values() if n > 1)
    name_of = {str(doc["_id"]): name for name, doc in names.items()}
    ledger = await _count_ledger(w, name_of)
    recorded, states = ledger.recorded, ledger.states
    expected = await _expected_deliveries(w)
    lateness = [
        d["execution"].get("startLatenessMs", 0.0) for d in names.values() if d.get("execution")
    ]
    early = await _early_starts(w)
    # The sinks against the ledger, both ways. A message a sink took must be `sent` in the
    # ledger (or `uncertain`: the provider's answer was lost); a `sent` row must be at a sink.
    at_sink_not_sent = sum(1 for k in received if recorded.get(k) not in ("sent", "uncertain"))
    sent_not_at_sink = sum(1 for k, st in recorded.items() if st == "sent" and k not in received)
    return {
        "campaigns": len(w.campaign_ids),
        "deliveries_expected": expected,
        "duplicates": duplicates,
        "lost": expected - ledger.final,
        "at_sink_not_sent": at_sink_not_sent,
        "sent_not_at_sink": sent_not_at_sink,
        "uncertain_at_sink": sum(1 for k in received if recorded.get(k) == "uncertain"),
        "uncertain": states["uncertain"],
        # Rows are written `pending` only for sends about to start, at most CONCURRENCY per
        # (campaign, channel) execution: that many per execution a crash can leave unknown.
        "uncertain_bound": max(1, crashes) * len(w.campaign_ids) * 2 * CONCURRENCY + ambiguous,
        "uncertain_from_provider_5xx": ledger.provider_5xx,
        "resolved_with_provider": ledger.resolved,
        "early_starts": early,
        "states": dict(states),
        "start_lateness_p99_ms": round(percentile(lateness, 0.99), 1) if lateness else None,
    }


async def at_least(w: World, n: int) -> bool:
    return len(w.sink.messages) + len(w.twilio.messages) >= n


async def metrics_of(reactor: ReactorProcess) -> dict[str, float]:
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
