"""Notifications, component by component, against the test's MongoDB and a loopback receiver:
the outbox's one-event-per-change, signed delivery verified with the Standard Webhooks library,
back-off on a fake clock, takeover of a killed deliverer's lease, order per lane, `dead`, 410,
the URL policy (with an injected resolver, never real DNS) and the payload schema."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient
from standardwebhooks.webhooks import Webhook

from reactor.metrics import Metrics
from reactor.notify import events as ev
from reactor.notify.config import NotifyConfig
from reactor.notify.destinations import (
    RefusedAddress,
    address_problem,
    parse_destination,
    url_problem,
    vet_host,
)
from reactor.notify.notifier import Notifier
from reactor.notify.outbox import DEAD, DELIVERED, PENDING

from .conftest import MongoTarget
from .fakes import FakeClock
from .helpers import eventually, holds
from .notify_receiver import Receiver, receiver

Client = AsyncMongoClient[dict[str, Any]]
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def fake_resolver(table: Mapping[str, list[str]]) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"no such host {host}")
        return list(table[host])

    return resolve


_made: list[Notifier] = []


def notifier(
    client: Client, mongo: MongoTarget, clock: FakeClock, name: str = "a", **config: Any
) -> Notifier:
    # The receiver runs on 127.0.0.1: loopback is allowed here, private addresses are not.
    cfg = NotifyConfig(**{"retry_base_s": 2.0, "lease_s": 60.0, "allow_loopback": True, **config})
    made = Notifier(
        client[mongo.campaigns_db],
        campaigns_collection="campaigns",
        clock=clock,
        metrics=Metrics(),
        config=cfg,
        instance_id=name,
        resolve=fake_resolver({"hooks.example.test": ["10.1.2.3"], "ok.test": ["127.0.0.1"]}),
    )
    _made.append(made)
    return made


@pytest.fixture(autouse=True)
async def _close_notifiers() -> AsyncIterator[None]:
    yield
    while _made:
        await _made.pop().aclose()


@pytest.fixture
async def rec() -> AsyncIterator[Receiver]:
    async with receiver() as r:
        yield r


async def add_webhook(client: Client, mongo: MongoTarget, url: str, **extra: Any) -> str:
    doc = {"_id": "hook1", "kind": "webhook", "url": url, "secret": SECRET, **extra}
    await client[mongo.campaigns_db].notification_destinations.insert_one(doc)
    return "hook1"


async def rounds(clock: FakeClock, *notifiers: Notifier, n: int = 1, step_s: float = 0) -> None:
    """Let each notifier's courier claim and deliver what is due, `n` times."""
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            for each in notifiers:
                await each.courier.round(tg)
            await wait_deliveries(notifiers)
            if step_s:
                await clock.advance(step_s)


async def wait_deliveries(notifiers: tuple[Notifier, ...]) -> None:
    await eventually(
        lambda: holds(not any(n.courier._inflight for n in notifiers)), interval_s=0.005
    )


def started_data(cid: str) -> dict[str, Any]:
    data = ev.base_data(cid, "Spring sale")
    data.update(
        startDate="2026-01-01T00:00:00.000Z",
        startedAt="2026-01-01T00:00:00.120Z",
        latenessMs=120,
        audienceSize=3,
        owner="a",
        epoch=1,
    )
    return data


# ---- the outbox --------------------------------------------------------------------------------


async def test_three_replicas_racing_write_one_event(client: Client, mongo: MongoTarget) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, "http://127.0.0.1:9/hook")
    replicas = [notifier(client, mongo, clock, name) for name in "abc"]
    for r in replicas:
        await r.outbox.ensure_indexes()
        await r.destinations.reload()
    won = await asyncio.gather(
        *(r.emit(ev.CAMPAIGN_STARTED, "c1", 1, started_data("c1")) for r in replicas)
    )
    assert sorted(won) == [False, False, True]
    db = client[mongo.campaigns_db]
    assert await db.notification_outbox.count_documents({}) == 1
    rows = await db.notification_queue.find({}).to_list()
    assert [(r["dest"], r["state"]) for r in rows] == [("hook1", PENDING)]
    # Another epoch is another state change: another event.
    assert await replicas[1].emit(ev.CAMPAIGN_STARTED, "c1", 2, started_data("c1"))


async def test_an_unfanned_event_is_fanned_out_by_any_replica(
    client: Client, mongo: MongoTarget
) -> None:
    """A replica that died between writing the event and its delivery rows loses nothing."""
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, "http://127.0.0.1:9/hook")
    n = notifier(client, mongo, clock)
    await n.outbox.ensure_indexes()
    await n.destinations.reload()
    event = ev.Event("campaign.missed:c9:1", ev.CAMPAIGN_MISSED, "c9", clock.now(), {})
    await n.outbox.insert(event, [])  # as if it died before fanning out
    db = client[mongo.campaigns_db]
    await db.notification_outbox.update_one({"_id": event.key}, {"$set": {"fanned": False}})
    await clock.advance(6)
    await n._reload()
    assert [r["dest"] async for r in db.notification_queue.find({"event": event.key})] == ["hook1"]


