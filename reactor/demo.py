"""`reactor demo`: the whole system on embedded stand-ins, in one process, in well under a minute.

It starts the MongoDB emulator, an SMTP sink and a Twilio fake; seeds order rows for a few hundred
customers and a handful of overlapping campaigns approved to start a few seconds ahead, plus one
approved too late (so the misfire rule shows); runs two reactor instances against them (each
campaign still starts once); shows live progress; and ends with a table per campaign. The exit
code is 0 when every campaign reached the state it should and nobody got a message twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import random
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
from pymongo import AsyncMongoClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .app import Reactor
from .config import Settings
from .embedded.mongo import MongoEmulator
from .embedded.smtp_sink import CapturedEmail, SmtpSink
from .embedded.twilio_fake import CapturedSms, TwilioFake

FINAL = ("completed", "missed", "cancelled")


@dataclass
class DemoCampaign:
    id: Any
    name: str
    start_at: dt.datetime
    end_at: dt.datetime
    channels: list[str]
    targets: int
    expected: str
    audience: frozenset[str] = frozenset()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _customer_rows(rng: random.Random, customers: int) -> list[dict[str, Any]]:
    """Order rows as the segmentation database holds them: ids stored as strings and numbers,
    a few invalid addresses and numbers, repeat buyers with several rows."""
    first = ["Ana", "Ben", "Chloé", "Dev", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
    rows = []
    for i in range(customers):
        cid: Any = i if i % 2 else str(i)  # ids stored both ways, as in the real data
        email = f"customer{i}@shop.example"
        phone = f"+1415555{i % 10000:04d}"
        if i % 37 == 5:
            email = "no-at-sign.example"
        if i % 41 == 7:
            phone = "555"
        name = f"{rng.choice(first)} {i}"
        row = {"customer_id": cid, "email": email, "phone": phone, "name": name}
        rows.append(row | {"total": rng.randint(5, 500)})
        if i % 3 == 0:  # repeat buyers have several order rows
            rows.append(row | {"email": "", "phone": None, "total": rng.randint(5, 500)})
    return rows


def _sale(
    i: int, now: dt.datetime, rng: random.Random, customers: int
) -> tuple[dict[str, Any], DemoCampaign]:
    """The i-th sale campaign: its document, and what the demo expects of it."""
    channel_sets = [["email", "sms"], ["email"], ["sms"], ["email", "sms"]]
    start = now + dt.timedelta(seconds=4 + 1.5 * i)
    end = start + dt.timedelta(seconds=8)
    audience = rng.sample(range(customers), k=max(1, int(customers * rng.uniform(0.5, 0.9))))
    targets: list[Any] = [str(c) for c in audience]
    targets += [f"ghost-{j}" for j in range(3)]  # ids with no order rows
    channels = channel_sets[i % len(channel_sets)]
    doc = {
        "name": f"Campaign {i + 1}",
        "status": "approved",
        "startDate": start,
        "endDate": end,
        "channels": channels,
        "email": {
            "subject": f"{{{{name}}}}, autumn sale {i + 1} starts now",
            "text": "Hello {{name}},\n20% off everything today.",
            "html": "<p>Hello <b>{{name}}</b>,</p><p>20% off everything today.</p>",
        },
        "sms": {
            "body": f"Hi {{{{name}}}}: sale {i + 1}, 20% off today only. Reply STOP to opt out."
        },
        "targetedCustomerIds": targets,
    }
    expected = DemoCampaign(
        None,
        f"Campaign {i + 1}",
        start,
        end,
        channels,
        len(set(targets)),
        "completed",
        frozenset(str(c) for c in audience),
    )
    return doc, expected


def _approved_too_late(now: dt.datetime, customers: int) -> tuple[dict[str, Any], DemoCampaign]:
    """A campaign approved two hours after its start: the misfire rule makes it `missed`."""
    late_start = now - dt.timedelta(hours=2)
    end = now + dt.timedelta(hours=1)
    doc = {
        "name": "Approved too late",
        "status": "approved",
        "startDate": late_start,
        "endDate": end,
        "channels": ["email"],
        "email": {"subject": "Yesterday's news", "text": "This must not be sent late."},
        "targetedCustomerIds": [str(c) for c in range(min(customers, 20))],
    }
    expected = DemoCampaign(
        None, "Approved too late", late_start, end, ["email"], min(customers, 20), "missed"
    )
    return doc, expected


async def _seed(
    client: AsyncMongoClient[dict[str, Any]], rng: random.Random, customers: int, campaigns: int
) -> list[DemoCampaign]:
    await client.retail_db.newdatabase.insert_many(_customer_rows(rng, customers))
    now = dt.datetime.now(dt.UTC)
    seeded = [_sale(i, now, rng, customers) for i in range(campaigns)]
    seeded.append(_approved_too_late(now, customers))
    result = await client.marketing.campaigns.insert_many([doc for doc, _ in seeded])
    plan = [expected for _, expected in seeded]
    for item, cid in zip(plan, result.inserted_ids, strict=True):
        item.id = cid
    return plan


def run_demo(
    *,
    customers: int = 300,
    campaigns: int = 4,
    failure_rate: float = 0.0,
    keep_running: bool = False,
    seed: int = 7,
    metrics_port: int = 9464,
) -> int:
    return asyncio.run(_demo(customers, campaigns, failure_rate, keep_running, seed, metrics_port))


def _settings_base(mongo_uri: str, sink: SmtpSink, twilio: TwilioFake) -> dict[str, Any]:
    """Settings both demo instances share: quick leases, sweeps and retries so that faults and
    takeovers show within the demo's seconds, the fakes' credentials, and one public listener."""
    base: dict[str, Any] = {
        "mongo_uri": mongo_uri,
        "metrics_host": "127.0.0.1",
        "reconcile_interval_seconds": 5,
        "lease_seconds": 5,
        "email_rate_per_second": 400,
        "sms_rate_per_second": 200,
        "send_concurrency": 16,
        # Campaigns of a few hundred: cut into shards of 100, sent by both replicas.
        "shard_size": 100,
        "send_max_attempts": 3,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.3,
        # Temporary refusals (the fakes' injected 451s) come back within the demo's run.
        "tempfail_retry_seconds": "0.3,0.6,1.2",
        "sms_resolve_after_seconds": 0.5,
        "shutdown_grace_seconds": 5,
        # The demo runs at any hour; a real deployment keeps the 08:00-21:00 default.
        "sms_send_hours": "00:00-24:00",
    }
    base.update({k.lower(): v for k, v in sink.settings_env().items()})
    base.update({k.lower(): v for k, v in twilio.settings_env().items()})
    # Recipients' links point at instance a's public listener (in production: the proxy).
    public_port = _free_port()
    base.update(
        public_host="127.0.0.1",
        public_port=public_port,
        public_base_url=f"http://127.0.0.1:{public_port}",
        link_secret=secrets.token_hex(32),
        webhook_token=secrets.token_hex(16),
        postal_address="Demo Retail, 1 Main St, Springfield",
    )
    return base


def _introduce(
    console: Console,
    mongo_uri: str,
    sink: SmtpSink,
    twilio: TwilioFake,
    first: Reactor,
    campaigns: int,
    customers: int,
) -> None:
    console.print(
        f"[bold]Campaign Reactor demo[/]: MongoDB emulator at {mongo_uri}, "
        f"SMTP sink on :{sink.port}, Twilio fake on :{twilio.port}"
    )
    if first.http is not None:
        console.print(
            f"metrics: http://127.0.0.1:{first.http.port}/metrics   "
            f"health: http://127.0.0.1:{first.http.port}/readyz"
        )
    console.print(
        f"{customers} customers, {campaigns} campaigns (one approved too late), "
        "two reactor instances"
    )


async def _shards_by_owner(client: AsyncMongoClient[dict[str, Any]]) -> dict[str, int]:
    shards: collections.Counter[str] = collections.Counter()
    async for shard in client.marketing.campaign_shards.find({"state": "done"}):
        shards[str(shard.get("owner"))] += 1
    return dict(shards)


async def _demo(
    customers: int,
    campaigns: int,
    failure_rate: float,
    keep_running: bool,
    seed: int,
    metrics_port: int,
) -> int:
    console = Console(width=120)
    rng = random.Random(seed)
    async with (
        MongoEmulator() as mongo,
        SmtpSink(seed=seed) as sink,
        TwilioFake(seed=seed) as twilio,
    ):
        sink.faults.failure_rate = failure_rate
        twilio.faults.failure_rate = failure_rate
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo.uri, tz_aware=True)
        plan = await _seed(client, rng, customers, campaigns)
        base = _settings_base(mongo.uri, sink, twilio)
        port = metrics_port if metrics_port and _port_free(metrics_port) else 0
        reactors = [
            Reactor(Settings(**base, reactor_instance_id="demo-a", metrics_port=port)),
            Reactor(
                Settings(
                    **(base | {"public_port": 0}), reactor_instance_id="demo-b", metrics_port=0
                )
            ),
        ]
        exit_code = 1
        async with anyio.create_task_group() as tg:
            for reactor in reactors:
                await tg.start(reactor.run)
            for reactor in reactors:
                await reactor.ready.wait()
            _introduce(console, mongo.uri, sink, twilio, reactors[0], len(plan), customers)
            console.print(f"failure rate {failure_rate:g}")
            acted = Acted()
            tg.start_soon(_recipients_act, sink, twilio, plan, base, acted)
            docs = await _watch_progress(console, client, plan)
            consent_ok = await _show_consent(console, client, sink, twilio, acted)
            shards = await _shards_by_owner(client)
            exit_code = _summarise(console, plan, docs, sink, twilio, reactors, consent_ok, shards)
            if keep_running:
                console.print(
                    "[bold]--keep-running[/]: up until Ctrl-C. Captured: "
                    f"{len(sink.messages)} emails, {len(twilio.messages)} SMS."
                )
                with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
                    await anyio.sleep_forever()
            for reactor in reactors:
                reactor.request_shutdown()
        await client.close()
    return exit_code


async def _watch_progress(
    console: Console, client: AsyncMongoClient[dict[str, Any]], plan: list[DemoCampaign]
) -> dict[Any, dict[str, Any]]:
    coll = client.marketing.campaigns
    docs: dict[Any, dict[str, Any]] = {}
    with Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]:<10}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        tasks = {
            c.id: progress.add_task(c.name, total=c.targets * len(c.channels), status="armed")
            for c in plan
        }
        with anyio.move_on_after(60):
            while True:
                async for doc in coll.find(
                    {"_id": {"$in": [c.id for c in plan]}}, {"targetedCustomerIds": 0}
                ):
                    docs[doc["_id"]] = doc
                    perf = doc.get("performance") or {}
                    done = sum(
                        int(perf.get(k, 0))
                        for k in (
                            "emailsSent",
                            "emailsFailed",
                            "emailsSkipped",
                            "smsSent",
                            "smsFailed",
                            "smsSkipped",
                            "uncertain",
                        )
                    )
                    status = doc.get("status", "?")
                    if status == "approved":
                        status = "armed"
                    progress.update(tasks[doc["_id"]], completed=done, status=status)
                if all(d.get("status") in FINAL for d in docs.values()) and len(docs) == len(plan):
                    break
                await anyio.sleep(0.25)
    return docs


@dataclass
class Acted:
    """What the demo's recipients did mid-run, and when (time.monotonic / UTC)."""

    unsubscribed: list[tuple[str, str, float]] = field(default_factory=list)  # customer, address
    bounced: list[tuple[str, str, float]] = field(default_factory=list)
    stopped: list[tuple[str, str, dt.datetime]] = field(default_factory=list)  # customer, number


