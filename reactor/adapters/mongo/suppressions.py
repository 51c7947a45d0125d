"""The suppression list (`suppressions` in the campaigns database): one document per
(what, channel), its `_id` the key `domain.consent.suppression_id` builds, so a send's check is a
lookup by ids. Its change stream tells every replica of a new entry within a second.

Each document holds `claims` (one per thing that said "do not send", see `domain.consent`) and,
for readers that look no further, the strongest claim's `reason`, `source`, `campaign` and
`note`. Adding is one pipeline upsert per entry that appends its claim unless a claim with that
key is there (then the write is a duplicate-key error, read as "already so"); lifting reads the
entries and writes each back conditionally on the version it read (`v`), deleting it when no
claim is left. Documents written before claims (no `claims`, no `v`) are read as holding one
claim (their reason and source) and converted by the first write that touches them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from bson import Timestamp
from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from ...domain.consent import (
    Lift,
    Reason,
    Suppression,
    claims_of,
    normalise_value,
    rank,
    strongest,
)

COLLECTION = "suppressions"


class MongoSuppressions:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.collection: AsyncCollection[dict[str, Any]] = db[COLLECTION]
        self._db = db

    async def ensure_indexes(self) -> None:
        await self.collection.create_index(
            [("reason", ASCENDING), ("createdAt", DESCENDING)], name="reason_createdAt"
        )
        await self.collection.create_index(
            [("kind", ASCENDING), ("value", ASCENDING)], name="kind_value"
        )

    async def add(self, entries: Sequence[Suppression], *, now: dt.datetime) -> list[str]:
        """Add each entry's claim where it is not held yet; returns the ids whose entry gained
        a claim (a new entry or a new claim on an existing one)."""
        if not entries:
            return []
        ops = [
            UpdateOne(
                {"_id": e.id, "claims.key": {"$ne": e.claim_key}},
                _add_pipeline(e, now),
                upsert=True,
            )
            for e in entries
        ]
        held: set[int] = set()
        try:
            await self.collection.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors):
                raise
            # The claim was there already: the filter missed, and the upsert hit the _id.
            held = {int(e["index"]) for e in errors}
        return list(dict.fromkeys(e.id for i, e in enumerate(entries) if i not in held))

    async def lift(self, ids: Sequence[str], rule: Lift, *, now: dt.datetime) -> int:
        """Take away the claims `rule` names from these entries (deleting an entry left with
        none); returns how many claims were lifted. Each entry is written back only if no one
        wrote it since it was read (else read again)."""
        lifted = 0
        for _ in range(_LIFT_ATTEMPTS):
            pending: list[str] = []
            async for doc in self.collection.find({"_id": {"$in": list(dict.fromkeys(ids))}}):
                n, raced = await self._lift_one(doc, rule, now)
                lifted += n
                if raced:
                    pending.append(str(doc["_id"]))
            if not pending:
                return lifted
            ids = pending
        raise RuntimeError("suppression entries kept changing while being lifted")

    async def _lift_one(
        self, doc: dict[str, Any], rule: Lift, now: dt.datetime
    ) -> tuple[int, bool]:
        claims = claims_of(doc)
        channel = str(doc.get("channel", ""))
        kept = [c for c in claims if not rule.lifts(channel, c)]
        if len(kept) == len(claims):
            return 0, False
        version = {"v": doc["v"]} if "v" in doc else {"v": {"$exists": False}}
        query = {"_id": doc["_id"], **version}
        if kept:
            update = {
                "$set": {
                    "claims": kept,
                    **_summary(kept),
                    "v": int(doc.get("v", 0)) + 1,
                    "updatedAt": now,
                }
            }
            result = await self.collection.update_one(query, update)
            done = result.matched_count > 0
        else:
            done = (await self.collection.delete_one(query)).deleted_count > 0
        return (len(claims) - len(kept), False) if done else (0, True)

    async def remove(self, ids: Sequence[str]) -> int:
        """An operator lifts these entries whole (every claim); returns how many were removed."""
        result = await self.collection.delete_many({"_id": {"$in": list(ids)}})
        return result.deleted_count

    async def find(self, ids: Sequence[str]) -> dict[str, str]:
        """{id: reason} of the given ids that are suppressed: the strongest claim's reason,
        which every write keeps at the top level (so a send's check reads one field)."""
        if not ids:
            return {}
        cursor = self.collection.find({"_id": {"$in": list(dict.fromkeys(ids))}}, {"reason": 1})
        return {str(doc["_id"]): str(doc.get("reason") or Reason.MANUAL) async for doc in cursor}

    async def claims(self, ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """{id: claims} of the given ids that are suppressed."""
        out: dict[str, list[dict[str, Any]]] = {}
        async for doc in self.collection.find({"_id": {"$in": list(dict.fromkeys(ids))}}):
            if held := claims_of(doc):
                out[str(doc["_id"])] = held
        return out

    async def entries(
        self, *, reason: str | None = None, limit: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        query = {"reason": reason} if reason else {}
        cursor = self.collection.find(query).sort([("createdAt", DESCENDING), ("_id", ASCENDING)])
        if limit:
            cursor = cursor.limit(limit)
        async for doc in cursor:
            yield doc

    async def count(self) -> int:
        return await self.collection.estimated_document_count()

    async def cluster_time(self) -> Timestamp:
        reply = await self._db.command("ping")
        ct = reply.get("$clusterTime", {}).get("clusterTime")
        if ct is None:  # a standalone: no cluster time; open at "now"
            ct = reply.get("operationTime") or Timestamp(0, 0)
        return ct  # type: ignore[no-any-return]

    async def open(
        self, *, token: Mapping[str, Any] | None, start_at: Timestamp | None, max_await_ms: int
    ) -> AsyncChangeStream[dict[str, Any]]:
        """A stream of entries added, changed (a claim added or lifted: the entry stays, its
        strongest reason may change; looked up whole) and removed."""
        ops = ["insert", "replace", "update", "delete"]
        pipeline = [{"$match": {"operationType": {"$in": ops}}}]
        kwargs: dict[str, Any] = {
            "max_await_time_ms": max_await_ms,
            "full_document": "updateLookup",
        }
        if token is not None:
            kwargs["resume_after"] = token
        elif start_at is not None:
            kwargs["start_at_operation_time"] = start_at
        return await self.collection.watch(pipeline, **kwargs)


_LIFT_ATTEMPTS = 10
_RANK_BY_REASON = {r.value: rank(r.value, "") for r in Reason}


def _claim(e: Suppression, now: dt.datetime) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "key": e.claim_key,
        "reason": e.reason.value,
        "rank": e.rank,
        "source": e.source,
        "at": now,
    }
    if e.campaign is not None:
        claim["campaign"] = e.campaign
    if e.note:
        claim["note"] = e.note
    return claim


def _summary(claims: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    best = strongest(claims) or {}
    return {name: best.get(name) for name in ("reason", "source", "campaign", "note")}


def _legacy_claims() -> dict[str, Any]:
    """In a pipeline: the claims of the document as it is (a document written before claims
    holds one, made of its reason and source; a new document none)."""
    source = {"$ifNull": ["$source", "legacy"]}
    # Before claims, only a link's unsubscribe recorded a campaign: that is what a link's is.
    link = {"$ne": [{"$ifNull": ["$campaign", None]}, None]}
    strength = {
        "$switch": {
            "branches": [
                {"case": {"$eq": ["$reason", reason]}, "then": value}
                for reason, value in _RANK_BY_REASON.items()
            ],
            "default": _RANK_BY_REASON[Reason.MANUAL.value],
        }
    }
    legacy = {
        "key": {"$concat": ["$reason", ":", source]},
        "reason": "$reason",
        "rank": {"$subtract": [strength, {"$cond": [link, 1, 0]}]},
        "source": source,
        "at": {"$ifNull": ["$createdAt", None]},
        "campaign": {"$ifNull": ["$campaign", None]},
        "note": {"$ifNull": ["$note", None]},
    }
    return {
        "$cond": [
            {"$isArray": "$claims"},
            "$claims",
            {"$cond": [{"$eq": [{"$type": "$reason"}, "string"]}, [legacy], []]},
        ]
    }


def _add_pipeline(e: Suppression, now: dt.datetime) -> list[dict[str, Any]]:
    new = _claim(e, now)
    existing = {"$filter": {"input": _legacy_claims(), "cond": {"$ne": ["$$this.key", new["key"]]}}}
    top = {"$max": "$claims.rank"}
    best = {
        "$arrayElemAt": [
            {"$filter": {"input": "$claims", "cond": {"$eq": ["$$this.rank", "$$top"]}}},
            0,
        ]
    }
    summary = {
        name: {
            "$let": {
                "vars": {"top": top},
                "in": {"$ifNull": [{"$getField": {"field": name, "input": best}}, None]},
            }
        }
        for name in ("reason", "source", "campaign", "note")
    }
    return [
        {
            "$set": {
                "claims": {"$concatArrays": [existing, [{"$literal": new}]]},
                "kind": e.kind.value,
                "value": normalise_value(e.kind, e.value),
                "channel": e.channel,
                "createdAt": {"$ifNull": ["$createdAt", now]},
                "updatedAt": now,
                "v": {"$add": [{"$ifNull": ["$v", 0]}, 1]},
            }
        },
        {"$set": summary},
    ]