# ---- delivery ----------------------------------------------------------------------------------


async def test_webhook_is_signed_as_standard_webhooks_says(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, rec.url)
    n = notifier(client, mongo, clock)
    await n.outbox.ensure_indexes()
    await n.destinations.reload()
    await n.emit(ev.CAMPAIGN_STARTED, "c1", 1, started_data("c1"))
    await rounds(clock, n)
    assert len(rec.received) == 1
    got = rec.received[0]
    payload = Webhook(SECRET).verify(got.body, got.headers)  # raises if the signature is wrong
    assert payload["type"] == "campaign.started"
    assert payload["data"]["audienceSize"] == 3
    assert got.id == ev.webhook_id("campaign.started:c1:1")
    other = Webhook("whsec_" + base64.b64encode(b"x" * 24).decode())
    with pytest.raises(Exception, match="signature"):
        other.verify(got.body, got.headers)
    row = await client[mongo.campaigns_db].notification_queue.find_one({})
    assert row is not None
    assert row["state"] == DELIVERED
    assert (
        n._metrics.registry.get_sample_value(
            "reactor_notifications_total",
            {"destination_kind": "webhook", "event": "campaign.started", "outcome": "delivered"},
        )
        == 1
    )


async def test_down_receiver_gets_everything_in_order_once_after_failover(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    """Three replicas deliver; the receiver fails for a while (back-off on the fake clock),
    then the replica delivering is killed mid-request: another delivers the same webhook-id.
    Counted at the receiver: every event exactly once after dropping repeats, none missing,
    in the order they were emitted."""
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, rec.url)
    replicas = [notifier(client, mongo, clock, name) for name in "abc"]
    for r in replicas:
        await r.outbox.ensure_indexes()
        await r.destinations.reload()
    kinds = [ev.CAMPAIGN_STARTED, ev.CAMPAIGN_PAUSED, ev.CAMPAIGN_RESUMED, ev.CAMPAIGN_COMPLETED]
    keys = []
    for i, kind in enumerate(kinds):
        await clock.advance(0.01)
        writer = replicas[i % 3]
        assert await writer.emit(kind, "c1", f"k{i}", ev.base_data("c1", "Sale"))
        keys.append(ev.webhook_id(f"{kind}:c1:k{i}"))
    rec.fail_next = 4
    # Failing for a while: back-off 2, 4, 8, 16 s; nothing jumps ahead of the first event.
    # One lane: each courier round delivers at most its head, so stop after two arrived.
    turn = 0
    while len(rec.unique()) < 2 or rec.fail_next:
        assert turn < 60
        await rounds(clock, replicas[turn % 3])
        if rec.received and rec.received[-1].payload["type"] != ev.CAMPAIGN_STARTED:
            assert rec.fail_next == 0
        turn += 1
        if turn % 3 == 0:
            await clock.advance(4)
    assert rec.fail_next == 0
    assert len([r for r in rec.received if r.id == keys[0]]) == 5  # 4 failures, then delivered
    assert rec.types()[:2] == [ev.CAMPAIGN_STARTED, ev.CAMPAIGN_PAUSED]
    # Kill the replica delivering the next one while its request is held open.
    rec.hold = asyncio.Event()
    async with anyio.create_task_group() as tg:
        victim = None
        for r in replicas:
            if await r.courier.round(tg):
                victim = r
                break
        assert victim is not None
        await eventually(lambda: holds(rec.holding > 0), interval_s=0.005)
        tg.cancel_scope.cancel()  # killed: its lease stays behind
    rec.hold.set()
    # The killed request itself still lands.
    await eventually(lambda: holds(len(rec.received) >= 7), interval_s=0.005)
    rec.hold = None
    survivors = tuple(r for r in replicas if r is not victim)
    await rounds(clock, *survivors, n=2)
    # The killed attempt landed; the lease still holds: nobody else may deliver yet.
    assert [r.payload["type"] for r in rec.received[5:]] == [
        ev.CAMPAIGN_PAUSED,
        ev.CAMPAIGN_RESUMED,
    ]
    await clock.advance(61)
    await rounds(clock, *survivors, n=6, step_s=1)
    assert [r.id for r in rec.unique()] == keys
    assert rec.types() == kinds
    ids = [r.id for r in rec.received]
    assert ids.count(keys[2]) == 2  # the killed attempt arrived, and the retry with its id
    db = client[mongo.campaigns_db]
    assert await db.notification_queue.count_documents({"state": DELIVERED}) == 4


