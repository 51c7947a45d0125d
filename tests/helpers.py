"""Helpers to run real reactor instances against the test's MongoDB and fakes."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pymongo import AsyncMongoClient

from reactor.app import Reactor
from reactor.config import Settings, SmtpConfig
from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.twilio_fake import TwilioFake

from .conftest import MongoTarget

Client = AsyncMongoClient[dict[str, Any]]


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sink_smtp(sink: SmtpSink, *, sender: str, pool_size: int = 3) -> SmtpConfig:
    """An SMTP sender's configuration for the sink: plain text, no credentials."""
    return SmtpConfig(
        host=sink.host,
        port=sink.port,
        username=None,
        password=None,
        tls="none",
        pool_size=pool_size,
        timeout_s=10,
        sender=sender,
    )


def settings(
    mongo: MongoTarget,
    sink: SmtpSink | None = None,
    twilio: TwilioFake | None = None,
    **overrides: Any,
) -> Settings:
    values: dict[str, Any] = {
        "mongo_uri": mongo.uri,
        "campaigns_db": mongo.campaigns_db,
        "segmentation_db": mongo.segmentation_db,
        "metrics_port": 0,
        "metrics_host": "127.0.0.1",
        "reconcile_interval_seconds": 1.0,
        "lease_seconds": 2.0,
        "shutdown_grace_seconds": 5.0,
        "email_rate_per_second": 2000,
        "sms_rate_per_second": 2000,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.5,
        "tempfail_retry_seconds": "0.2,0.4",
        "sms_resolve_after_seconds": 0.3,
        "send_concurrency": 8,
        # Tests run at any hour: quiet hours are tested on their own (test_sms_rules.py).
        "sms_send_hours": "00:00-24:00",
        "reactor_instance_id": "test-a",
    }
    if sink is not None:
        values.update({k.lower(): v for k, v in sink.settings_env().items()})
    if twilio is not None:
        values.update({k.lower(): v for k, v in twilio.settings_env().items()})
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running(*configs: Settings, **kwargs: Any) -> AsyncIterator[list[Reactor]]:
    """Run reactor instances for the body's duration; on exit, shut each down gracefully."""
    async with running_reactors([Reactor(cfg, **kwargs) for cfg in configs]) as reactors:
        yield reactors


@contextlib.asynccontextmanager
async def running_reactors(reactors: list[Reactor]) -> AsyncIterator[list[Reactor]]:
    """`running()` for reactors the test built itself (with a clock or sender of its own)."""
    async with anyio.create_task_group() as tg:
        for reactor in reactors:
            await tg.start(reactor.run)
        with anyio.fail_after(15):
            for reactor in reactors:
                await reactor.ready.wait()
        try:
            yield reactors
        finally:
            for reactor in reactors:
                reactor.request_shutdown()


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, interval_s: float = 0.05
) -> None:
    """Poll until `check()` is true or fail after `timeout_s` (observing, not timing)."""
    with anyio.fail_after(timeout_s):
        while not await check():
            await anyio.sleep(interval_s)


async def holds(value: bool) -> bool:
    """`eventually(lambda: holds(cond))` for a condition that needs no I/O."""
    return value


async def seed_customers(
    client: Client, mongo: MongoTarget, n: int, *, numeric_ids: bool = True, bad_every: int = 0
) -> list[str]:
    rows = []
    for i in range(n):
        cid: Any = i if numeric_ids else str(i)
        email = f"c{i}@example.com"
        phone = f"+1415555{i % 10000:04d}"
        if bad_every and i % bad_every == 0:
            email, phone = "not-an-email", "12"
        rows.append({"customer_id": cid, "email": email, "phone": phone, "name": f"Cust {i}"})
        # A second order row for the same customer, with blanks: still one recipient.
        rows.append({"customer_id": cid, "email": "", "phone": None, "name": ""})
    await client[mongo.segmentation_db]["newdatabase"].insert_many(rows)
    return [str(i) for i in range(n)]


def campaign(
    name: str, start_in_s: float, end_in_s: float, targets: list[Any], **overrides: Any
) -> dict[str, Any]:
    t = now()
    doc: dict[str, Any] = {
        "name": name,
        "status": "approved",
        "startDate": t + dt.timedelta(seconds=start_in_s),
        "endDate": t + dt.timedelta(seconds=end_in_s),
        "email": {"subject": "Hi {{name}}", "text": "Hello {{name}}", "html": "<b>{{name}}</b>"},
        "sms": {"body": "Sale for {{name}}"},
        "targetedCustomerIds": targets,
    }
    doc.update(overrides)
    return doc


async def status_of(client: Client, mongo: MongoTarget, campaign_id: Any) -> str | None:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
    return None if doc is None else doc.get("status")


def has_status(
    client: Client, mongo: MongoTarget, campaign_id: Any, *statuses: str
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await status_of(client, mongo, campaign_id) in statuses

    return check


async def ledger(client: Client, mongo: MongoTarget, campaign_id: Any) -> list[dict[str, Any]]:
    return (
        await client[mongo.campaigns_db].deliveries.find({"campaign": str(campaign_id)}).to_list()
    )
