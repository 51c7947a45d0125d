"""What `reactor doctor` shows about notifications: each destination (the collection's and the
environment's) with its last success, backlog and dead events, and why it is refused or
disabled. Read-only: nothing is written while diagnosing."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from ..config import Settings
from ..doctor.report import FAIL, OK, WARN, Report, ago
from ..domain.models import utc
from .destinations import DESTINATIONS, STATE, InvalidDestination, parse_destination
from .outbox import DEAD, DELIVERED, PENDING, MongoOutbox

UNDELIVERED_FAIL_S = 15 * 60  # what the ReactorNotificationsUndelivered alert fires at


async def check_notifications(
    report: Report, db: AsyncDatabase[dict[str, Any]], settings: Settings, now: dt.datetime
) -> None:
    if not settings.notify_enabled:
        report.add("notifications", WARN, "NOTIFY_ENABLED=false: no events are written")
        return
    try:
        stats = await MongoOutbox(db).per_destination()
        docs = await db[DESTINATIONS].find({}).to_list()
        states = {
            str(d["_id"])[len("notify:") :]: d
            async for d in db[STATE].find({"_id": {"$regex": "^notify:env:"}})
        }
    except PyMongoError as exc:
        report.add("notifications", FAIL, f"cannot read the outbox: {type(exc).__name__}")
        return
    defaults = settings.notify_config().defaults
    entries = [(doc, False) for doc in docs]
    entries += [
        ({**d, "_id": f"env:{d.get('kind')}:{i}", **_env_state(states, i, d)}, True)
        for i, d in enumerate(defaults)
    ]
    if not entries:
        report.add(
            "notifications",
            OK,
            "no destinations: add documents to notification_destinations or set NOTIFY_*_URL",
        )
        return
    for doc, from_env in entries:
        name = f"notify {doc.get('_id')}"
        try:
            dest = parse_destination(doc, from_env=from_env)
        except InvalidDestination as exc:
            report.add(name, WARN, f"not used: {exc}")
            continue
        entry = stats.get(dest.id, {})
        status, detail = _describe(dest.kind, dest.where, entry, now)
        if dest.disabled:
            status, detail = WARN, f"{detail}; DISABLED: {dest.disabled}"
        error = (doc.get("error") or {}).get("detail")
        if error:
            status, detail = WARN if status == OK else status, f"{detail}; refused: {error}"
        report.add(name, status, detail)


def _env_state(states: dict[str, Any], i: int, d: dict[str, Any]) -> dict[str, Any]:
    state = states.get(f"env:{d.get('kind')}:{i}") or {}
    return {k: state[k] for k in ("disabled", "disabledReason", "error") if k in state}


def _describe(kind: str, where: str, entry: dict[str, Any], now: dt.datetime) -> tuple[str, str]:
    last = utc(entry.get("lastSuccessAt"))
    oldest = utc(entry.get("oldestPendingAt"))
    backlog, dead = int(entry.get(PENDING, 0)), int(entry.get(DEAD, 0))
    parts = [
        f"{kind} {where}",
        f"last success {ago((now - last).total_seconds())} ago" if last else "no success yet",
        f"backlog {backlog}",
        f"dead {dead}",
        f"delivered {int(entry.get(DELIVERED, 0))} (7 days)",
    ]
    status = OK
    if dead:
        status = WARN
    if oldest is not None and (now - oldest).total_seconds() >= UNDELIVERED_FAIL_S:
        status = FAIL
        parts.append(f"oldest undelivered {ago((now - oldest).total_seconds())} old")
        if entry.get("lastError"):
            parts.append(f"last error: {entry['lastError']}")
    return status, "; ".join(parts)