async def _recipients_act(
    sink: SmtpSink, twilio: TwilioFake, plan: list[DemoCampaign], base: dict[str, Any], out: Acted
) -> None:
    """Play recipients as soon as the first campaign's messages arrive: five press one-click
    unsubscribe (a POST to their List-Unsubscribe URL), one mailbox turns out not to exist (the
    provider's bounce webhook), and one phone replies STOP (Twilio's signed inbound webhook)."""
    first = next((c for c in plan if "email" in c.channels and "sms" in c.channels), None)
    if first is None:
        return
    subject = f"autumn sale {plan.index(first) + 1} starts now"
    sms_tag = f"sale {plan.index(first) + 1},"
    later = plan[plan.index(first) + 1 :]

    def again(customer: str, channel: str) -> bool:  # targeted again later on this channel
        return any(channel in c.channels and customer in c.audience for c in later)

    def picks() -> tuple[list[CapturedEmail], list[CapturedSms]]:
        """Recipients targeted again later first (so their skips show), then anyone."""
        emails = [m for m in sink.messages if subject in m.subject]
        texts = [m for m in twilio.messages if sms_tag in m.body]
        emails.sort(key=lambda m: not again(_customer(m.to), "email"))
        texts.sort(key=lambda m: not again(str(int(m.to[-4:])), "sms"))
        return emails, texts

    with anyio.move_on_after(30):
        while True:
            emails, texts = picks()
            if len(emails) >= 6 and texts:
                break
            await anyio.sleep(0.05)
    emails, texts = picks()
    if len(emails) < 6 or not texts:
        return
    async with aiohttp.ClientSession() as http:
        for message in emails[:5]:
            header = message.header("List-Unsubscribe") or ""
            url = header.split(",")[0].strip().strip("<>")
            async with http.post(url, data={"List-Unsubscribe": "One-Click"}) as resp:
                if resp.status == 200:
                    out.unsubscribed.append((_customer(message.to), message.to, time.monotonic()))
        bounced = emails[5]
        event = {"id": f"demo-{bounced.message_id}", "type": "hard_bounce", "email": bounced.to}
        async with http.post(
            f"{base['public_base_url']}/webhooks/generic",
            json={"events": [event]},
            headers={"Authorization": f"Bearer {base['webhook_token']}"},
        ) as resp:
            if resp.status == 200:
                out.bounced.append((_customer(bounced.to), bounced.to, time.monotonic()))
    text = texts[0]
    status = await twilio.send_inbound(
        f"{base['public_base_url']}/webhooks/twilio/inbound", text.to, "STOP"
    )
    if status == 200:
        out.stopped.append(("", text.to, dt.datetime.now(dt.UTC)))


