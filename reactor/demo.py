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
from dataclasses import dataclass
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
from .embedded.smtp_sink import SmtpSink
from .embedded.twilio_fake import TwilioFake

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


async def _seed(
    client: AsyncMongoClient[dict[str, Any]], rng: random.Random, customers: int, campaigns: int
) -> list[DemoCampaign]:
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
        rows.append(
            {
                "customer_id": cid,
                "email": email,
                "phone": phone,
                "name": name,
                "total": rng.randint(5, 500),
            }
        )
        if i % 3 == 0:  # repeat buyers have several order rows
            rows.append(
                {
                    "customer_id": cid,
                    "email": "",
                    "phone": None,
                    "name": name,
                    "total": rng.randint(5, 500),
                }
            )
    await client.retail_db.newdatabase.insert_many(rows)

    now = dt.datetime.now(dt.UTC)
    docs: list[dict[str, Any]] = []
    plan: list[DemoCampaign] = []
    channel_sets = [["email", "sms"], ["email"], ["sms"], ["email", "sms"]]
    for i in range(campaigns):
        start = now + dt.timedelta(seconds=4 + 1.5 * i)
        end = start + dt.timedelta(seconds=8)
        audience = rng.sample(range(customers), k=max(1, int(customers * rng.uniform(0.5, 0.9))))
        targets: list[Any] = [str(c) for c in audience]
        targets += [f"ghost-{j}" for j in range(3)]  # ids with no order rows
        channels = channel_sets[i % len(channel_sets)]
        docs.append(
            {
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
        )
        plan.append(
            DemoCampaign(
                None, f"Campaign {i + 1}", start, end, channels, len(set(targets)), "completed"
            )
        )
    late_start = now - dt.timedelta(hours=2)
    docs.append(
        {
            "name": "Approved too late",
            "status": "approved",
            "startDate": late_start,
            "endDate": now + dt.timedelta(hours=1),
            "channels": ["email"],
            "email": {"subject": "Yesterday's news", "text": "This must not be sent late."},
            "targetedCustomerIds": [str(c) for c in range(min(customers, 20))],
        }
    )
    plan.append(
        DemoCampaign(
            None,
            "Approved too late",
            late_start,
            now + dt.timedelta(hours=1),
            ["email"],
            min(customers, 20),
            "missed",
        )
    )
    result = await client.marketing.campaigns.insert_many(docs)
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
        port = metrics_port if metrics_port and _port_free(metrics_port) else 0
        base: dict[str, Any] = {
            "mongo_uri": mongo.uri,
            "metrics_host": "127.0.0.1",
            "reconcile_interval_seconds": 5,
            "lease_seconds": 5,
            "email_rate_per_second": 400,
            "sms_rate_per_second": 200,
            "send_concurrency": 16,
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
            public_base_url=f"http://127.0.0.1:{public_port}",
            link_secret=secrets.token_hex(32),
            postal_address="Demo Retail, 1 Main St, Springfield",
        )
        reactors = [
            Reactor(
                Settings(
                    **base, reactor_instance_id="demo-a", metrics_port=port, public_port=public_port
                )
            ),
            Reactor(Settings(**base, reactor_instance_id="demo-b", metrics_port=0, public_port=0)),
        ]
        exit_code = 1
        async with anyio.create_task_group() as tg:
            for reactor in reactors:
                await tg.start(reactor.run)
            for reactor in reactors:
                await reactor.ready.wait()
            http = reactors[0].http
            console.print(
                f"[bold]Campaign Reactor demo[/]: MongoDB emulator at {mongo.uri}, "
                f"SMTP sink on :{sink.port}, Twilio fake on :{twilio.port}"
            )
            if http is not None:
                console.print(
                    f"metrics: http://127.0.0.1:{http.port}/metrics   "
                    f"health: http://127.0.0.1:{http.port}/readyz"
                )
            console.print(
                f"{customers} customers, {len(plan)} campaigns (one approved too late), "
                f"two reactor instances, failure rate {failure_rate:g}"
            )
            unsubscribed: list[Unsubscribed] = []
            tg.start_soon(_unsubscribe_some, sink, plan, unsubscribed)
            docs = await _watch_progress(console, client, plan)
            consent_ok = await _show_unsubscribes(console, client, sink, unsubscribed)
            exit_code = _summarise(console, plan, docs, sink, twilio, reactors, consent_ok)
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
class Unsubscribed:
    customer: str
    address: str
    at_m: float  # time.monotonic() when the one-click POST was answered


async def _unsubscribe_some(
    sink: SmtpSink, plan: list[DemoCampaign], out: list[Unsubscribed], n: int = 5
) -> None:
    """Play five recipients: as soon as the first campaign's emails arrive, each presses the
    one-click unsubscribe their mail client shows (a POST to the List-Unsubscribe URL)."""
    first = next((c for c in plan if "email" in c.channels), None)
    if first is None:
        return
    subject = f"autumn sale {plan.index(first) + 1} starts now"
    with anyio.move_on_after(30):
        while len([m for m in sink.messages if subject in m.subject]) < 3 * n:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    picked = [m for m in sink.messages if subject in m.subject][:n]
    async with aiohttp.ClientSession() as http:
        for message in picked:
            header = message.header("List-Unsubscribe") or ""
            url = header.split(",")[0].strip().strip("<>")
            async with http.post(url, data={"List-Unsubscribe": "One-Click"}) as resp:
                if resp.status == 200:
                    customer = message.to.split("@")[0].removeprefix("customer")
                    out.append(Unsubscribed(customer, message.to, time.monotonic()))


async def _show_unsubscribes(
    console: Console,
    client: AsyncMongoClient[dict[str, Any]],
    sink: SmtpSink,
    unsubscribed: list[Unsubscribed],
) -> bool:
    """Unsubscribes took effect mid-run: nobody who unsubscribed got another email once the
    suppression had reached the replicas (a second), and their later sends were skipped."""
    if not unsubscribed:
        console.print("[red]no unsubscribe went through[/]")
        return False
    by_address = {u.address: u for u in unsubscribed}
    after = [
        m for m in sink.messages if m.to in by_address and m.received_at > by_address[m.to].at_m + 1
    ]
    skipped = await client.marketing.deliveries.count_documents(
        {
            "reason": "suppressed:unsubscribed",
            "customer": {"$in": list({u.customer for u in unsubscribed})},
        }
    )
    console.print(
        f"🔕 {len(unsubscribed)} recipients pressed one-click unsubscribe mid-run; later sends "
        f"to them skipped (suppressed:unsubscribed): {skipped}; emails to them after: {len(after)}"
    )
    return not after


def _summarise(
    console: Console,
    plan: list[DemoCampaign],
    docs: dict[Any, dict[str, Any]],
    sink: SmtpSink,
    twilio: TwilioFake,
    reactors: list[Reactor],
    consent_ok: bool = True,
) -> int:
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
        exe = doc.get("execution") or {}
        lateness = exe.get("startLatenessMs")
        status = doc.get("status", "?")
        good = status == c.expected
        ok &= good
        table.add_row(
            c.name,
            c.start_at.strftime("%H:%M:%S.%f")[:-3] + "Z",
            f"{lateness:.1f} ms" if isinstance(lateness, int | float) else "—",
            "/".join(str(perf.get(k, 0)) for k in ("emailsSent", "emailsFailed", "emailsSkipped"))
            if "email" in c.channels
            else "—",
            "/".join(str(perf.get(k, 0)) for k in ("smsSent", "smsFailed", "smsSkipped"))
            if "sms" in c.channels
            else "—",
            f"[{'green' if good else 'red'}]{status}[/]",
            c.expected,
        )
    console.print(table)
    email_dupes = [
        a for a, n in collections.Counter((m.to, m.subject) for m in sink.messages).items() if n > 1
    ]
    sms_dupes = [
        a for a, n in collections.Counter((m.to, m.body) for m in twilio.messages).items() if n > 1
    ]
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
        f"duplicates: {len(email_dupes) + len(sms_dupes)}; starts claimed per "
        f"instance: {starts}"
    )
    ok &= not email_dupes and not sms_dupes
    ok &= sum(starts.values()) == len(plan) - 1
    ok &= consent_ok
    console.print("[green]demo passed[/]" if ok else "[red]demo failed[/]")
    return 0 if ok else 1
