"""The checks `reactor doctor` runs: configuration, MongoDB and change streams, indexes, the
segmentation database, the channels, and the campaigns waiting, running and failing."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure, PyMongoError

from ..config import Settings
from ..domain.errors import InvalidCampaign
from ..domain.models import as_utc, parse_campaign
from ..domain.variants import compile_content
from ..notify.report import check_notifications
from .consent import check_links, check_suppressions, check_webhooks
from .report import FAIL, OK, WARN, Report, ago, redacted_configuration

EXPECTED_INDEXES = {
    "campaigns": {"status_startDate", "status_endDate"},
    "deliveries": {"campaign_channel_state"},
    "campaign_executions": {"campaign_epoch"},
}


async def diagnose(
    settings: Settings, *, probe: bool = False, now: dt.datetime | None = None
) -> Report:
    now = now or dt.datetime.now(dt.UTC)
    report = Report(configuration=redacted_configuration(settings))
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        settings.mongo_uri.get_secret_value(),
        tz_aware=True,
        serverSelectionTimeoutMS=3000,
        connectTimeoutMS=3000,
        appname="campaign-reactor/doctor",
    )
    seg_client = client
    if settings.segmentation_mongo_uri is not None:
        seg_client = AsyncMongoClient(
            settings.segmentation_uri.get_secret_value(),
            tz_aware=True,
            serverSelectionTimeoutMS=3000,
        )
    try:
        if await _check_mongo(report, client):
            await _check_change_streams(report, client, settings)
            await _check_indexes(report, client, settings)
            await _list_campaigns(report, client, settings, now)
            await check_suppressions(report, client, settings)
            await check_webhooks(report, client, settings, now)
            await check_notifications(report, client[settings.campaigns_db], settings, now)
        await _check_segmentation(report, seg_client, settings)
        await _check_channels(report, settings, probe)
        check_links(report, settings)
    finally:
        if seg_client is not client:
            await seg_client.close()
        await client.close()
    _recommend(report, settings)
    return report


async def _check_mongo(report: Report, client: AsyncMongoClient[dict[str, Any]]) -> bool:
    try:
        hello = await client.admin.command("hello")
    except PyMongoError as exc:
        report.add(
            "mongodb", FAIL, f"cannot reach MongoDB: {type(exc).__name__}: {str(exc).split(',')[0]}"
        )
        return False
    report.add("mongodb", OK, f"connected (wire version {hello.get('maxWireVersion')})")
    if hello.get("setName"):
        report.add("replica set", OK, f"member of replica set {hello['setName']!r}")
    else:
        report.add("replica set", FAIL, "standalone server: change streams need a replica set")
    return True


async def _check_change_streams(
    report: Report, client: AsyncMongoClient[dict[str, Any]], settings: Settings
) -> None:
    db = client[settings.campaigns_db]
    try:
        stream = await db.watch(max_await_time_ms=100)
        await stream.close()
    except OperationFailure as exc:
        report.add(
            "change streams",
            FAIL,
            f"cannot open a change stream on {settings.campaigns_db!r}: {exc.code} "
            f"{(exc.details or {}).get('codeName', '')}".rstrip(),
        )
        return
    except PyMongoError as exc:
        report.add("change streams", FAIL, f"cannot open a change stream: {type(exc).__name__}")
        return
    report.add("change streams", OK, f"available on {settings.campaigns_db!r}")


async def _check_indexes(
    report: Report, client: AsyncMongoClient[dict[str, Any]], settings: Settings
) -> None:
    db = client[settings.campaigns_db]
    missing = []
    for coll_name, wanted in EXPECTED_INDEXES.items():
        real = settings.campaigns_collection if coll_name == "campaigns" else coll_name
        try:
            names = {i["name"] async for i in await db[real].list_indexes()}
        except OperationFailure:
            names = set()
        missing += [f"{real}.{n}" for n in sorted(wanted - names)]
    if missing:
        report.add(
            "indexes", WARN, "missing (created by `reactor run` at start): " + ", ".join(missing)
        )
    else:
        report.add("indexes", OK, "all present")


async def _check_segmentation(
    report: Report, client: AsyncMongoClient[dict[str, Any]], settings: Settings
) -> None:
    rc = settings.recipients_config()
    try:
        names = await client[rc.db].list_collection_names()
    except PyMongoError as exc:
        report.add("segmentation", FAIL, f"cannot read database {rc.db!r}: {type(exc).__name__}")
        return
    if rc.collection not in names:
        hint = (
            f"; collections there: {', '.join(sorted(names)[:8])}"
            if names
            else " (the database is empty or does not exist)"
        )
        report.add(
            "segmentation", FAIL, f"no collection {rc.collection!r} in database {rc.db!r}{hint}"
        )
        return
    orders = client[rc.db][rc.collection]
    sample = await orders.find_one({})
    count = await orders.estimated_document_count()
    if sample is None:
        report.add("segmentation", WARN, f"{rc.db}.{rc.collection} is empty")
        return
    fields = [rc.id_field, rc.email_field, rc.phone_field, rc.name_field]
    absent = [f for f in fields if f not in sample]
    if rc.id_field in absent:
        report.add(
            "segmentation",
            FAIL,
            f"order rows have no {rc.id_field!r} field "
            f"(CUSTOMER_ID_FIELD); a row has: {', '.join(sorted(sample))}",
        )
    elif absent:
        report.add(
            "segmentation", WARN, f"{count} order rows; a sample row lacks {', '.join(absent)}"
        )
    else:
        report.add(
            "segmentation",
            OK,
            f"{rc.db}.{rc.collection}: about {count} order rows with the configured field names",
        )
    await _check_orders_index(report, orders, rc.id_field)


async def _check_orders_index(
    report: Report, orders: AsyncCollection[dict[str, Any]], id_field: str
) -> None:
    """Recipients are matched by customer id in batches; without an index led by that field
    every batch scans the whole orders collection."""
    try:
        indexes = [i async for i in await orders.list_indexes()]
    except PyMongoError as exc:
        report.add("orders index", WARN, f"cannot list indexes: {type(exc).__name__}")
        return
    led_by_id = [i["name"] for i in indexes if next(iter(i.get("key", {})), None) == id_field]
    if led_by_id:
        report.add("orders index", OK, f"{', '.join(led_by_id)} serves lookups by {id_field!r}")
    else:
        report.add(
            "orders index",
            WARN,
            f"no index on {id_field!r}: every batch of recipients scans the collection",
        )


async def _check_channels(report: Report, settings: Settings, probe: bool) -> None:
    smtp = settings.smtp_config()
    twilio = settings.twilio_config()
    if smtp is None:
        report.add(
            "email (SMTP)",
            WARN,
            "not configured: set SMTP_HOST and EMAIL_FROM; emails "
            "will be recorded as skipped (channel_not_configured)",
        )
    elif probe:
        from ..adapters.smtp import SmtpEmailSender

        try:
            await asyncio.wait_for(SmtpEmailSender(smtp).check(), 10)
            report.add("email (SMTP)", OK, f"{smtp.host}:{smtp.port} answered")
        except Exception as exc:
            report.add(
                "email (SMTP)", FAIL, f"{smtp.host}:{smtp.port} unreachable: {type(exc).__name__}"
            )
    else:
        report.add(
            "email (SMTP)",
            OK,
            f"configured ({smtp.host}:{smtp.port}, tls={smtp.tls}); --probe to connect",
        )
    if twilio is None:
        report.add(
            "sms (Twilio)",
            WARN,
            "not configured: set TWILIO_ACCOUNT_SID, "
            "TWILIO_AUTH_TOKEN and TWILIO_FROM_NUMBER; SMS will be recorded as skipped",
        )
    elif probe:
        from ..adapters.twilio_sms import TwilioSmsSender

        sender = TwilioSmsSender(twilio)
        try:
            await sender.check()
            report.add("sms (Twilio)", OK, "account answered")
        except Exception as exc:
            report.add("sms (Twilio)", FAIL, f"Twilio unreachable or refused: {type(exc).__name__}")
        finally:
            await sender.aclose()
    else:
        report.add("sms (Twilio)", OK, "configured; --probe to call the API")


async def _list_campaigns(
    report: Report, client: AsyncMongoClient[dict[str, Any]], settings: Settings, now: dt.datetime
) -> None:
    coll = client[settings.campaigns_db][settings.campaigns_collection]
    grace = dt.timedelta(seconds=settings.misfire_grace_seconds)
    projection = {"targetedCustomerIds": 0}
    async for doc in coll.find({"status": "approved"}, projection).sort("startDate", 1).limit(50):
        report.waiting.append(_waiting(doc, now, grace))
    async for doc in coll.find({"status": {"$in": ["running", "paused"]}}, projection).limit(50):
        shards = await _shard_states(client[settings.campaigns_db], str(doc["_id"]))
        report.running.append(_running(doc, now, settings, shards))
    since = now - dt.timedelta(days=7)
    failed = coll.find(
        {
            "$or": [
                {"execution.lastError": {"$exists": True}},
                {"status": "missed", "execution.finishedAt": {"$gte": since}},
                {"performance.emailsFailed": {"$gt": 0}},
                {"performance.smsFailed": {"$gt": 0}},
            ]
        },
        projection,
    ).limit(20)
    async for doc in failed:
        report.failures.append(_failure(doc))
    if any(r["stuck"] for r in report.running):
        report.add("executions", FAIL, "a campaign is still running well past its end date")
    else:
        report.add("executions", OK, f"{len(report.running)} running or paused")


def _waiting(doc: dict[str, Any], now: dt.datetime, grace: dt.timedelta) -> dict[str, Any]:
    """An approved campaign: when it starts, or why it will not."""
    row: dict[str, Any] = {"id": str(doc["_id"]), "name": doc.get("name")}
    try:
        c = parse_campaign(doc)
        compile_content(c)  # content that cannot render is not armed (bad_template)
    except InvalidCampaign as exc:
        return row | {"start": str(doc.get("startDate")), "state": "invalid", "note": exc.detail}
    row["start"] = c.start_at.isoformat()
    if c.end_at <= now or c.start_at < now - grace:
        row.update(
            state="would be missed",
            note="start is past the misfire grace or the window already closed",
        )
    elif c.start_at <= now:
        row.update(state="due now", note="should start within a second if a reactor runs")
    else:
        row.update(state="waiting", note=f"starts in {_ago(c.start_at - now)}")
    return row


async def _shard_states(db: Any, campaign: str) -> dict[str, int]:
    """{state: count} of a campaign's shards; empty when it is not sharded."""
    shards: dict[str, int] = {}
    async for row in await db.campaign_shards.aggregate(
        [{"$match": {"campaign": campaign}}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}]
    ):
        shards[str(row["_id"])] = int(row["n"])
    return shards