async def test_dead_after_the_retry_period(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, rec.url)
    n = notifier(client, mongo, clock, retry_for_s=120.0, retry_max_s=30.0)
    await n.outbox.ensure_indexes()
    await n.destinations.reload()
    await n.emit(ev.CAMPAIGN_MISSED, "c1", 1, ev.base_data("c1", "Sale"))
    rec.status = 500
    await rounds(clock, n, n=20, step_s=30)
    row = await client[mongo.campaigns_db].notification_queue.find_one({})
    assert row is not None
    assert row["state"] == DEAD
    assert "HTTP 500" in row["lastError"]
    attempts = len(rec.received)
    assert 4 <= attempts <= 7  # 2+4+8+16+30+30... within 120 s
    await n._stats()
    assert n._metrics.notification_dead._value.get() == 1
    await rounds(clock, n, n=3, step_s=30)
    assert len(rec.received) == attempts  # dead rows are not tried again


async def test_410_disables_the_destination_and_says_so(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, rec.url)
    n = notifier(client, mongo, clock)
    await n.outbox.ensure_indexes()
    await n.destinations.reload()
    rec.status = 410
    await n.emit(ev.CAMPAIGN_MISSED, "c1", 1, ev.base_data("c1", "Sale"))
    await rounds(clock, n)
    await n.emit(ev.CAMPAIGN_MISSED, "c2", 1, ev.base_data("c2", "Sale"))
    await rounds(clock, n, n=3, step_s=10)
    assert len(rec.received) == 1  # nothing after the 410
    doc = await client[mongo.campaigns_db].notification_destinations.find_one({"_id": "hook1"})
    assert doc is not None
    assert doc["disabled"] is True
    assert "410" in doc["disabledReason"]
    await n.destinations.reload()
    assert n.destinations.current["hook1"].disabled


async def test_slack_and_json_destinations(client: Client, mongo: MongoTarget) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    async with receiver("/slack") as slack, receiver("/json") as plain:
        db = client[mongo.campaigns_db]
        await db.notification_destinations.insert_many(
            [
                {"_id": "s", "kind": "slack", "url": slack.url},
                {"_id": "j", "kind": "json", "url": plain.url, "events": ["campaign.completed"]},
            ]
        )
        n = notifier(client, mongo, clock)
        await n.outbox.ensure_indexes()
        await n.destinations.reload()
        data = ev.base_data("c1", "Spring sale")
        data.update(
            startedAt=None,
            finishedAt="2026-01-01T01:00:00.000Z",
            durationSeconds=3600.0,
            outcomes={"email": {"sent": 990, "failed": 10, "skipped": 0}, "sms": {}},
        )
        await n.emit(ev.CAMPAIGN_COMPLETED, "c1", 1, data)
        await n.emit(ev.CAMPAIGN_MISSED, "c2", 1, ev.base_data("c2", "<!channel> & co"))
        await rounds(clock, n, n=2)
        texts = [r.payload["text"] for r in slack.received]
        assert len(texts) == 2
        # Two campaigns, two lanes: their arrival order is not defined.
        completed = next(t for t in texts if "Spring sale" in t)
        assert "990 sent" in completed
        assert "10 failed" in completed
        assert any("&lt;!channel&gt; &amp; co" in t for t in texts)
        assert [r.payload["type"] for r in plain.received] == ["campaign.completed"]
        assert plain.received[0].id == ev.webhook_id("campaign.completed:c1:1")


async def test_admin_email_goes_through_smtp_not_the_ledger(
    client: Client, mongo: MongoTarget, sink: Any
) -> None:
    from reactor.notify.config import NotifySmtp

    clock = FakeClock(dt.datetime.now(dt.UTC))
    db = client[mongo.campaigns_db]
    await db.notification_destinations.insert_one(
        {"_id": "mail", "kind": "email", "to": ["ops@example.com", "lead@example.com"]}
    )
    smtp = NotifySmtp(host=sink.host, port=sink.port, sender="reactor@example.com", tls="none")
    n = notifier(client, mongo, clock, smtp=smtp)
    await n.outbox.ensure_indexes()
    await n.destinations.reload()
    await n.emit(ev.CAMPAIGN_FAILED, "c1", 1, {**ev.base_data("c1", "Sale"), "error": "x"})
    await rounds(clock, n)
    assert sorted(sink.recipients()) == ["lead@example.com", "ops@example.com"]
    assert "Sale" in sink.messages[0].subject
    assert await db.deliveries.count_documents({}) == 0