def _customer(address: str) -> str:
    return address.split("@")[0].removeprefix("customer")


async def _show_consent(
    console: Console,
    client: AsyncMongoClient[dict[str, Any]],
    sink: SmtpSink,
    twilio: TwilioFake,
    acted: Acted,
) -> bool:
    """Recipients' actions took effect mid-run: nobody who unsubscribed, bounced or replied STOP
    got another message once the suppression had reached the replicas (a second), and their
    later sends were skipped."""
    if not (acted.unsubscribed and acted.bounced and acted.stopped):
        console.print("[red]the recipients' actions did not all go through[/]")
        return False
    cutoff = {a: t + 1 for _, a, t in acted.unsubscribed + acted.bounced}
    emails_after = [m for m in sink.messages if m.to in cutoff and m.received_at > cutoff[m.to]]
    stop_at = {n: t + dt.timedelta(seconds=1) for _, n, t in acted.stopped}
    texts_after = [m for m in twilio.messages if m.to in stop_at and m.created_at > stop_at[m.to]]
    deliveries = client.marketing.deliveries
    skipped = {
        reason: await deliveries.count_documents({"reason": f"suppressed:{reason}"})
        for reason in ("unsubscribed", "hard_bounce", "sms_stop")
    }
    receipts = await deliveries.count_documents({"deliveryStatus": "delivered"})
    console.print(
        f"🔕 mid-run: {len(acted.unsubscribed)} one-click unsubscribes, "
        f"{len(acted.bounced)} bounce (webhook), {len(acted.stopped)} STOP reply (Twilio). "
        f"Later sends skipped — unsubscribed: {skipped['unsubscribed']}, hard_bounce: "
        f"{skipped['hard_bounce']}, sms_stop: {skipped['sms_stop']}; messages to them after: "
        f"{len(emails_after) + len(texts_after)}. SMS delivery receipts: {receipts} delivered."
    )
    return not emails_after and not texts_after