def _running(
    doc: dict[str, Any], now: dt.datetime, settings: Settings, shards: dict[str, int]
) -> dict[str, Any]:
    """A running or paused campaign: its owner, lease, progress, and whether it is stuck."""
    exe = doc.get("execution") or {}
    lease = exe.get("leaseUntil")
    lease_state = "none"
    if isinstance(lease, dt.datetime):
        lease_at = as_utc(lease, "leaseUntil")
        lease_state = "valid" if lease_at > now else f"expired {_ago(now - lease_at)} ago"
    perf = doc.get("performance") or {}
    end = doc.get("endDate")
    overdue = isinstance(end, dt.datetime) and as_utc(end, "endDate") < now - dt.timedelta(
        seconds=2 * settings.reconcile_interval_seconds + 60
    )
    return {
        "id": str(doc["_id"]),
        "name": doc.get("name"),
        "status": doc.get("status"),
        "owner": exe.get("owner"),
        "lease": lease_state,
        "sends_done": bool(exe.get("sendsDone")),
        "progress": {
            k: perf.get(k, 0)
            for k in ("emailsSent", "emailsFailed", "smsSent", "smsFailed", "uncertain")
        },
        "stuck": overdue,
        "shards": shards,
    }


def _failure(doc: dict[str, Any]) -> dict[str, Any]:
    exe = doc.get("execution") or {}
    err = exe.get("lastError") or {}
    perf = doc.get("performance") or {}
    return {
        "id": str(doc["_id"]),
        "name": doc.get("name"),
        "status": doc.get("status"),
        "problem": err.get("detail")
        or exe.get("reason")
        or f"{perf.get('emailsFailed', 0)} emails and {perf.get('smsFailed', 0)} SMS failed",
    }