# ---- the URL policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.example.com/x", None),
        ("http://127.0.0.1:8080/hook", None),
        ("http://localhost/hook", None),
        ("http://[::1]:9/hook", None),
        ("http://hooks.example.com/x", "must be https"),
        ("ftp://hooks.example.com/x", "must be https"),
        ("https:///nohost", "no host"),
        ("https://h:99999/", "malformed"),
    ],
)
def test_url_form(url: str, problem: str | None) -> None:
    found = url_problem(url)
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("10.0.0.7", "private"),
        ("172.16.3.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.10.10", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:10.0.0.1", "private"),
        ("0.0.0.0", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("93.184.216.34", None),
    ],
)
def test_address_policy(address: str, refused: str | None) -> None:
    found = address_problem(address, allow_private=False)
    assert (found is None) if refused is None else (found is not None and refused in found)
    assert address_problem(address, allow_private=True) is None


async def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    resolve = fake_resolver({"internal.example.com": ["93.184.216.34", "10.9.8.7"]})
    with pytest.raises(RefusedAddress, match=r"10\.9\.8\.7 is a private"):
        await vet_host("internal.example.com", 443, resolve, allow_private=False)
    assert await vet_host("internal.example.com", 443, resolve, allow_private=True)
    with pytest.raises(RefusedAddress, match="metadata"):
        await vet_host("169.254.169.254", 80, resolve, allow_private=False)


async def test_refusal_is_written_on_the_destination(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, "https://hooks.example.test/x")  # resolves to 10.1.2.3
    n = notifier(client, mongo, clock)
    await n.outbox.ensure_indexes()
    await n.destinations.reload()
    await n.emit(ev.CAMPAIGN_MISSED, "c1", 1, ev.base_data("c1", "Sale"))
    await rounds(clock, n)
    doc = await client[mongo.campaigns_db].notification_destinations.find_one({"_id": "hook1"})
    assert doc is not None
    assert "10.1.2.3 is a private" in doc["error"]["detail"]
    row = await client[mongo.campaigns_db].notification_queue.find_one({})
    assert row is not None
    assert row["state"] == PENDING
    assert (
        n._metrics.registry.get_sample_value(
            "reactor_notifications_total",
            {"destination_kind": "webhook", "event": "campaign.missed", "outcome": "refused"},
        )
        == 1
    )