def _counts(perf: dict[str, Any], prefix: str) -> str:
    return "/".join(str(perf.get(f"{prefix}{k}", 0)) for k in ("Sent", "Failed", "Skipped"))


def _campaign_table(
    plan: list[DemoCampaign], docs: dict[Any, dict[str, Any]]
) -> tuple[Table, bool]:
    """One row per campaign, and whether every one reached the state it should."""
    table = Table(title="Campaigns")
    for col in (
        "campaign",
        "scheduled start",
        "start lateness",
        "emails sent/failed/skipped",
        "SMS sent/failed/skipped",
        "status",
        "expected",
    ):
        table.add_column(col)
    ok = True
    for c in plan:
        doc = docs.get(c.id, {})
        perf = doc.get("performance") or {}
        lateness = (doc.get("execution") or {}).get("startLatenessMs")
        status = doc.get("status", "?")
        good = status == c.expected
        ok &= good
        table.add_row(
            c.name,
            c.start_at.strftime("%H:%M:%S.%f")[:-3] + "Z",
            f"{lateness:.1f} ms" if isinstance(lateness, int | float) else "—",
            _counts(perf, "emails") if "email" in c.channels else "—",
            _counts(perf, "sms") if "sms" in c.channels else "—",
            f"[{'green' if good else 'red'}]{status}[/]",
            c.expected,
        )
    return table, ok