def _ago(delta: dt.timedelta) -> str:
    return ago(delta.total_seconds())


def _recommend(report: Report, settings: Settings) -> None:
    status = {c.name: c for c in report.checks}
    r = report.recommendations
    if status.get("mongodb") and status["mongodb"].status == FAIL:
        r.append("Check MONGO_URI (host, port, credentials) and that this machine can reach it.")
    if status.get("replica set") and status["replica set"].status == FAIL:
        r.append(
            "Run MongoDB as a replica set (even one member: `rs.initiate()`) and add "
            "`?replicaSet=NAME` to MONGO_URI; change streams need it."
        )
    if status.get("change streams") and status["change streams"].status == FAIL:
        r.append(
            "Grant the reactor's user `changeStream` and `find` on the campaigns database, "
            "and use a replica set (not a standalone)."
        )
    seg = status.get("segmentation")
    if seg and seg.status == FAIL:
        r.append(
            f"Point SEGMENTATION_DB / ORDERS_COLLECTION (now {settings.segmentation_db!r} / "
            f"{settings.orders_collection!r}) at the customers' order rows, and "
            "CUSTOMER_*_FIELD at their field names."
        )
    idx = status.get("orders index")
    if idx and idx.status == WARN and "no index" in idx.detail:
        r.append(
            f"Index the orders collection on the customer id: in mongosh, "
            f"`db.getSiblingDB({settings.segmentation_db!r}).{settings.orders_collection}"
            f".createIndex({{{settings.customer_id_field}: 1}})` (the segmentation database "
            "belongs to its owners; the reactor only reads it)."
        )
    if any(w.get("state") == "would be missed" for w in report.waiting):
        r.append(
            f"Approved campaigns past the misfire grace ({settings.misfire_grace_seconds:g}s) "
            "will be marked missed, not sent late: move their startDate, or raise "
            "MISFIRE_GRACE_SECONDS if late sending is acceptable."
        )
    if any(w.get("state") == "invalid" for w in report.waiting):
        r.append("Fix the invalid approved campaigns listed above; they are not scheduled.")
    if any(run["lease"].startswith("expired") and not run["sends_done"] for run in report.running):
        r.append(
            "A running campaign's lease expired: if no reactor is running, start one; it "
            "takes over and resumes from the ledger."
        )
    if any(run["stuck"] for run in report.running):
        r.append(
            "A campaign is past its end but not completed: check that a reactor is running "
            "(`/readyz`) and its logs for errors."
        )
    for name in ("email (SMTP)", "sms (Twilio)", "unsubscribe links", "postal address"):
        check = status.get(name)
        if check and check.status != OK:
            r.append(f"{name}: {check.detail}")
    if not r:
        r.append("Nothing to do: everything checked is healthy.")