async def test_malformed_destinations_are_reported_on_themselves(
    client: Client, mongo: MongoTarget
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    db = client[mongo.campaigns_db]
    await db.notification_destinations.insert_many(
        [
            {"_id": "nokind", "url": "https://x.example.com"},
            {"_id": "nosecret", "kind": "webhook", "url": "https://x.example.com"},
            {"_id": "badsecret", "kind": "webhook", "url": "https://x.example.com", "secret": "s"},
            {"_id": "plain", "kind": "json", "url": "http://x.example.com/"},
            {"_id": "badevents", "kind": "json", "url": "https://x.example.com", "events": ["x"]},
            {"_id": "noto", "kind": "email"},
            {"_id": "good", "kind": "json", "url": "https://x.example.com"},
        ]
    )
    n = notifier(client, mongo, clock)
    found = await n.destinations.reload()
    assert list(found) == ["good"]
    errors = {
        d["_id"]: d.get("error", {}).get("detail", "")
        async for d in db.notification_destinations.find({})
    }
    assert "kind must be" in errors["nokind"]
    assert "needs a secret" in errors["nosecret"]
    assert "whsec_" in errors["badsecret"]
    assert "https" in errors["plain"]
    assert "unknown event types: x" in errors["badevents"]
    assert "to" in errors["noto"]
    assert errors["good"] == ""


def test_a_destinations_repr_and_where_hide_secrets() -> None:
    dest = parse_destination(
        {
            "_id": "d",
            "kind": "webhook",
            "url": "https://h.example.com/T0/B0/sekrit",
            "secret": SECRET,
        }
    )
    assert SECRET not in repr(dest)
    assert "sekrit" not in dest.where
    assert dest.where == "https://h.example.com"


# ---- cluster-wide flips and scans ------------------------------------------------------------


async def test_a_channel_pause_is_one_event_across_replicas(
    client: Client, mongo: MongoTarget
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, "http://127.0.0.1:9/hook")
    replicas = [notifier(client, mongo, clock, name) for name in "abc"]
    for r in replicas:
        await r.outbox.ensure_indexes()
        await r.destinations.reload()
    await asyncio.gather(
        *(r._channel("", "email", True, "auth", "535 bad creds") for r in replicas)
    )
    await asyncio.gather(
        *(r._channel("", "email", True, "auth", "535 bad creds") for r in replicas)
    )
    await asyncio.gather(*(r._channel("", "email", False, "", "") for r in replicas))
    await replicas[0]._channel("", "email", True, "tls", "untrusted certificate for bob@x.com")
    db = client[mongo.campaigns_db]
    types = [e["type"] async for e in db.notification_outbox.find({}).sort("at", 1)]
    assert sorted(types) == ["channel.paused", "channel.paused", "channel.resumed"]
    last = await db.notification_outbox.find_one({"_id": "channel.paused::email:3"})
    assert last is not None
    assert "bob@x.com" not in json.dumps(last["payload"])


async def test_a_late_start_is_reported_by_the_second_scan(
    client: Client, mongo: MongoTarget
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    db = client[mongo.campaigns_db]
    now = dt.datetime.now(dt.UTC)
    await db.campaigns.insert_many(
        [
            {
                "_id": "late",
                "name": "Late",
                "status": "approved",
                "startDate": now - dt.timedelta(seconds=45),
                "endDate": now + dt.timedelta(hours=1),
            },
            {
                "_id": "due",
                "name": "Due",
                "status": "approved",
                "startDate": now - dt.timedelta(seconds=5),
                "endDate": now + dt.timedelta(hours=1),
            },
            {
                "_id": "run",
                "name": "Run",
                "status": "running",
                "startDate": now - dt.timedelta(seconds=90),
                "endDate": now + dt.timedelta(hours=1),
            },
        ]
    )
    n = notifier(client, mongo, clock)
    await n.outbox.ensure_indexes()
    await n.scan()
    assert await db.notification_outbox.count_documents({}) == 0  # one sighting is not enough
    await n.scan()
    events = await db.notification_outbox.find({}).to_list()
    assert [e["type"] for e in events] == ["campaign.start_late"]
    data = events[0]["payload"]["data"]
    assert data["campaign"]["id"] == "late"
    assert data["lateBySeconds"] >= 45
    await n.scan()
    assert await db.notification_outbox.count_documents({}) == 1


async def test_a_failure_spike_is_reported_once(client: Client, mongo: MongoTarget) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    n = notifier(client, mongo, clock, failure_spike_min=10, failure_spike_share=0.2)
    await n.outbox.ensure_indexes()
    await n._check_spike()
    n._metrics.sends.labels("email", "sent").inc(30)
    n._metrics.sends.labels("email", "failed").inc(3)
    await clock.advance(10)
    await n._check_spike()
    db = client[mongo.campaigns_db]
    assert await db.notification_outbox.count_documents({}) == 0  # 9%: under the threshold
    n._metrics.sends.labels("email", "failed").inc(20)
    await clock.advance(10)
    await n._check_spike()
    await clock.advance(10)
    await n._check_spike()
    events = await db.notification_outbox.find({}).to_list()
    assert [e["type"] for e in events] == ["delivery.failure_spike"]
    assert events[0]["payload"]["data"]["failed"] == 23


# ---- the payloads ------------------------------------------------------------------------------


def test_schema_file_is_the_published_schema() -> None:
    path = Path(ev.__file__).with_name("schema.json")
    assert json.loads(path.read_text()) == ev.schema()


def _conforms(instance: Any, schema: Mapping[str, Any]) -> list[str]:
    """The few JSON Schema keywords the notification schema uses, checked."""
    errors: list[str] = []
    types: dict[str, type | tuple[type, ...]] = {
        "object": dict,
        "string": str,
        "integer": int,
        "number": (int, float),
        "null": type(None),
        "array": list,
    }
    wanted = schema.get("type")
    if wanted is not None:
        names = wanted if isinstance(wanted, list) else [wanted]
        if not any(
            isinstance(instance, types[t])
            and not (t in ("integer", "number") and isinstance(instance, bool))
            for t in names
        ):
            errors.append(f"{instance!r} is not {wanted}")
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{instance!r} != {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{instance!r} not in {schema['enum']}")
    if isinstance(instance, dict):
        errors += [f"missing {k}" for k in schema.get("required", []) if k not in instance]
        for k, sub in schema.get("properties", {}).items():
            if k in instance:
                errors += _conforms(instance[k], sub)
    for sub in schema.get("allOf", []):
        if not _conforms(instance, sub.get("if", {})):
            errors += _conforms(instance, sub.get("then", {}))
    return errors


async def test_payloads_the_notifier_builds_conform_to_the_schema(
    client: Client, mongo: MongoTarget
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    db = client[mongo.campaigns_db]
    now = dt.datetime.now(dt.UTC)
    await db.campaigns.insert_one(
        {
            "_id": "c1",
            "name": "Sale",
            "status": "completed",
            "startDate": now,
            "endDate": now,
            "targetedCustomerIds": ["1", "2"],
            "execution": {"epoch": 1, "startedAt": now, "finishedAt": now, "sendsDone": True},
            "performance": {"emailsSent": 2},
        }
    )
    await db.deliveries.insert_one(
        {"_id": "x", "campaign": "c1", "state": "skipped", "reason": "window_closed"}
    )
    n = notifier(client, mongo, clock)
    await n.outbox.ensure_indexes()
    claimed = {
        "_id": "c1",
        "name": "Sale",
        "startDate": now,
        "execution": {"epoch": 1, "startedAt": now, "startLatenessMs": 12, "owner": "a"},
    }
    await n.started(claimed)
    await n.completed("c1")
    await n.missed("c1", "start passed for x@y.com")
    await n.failed("c1", "Sale", 1, "SMTPException: 550 for +14155550100", 5)
    schema = ev.schema()
    payloads = [e["payload"] async for e in db.notification_outbox.find({})]
    by_type = {p["type"]: p for p in payloads}
    assert sorted(by_type) == [
        "campaign.completed_short",
        "campaign.failed",
        "campaign.missed",
        "campaign.started",
    ]
    for payload in payloads:
        assert _conforms(payload, schema) == [], payload
    assert by_type["campaign.started"]["data"]["audienceSize"] == 2
    assert by_type["campaign.completed_short"]["data"]["notSent"] == 1
    text = json.dumps(payloads)
    assert "x@y.com" not in text
    assert "4155550100" not in text
    bad = {"type": "campaign.started", "timestamp": "t", "data": {"schemaVersion": 1}}
    assert _conforms(bad, schema)  # the checker can fail


# ---- operators ---------------------------------------------------------------------------------


async def test_doctor_lists_destinations_with_backlog_dead_and_last_success(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    from reactor.doctor.report import FAIL, OK, WARN, Report, redacted_configuration
    from reactor.notify.report import check_notifications

    from .helpers import settings

    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, rec.url)
    db = client[mongo.campaigns_db]
    await db.notification_destinations.insert_one({"_id": "broken", "kind": "sms"})
    n = notifier(client, mongo, clock)
    await n.outbox.ensure_indexes()
    await n.destinations.reload()
    await n.emit(ev.CAMPAIGN_MISSED, "c1", 1, ev.base_data("c1", "Sale"))
    await rounds(clock, n)
    rec.status = 500
    await n.emit(ev.CAMPAIGN_MISSED, "c2", 1, ev.base_data("c2", "Sale"))
    await rounds(clock, n)
    slack = "https://hooks.slack.com/services/T000/B000/sekrit"
    cfg = settings(mongo, notify_slack_url=slack)
    report = Report()
    await check_notifications(report, db, cfg, dt.datetime.now(dt.UTC))
    rows = {c.name: c for c in report.checks}
    assert rows["notify hook1"].status == OK
    assert "last success" in rows["notify hook1"].detail
    assert "backlog 1" in rows["notify hook1"].detail
    assert rows["notify broken"].status == WARN
    assert "kind must be" in rows["notify broken"].detail
    assert "sekrit" not in rows["notify env:slack:0"].detail
    assert "no success yet" in rows["notify env:slack:0"].detail
    report = Report()
    await check_notifications(report, db, cfg, dt.datetime.now(dt.UTC) + dt.timedelta(minutes=16))
    assert {c.name: c for c in report.checks}["notify hook1"].status == FAIL
    assert "sekrit" not in str(redacted_configuration(cfg))


async def test_repair_writes_the_events_a_dead_replica_did_not_and_only_those(
    client: Client, mongo: MongoTarget
) -> None:
    db = client[mongo.campaigns_db]
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    clock = FakeClock(now)

    def ago(s: float) -> dt.datetime:
        return now - dt.timedelta(seconds=s)

    await db.campaigns.insert_many(
        [
            {
                "_id": "done",
                "name": "Done",
                "status": "completed",
                "startDate": ago(120),
                "endDate": ago(30),
                "performance": {"emailsSent": 1},
                "execution": {
                    "epoch": 2,
                    "startedAt": ago(120),
                    "finishedAt": ago(30),
                    "sendsDone": True,
                },
            },
            {
                "_id": "miss",
                "name": "Miss",
                "status": "missed",
                "startDate": ago(7200),
                "endDate": ago(-60),
                "execution": {"reason": "too late", "finishedAt": ago(40)},
            },
            {
                "_id": "fail",
                "name": "Fail",
                "status": "failed",
                "startDate": ago(300),
                "endDate": ago(-60),
                "execution": {
                    "epoch": 5,
                    "startedAt": ago(290),
                    "finishedAt": ago(20),
                    "failures": 5,
                    "lastError": {"detail": "boom"},
                },
            },
            {
                "_id": "fresh",
                "name": "Fresh",
                "status": "running",
                "startDate": ago(2),
                "endDate": ago(-60),
                "execution": {"epoch": 1, "startedAt": ago(2)},
            },
            {
                "_id": "old",
                "name": "Old",
                "status": "completed",
                "startDate": ago(7200),
                "endDate": ago(3600),
                "execution": {"epoch": 1, "startedAt": ago(7200), "finishedAt": ago(3600)},
            },
        ]
    )
    n = notifier(client, mongo, clock)
    await n.outbox.ensure_indexes()
    # The normal path wrote the completed campaign's start: the repair derives the same key.
    done = await db.campaigns.find_one({"_id": "done"})
    assert done is not None
    await n.started(done)
    assert await n.repair() == 4
    keys = sorted([e["_id"] async for e in db.notification_outbox.find({})])

    def ms(s: float) -> int:
        return int(ago(s).timestamp() * 1000)

    # "fresh" started 2 s ago: its writer still has time; "old" is outside the window.
    assert keys == sorted(
        [
            f"campaign.started:done:{ms(120)}",
            "campaign.completed:done:2",
            f"campaign.missed:miss:{ms(7200)}",
            f"campaign.started:fail:{ms(290)}",
            "campaign.failed:fail:5",
        ]
    )
    assert await n.repair() == 0
    await clock.advance(20)
    assert await n.repair() == 1  # now "fresh" is due, and missing


async def test_complaint_pause_carries_its_rate_and_follows_the_start(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    from bson import Timestamp

    from reactor.adapters.mongo import MongoFeedback

    db = client[mongo.campaigns_db]
    now = dt.datetime.now(dt.UTC)
    clock = FakeClock(now)
    await add_webhook(client, mongo, rec.url)
    await db.campaigns.insert_one(
        {
            "_id": "c1",
            "name": "Sale",
            "status": "running",
            "startDate": now,
            "endDate": now + dt.timedelta(hours=1),
            "targetedCustomerIds": ["1"],
            "execution": {"epoch": 1, "startedAt": now, "owner": "a"},
        }
    )
    detail = "complaint rate 0.40% (4 of 1000 emails) is over 0.1%"
    assert await MongoFeedback(db, "campaigns").pause("c1", "complaint_rate", detail, rate=0.004)
    doc = await db.campaigns.find_one({"_id": "c1"})
    n = notifier(client, mongo, clock)
    await n.outbox.ensure_indexes()
    await n.destinations.reload()

    def change(fields: dict[str, Any], inc: int) -> dict[str, Any]:
        return {
            "operationType": "update",
            "documentKey": {"_id": "c1"},
            "updateDescription": {"updatedFields": fields},
            "fullDocument": doc,
            "clusterTime": Timestamp(1_700_000_000, inc),
        }

    n.observe_change(change({"status": "paused", "execution": {}}, 1))
    n.observe_change(change({"status": "running", "execution": {}}, 2))  # a claim: not a resume
    n.observe_change(change({"status": "running"}, 3))
    n.observe_change(change({"status": "paused", "execution": {}}, 1))  # the same event again
    async with anyio.create_task_group() as tg:
        for i in range(len(n._queues)):
            tg.start_soon(n._emitter, i)
        await eventually(lambda: holds(not any(n._queues)))
        await n.drain(5)
    await rounds(clock, n, n=4)
    assert rec.types() == ["campaign.started", "campaign.paused", "campaign.resumed"]
    paused = rec.unique()[1].payload["data"]
    assert paused["by"] == "complaint_rate"
    assert paused["rate"] == 0.004
    assert "0.40%" in paused["reason"]
    assert rec.unique()[2].payload["data"]["by"] == "operator"


async def test_a_slow_destination_times_out_and_never_holds_up_the_others(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    db = client[mongo.campaigns_db]
    async with receiver("/slow") as slow:
        slow.hold = asyncio.Event()  # never answers
        await db.notification_destinations.insert_many(
            [
                {"_id": "slow", "kind": "json", "url": slow.url},
                {"_id": "fast", "kind": "json", "url": rec.url},
            ]
        )
        n = notifier(client, mongo, clock, timeout_s=0.3)
        await n.outbox.ensure_indexes()
        await n.destinations.reload()
        for i in range(3):
            await n.emit(ev.CAMPAIGN_MISSED, f"c{i}", 1, ev.base_data(f"c{i}", "Sale"))
        async with anyio.create_task_group() as tg:
            assert await n.courier.round(tg) == 6  # both destinations' lanes at once
            await eventually(lambda: holds(len(rec.received) == 3))
            await eventually(lambda: holds(slow.holding == 3))  # still in flight meanwhile
            assert len(rec.received) == 3
            await eventually(lambda: holds(not n.courier._inflight))
        rows = await db.notification_queue.find({"dest": "slow"}).to_list()
        assert [r["state"] for r in rows] == [PENDING] * 3
        assert all("timed out" in r["lastError"] for r in rows)


async def test_shutdown_gives_back_what_is_in_flight(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, rec.url)
    a, b = notifier(client, mongo, clock, "a"), notifier(client, mongo, clock, "b")
    for r in (a, b):
        await r.outbox.ensure_indexes()
        await r.destinations.reload()
    await a.emit(ev.CAMPAIGN_MISSED, "c1", 1, ev.base_data("c1", "Sale"))
    rec.hold = asyncio.Event()
    async with anyio.create_task_group() as tg:
        assert await a.courier.round(tg) == 1
        await eventually(lambda: holds(rec.holding == 1))
        await a.drain(5)  # what `reactor run` does on SIGTERM, before cancelling
        tg.cancel_scope.cancel()
    rec.hold.set()
    rec.hold = None
    await rounds(clock, b)  # at once, not after the 60 s lease
    assert [r.id for r in rec.received][-1] == ev.webhook_id("campaign.missed:c1:1")
    row = await client[mongo.campaigns_db].notification_queue.find_one({})
    assert row is not None
    assert row["state"] == DELIVERED
    assert row["owner"] == "b"


async def test_progress_every_n_percent_when_asked(client: Client, mongo: MongoTarget) -> None:
    db = client[mongo.campaigns_db]
    now = dt.datetime.now(dt.UTC)
    clock = FakeClock(now)
    await db.campaigns.insert_one(
        {
            "_id": "c1",
            "name": "Sale",
            "status": "running",
            "channels": ["email", "sms"],
            "targetedCustomerIds": [str(i) for i in range(10)],
            "execution": {"epoch": 1, "startedAt": now},
            "performance": {"emailsSent": 6, "emailsFailed": 1, "smsSent": 2},
        }
    )
    off = notifier(client, mongo, clock)
    await off.outbox.ensure_indexes()
    await off._scan_progress()
    assert await db.notification_outbox.count_documents({}) == 0  # off by default
    n = notifier(client, mongo, clock, progress_every_percent=25)
    await n._scan_progress()
    assert await db.notification_outbox.count_documents({}) == 0  # sms at 20%: the slowest
    await db.campaigns.update_one({"_id": "c1"}, {"$set": {"performance.smsSkipped": 4}})
    await n._scan_progress()
    await n._scan_progress()
    events = await db.notification_outbox.find({}).to_list()
    assert [e["payload"]["data"]["percent"] for e in events] == [50]
    assert events[0]["type"] == "campaign.progress"
    assert events[0]["payload"]["data"]["processed"] == 6


async def test_a_destination_down_for_ten_minutes_gets_everything_in_order_after(
    client: Client, mongo: MongoTarget, rec: Receiver
) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    await add_webhook(client, mongo, rec.url)
    a, b = notifier(client, mongo, clock, "a"), notifier(client, mongo, clock, "b")
    for r in (a, b):
        await r.outbox.ensure_indexes()
        await r.destinations.reload()
    rec.status = 503
    emitted: dict[str, list[str]] = {"c1": [], "c2": []}
    for minute in range(10):
        for cid in ("c1", "c2"):
            writer = a if minute % 2 else b
            await writer.emit(ev.CAMPAIGN_PROGRESS, cid, minute, ev.base_data(cid, "Sale"))
            emitted[cid].append(ev.webhook_id(f"campaign.progress:{cid}:{minute}"))
        await rounds(clock, a, b, n=6, step_s=10)
    # While it was down only each lane's first event was tried: nothing jumped the queue.
    assert {r.id for r in rec.received} == {emitted["c1"][0], emitted["c2"][0]}
    failed_attempts = len(rec.received)
    assert failed_attempts > 10  # it was tried, and failed, all along
    rec.status = 200
    await clock.advance(300)  # at most one back-off (NOTIFY_RETRY_MAX_SECONDS) later
    await rounds(clock, a, b, n=25, step_s=1)
    delivered = rec.received[failed_attempts:]
    for cid, ids in emitted.items():
        got = [r.id for r in delivered if r.payload["data"]["campaign"]["id"] == cid]
        assert list(dict.fromkeys(got)) == ids  # every one, in order


def test_settings_make_the_environments_destinations_and_admin_smtp() -> None:
    from reactor.config import Settings

    s = Settings(
        mongo_uri="mongodb://db",
        smtp_host="relay.example.com",
        email_from="campaigns@example.com",
        notify_webhook_url="https://hooks.example.com/r",
        notify_webhook_secret=SECRET,
        notify_email_to="ops@example.com, lead@example.com",
        notify_events="campaign.missed,campaign.start_late",
    )
    cfg = s.notify_config()
    assert [d["kind"] for d in cfg.defaults] == ["webhook", "email"]
    assert cfg.defaults[1]["to"] == ["ops@example.com", "lead@example.com"]
    assert all(d["events"] == ["campaign.missed", "campaign.start_late"] for d in cfg.defaults)
    assert cfg.smtp is not None
    assert (cfg.smtp.host, cfg.smtp.sender) == ("relay.example.com", "campaigns@example.com")
    assert SECRET not in repr(cfg)
    with pytest.raises(ValueError, match="NOTIFY_WEBHOOK_SECRET"):
        Settings(mongo_uri="mongodb://db", notify_webhook_url="https://hooks.example.com/r")
    with pytest.raises(ValueError, match="must be https"):
        Settings(mongo_uri="mongodb://db", notify_json_url="http://hooks.example.com/r")