def _duplicates(sink: SmtpSink, twilio: TwilioFake) -> int:
    """Messages received twice at the sinks: the same email (to, subject) or SMS (to, body)."""
    emails = collections.Counter((m.to, m.subject) for m in sink.messages)
    texts = collections.Counter((m.to, m.body) for m in twilio.messages)
    return sum(1 for n in emails.values() if n > 1) + sum(1 for n in texts.values() if n > 1)


def _summarise(
    console: Console,
    plan: list[DemoCampaign],
    docs: dict[Any, dict[str, Any]],
    sink: SmtpSink,
    twilio: TwilioFake,
    reactors: list[Reactor],
    consent_ok: bool = True,
    shards: dict[str, int] | None = None,
) -> int:
    table, ok = _campaign_table(plan, docs)
    console.print(table)
    duplicates = _duplicates(sink, twilio)
    starts = {
        r.instance_id: int(
            r.metrics.registry.get_sample_value(
                "reactor_campaign_transitions_total", {"to": "running"}
            )
            or 0
        )
        for r in reactors
    }
    console.print(
        f"messages captured: {len(sink.messages)} emails, {len(twilio.messages)} SMS; "
        f"duplicates: {duplicates}; starts claimed per "
        f"instance: {starts}; shards of 100 sent per instance: {shards or {}}"
    )
    ok &= duplicates == 0
    ok &= sum(starts.values()) == len(plan) - 1
    ok &= consent_ok
    console.print("[green]demo passed[/]" if ok else "[red]demo failed[/]")
    return 0 if ok else 1
