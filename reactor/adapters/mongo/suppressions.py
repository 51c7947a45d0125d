"""The suppression list (`suppressions` in the campaigns database): one document per
(what, channel), its `_id` the key `domain.consent.suppression_id` builds, so an add is an
insert-only upsert (adding twice is one entry, and the first reason and time stay) and a send's
check is a lookup by ids. Its change stream tells every replica of a new entry within a second.
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

from ...domain.consent import Reason, Suppression, normalise_value

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
        """Insert the entries not there yet; returns the ids that were new."""
        if not entries:
            return []
        ops = [
            UpdateOne({"_id": e.id}, {"$setOnInsert": _document(e, now)}, upsert=True)
            for e in entries
        ]
        result = await self.collection.bulk_write(ops, ordered=False)
        return [str(v) for v in (result.upserted_ids or {}).values()]

    async def remove(self, ids: Sequence[str], *, reasons: Sequence[str] | None = None) -> int:
        query: dict[str, Any] = {"_id": {"$in": list(ids)}}
        if reasons is not None:
            query["reason"] = {"$in": list(reasons)}
        result = await self.collection.delete_many(query)
        return result.deleted_count

    async def find(self, ids: Sequence[str]) -> dict[str, str]:
        """{id: reason} of the given ids that are suppressed."""
        if not ids:
            return {}
        cursor = self.collection.find({"_id": {"$in": list(dict.fromkeys(ids))}}, {"reason": 1})
        return {str(doc["_id"]): str(doc.get("reason", Reason.MANUAL)) async for doc in cursor}

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
        """A stream of inserts, replacements and deletes of entries (an update changes no
        key: entries are only added and removed)."""
        pipeline = [{"$match": {"operationType": {"$in": ["insert", "replace", "delete"]}}}]
        kwargs: dict[str, Any] = {"max_await_time_ms": max_await_ms}
        if token is not None:
            kwargs["resume_after"] = token
        elif start_at is not None:
            kwargs["start_at_operation_time"] = start_at
        return await self.collection.watch(pipeline, **kwargs)


def _document(e: Suppression, now: dt.datetime) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kind": e.kind.value,
        "value": normalise_value(e.kind, e.value),
        "channel": e.channel,
        "reason": e.reason.value,
        "source": e.source,
        "createdAt": now,
    }
    if e.campaign is not None:
        doc["campaign"] = e.campaign
    if e.note:
        doc["note"] = e.note
    return doc
