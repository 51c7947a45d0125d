"""Audiences outside the campaign document, frozen when the campaign starts
(`campaign_audiences`): the segment's ids are streamed from their source in bounded batches and
written in chunks of SHARD_SIZE, one document each, then a marker says the audience is whole.
Every shard reads one chunk; a takeover finds the same audience however the orders changed
since; no replica ever holds more than a chunk.

Sources: a segment query is run on the orders collection as
`$match` → `$group` by customer id → `$sort` (allowDiskUse, so the server may spill instead of
refusing); a targets collection is read in `_id` order, its documents' `ids` arrays re-cut; a
follow-up (`notEngaged`) streams campaign X's `sent` ledger rows grouped by customer, and drops,
batch by batch, whoever has a human event of the kinds that count in `engagement`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from ...domain.deliveries import DeliveryState
from ...domain.models import Channel
from ...domain.segments import NotEngaged, Segment
from .engagement import of_campaign

COLLECTION = "campaign_audiences"


class MongoAudiences:
    def __init__(
        self,
        db: AsyncDatabase[dict[str, Any]],
        segmentation: AsyncDatabase[dict[str, Any]],
        orders: str,
        customer_id_field: str,
        batch_size: int = 1000,
    ) -> None:
        self.collection: AsyncCollection[dict[str, Any]] = db[COLLECTION]
        self._segmentation = segmentation
        self._orders = orders
        self._id_field = customer_id_field
        self._batch = batch_size

    async def materialize(self, campaign: str, segment: Segment, chunk_size: int) -> int:
        """The campaign's audience in chunks of `chunk_size`; the number of chunks. Idempotent:
        once whole, it is never rebuilt; a build cut short (its owner died) starts over."""
        meta_id = f"{campaign}:audience"
        meta = await self.collection.find_one({"_id": meta_id})
        if meta is not None and meta.get("complete"):
            return int(meta["chunks"])
        await self.collection.delete_many({"campaign": campaign})
        chunks = total = 0
        chunk: list[Any] = []
        async for value in self._ids(segment):
            chunk.append(value)
            if len(chunk) >= chunk_size:
                await self._write(campaign, chunks, chunk)
                chunks, total, chunk = chunks + 1, total + len(chunk), []
        if chunk:
            await self._write(campaign, chunks, chunk)
            chunks, total = chunks + 1, total + len(chunk)
        await self.collection.replace_one(
            {"_id": meta_id},
            {"complete": True, "chunks": chunks, "total": total, "kind": segment.kind},
            upsert=True,
        )
        return chunks

    async def total(self, campaign: str) -> int:
        meta = await self.collection.find_one({"_id": f"{campaign}:audience"})
        return int((meta or {}).get("total", 0))

    async def chunk(self, campaign: str, index: int) -> list[Any]:
        doc = await self.collection.find_one({"_id": f"{campaign}:{index}"})
        return list((doc or {}).get("ids", []))

    async def _write(self, campaign: str, index: int, ids: list[Any]) -> None:
        await self.collection.replace_one(
            {"_id": f"{campaign}:{index}"},
            {"campaign": campaign, "index": index, "ids": ids},
            upsert=True,
        )

    async def _ids(self, segment: Segment) -> AsyncIterator[Any]:
        if segment.not_engaged is not None:
            async for value in self._not_engaged(segment.not_engaged):
                yield value
            return
        if segment.query is not None:
            cursor = await self._segmentation[self._orders].aggregate(
                [
                    {"$match": segment.query},
                    {"$group": {"_id": f"${self._id_field}"}},
                    {"$match": {"_id": {"$ne": None}}},
                    {"$sort": {"_id": 1}},
                ],
                allowDiskUse=True,
                batchSize=self._batch,
            )
            async for row in cursor:
                yield row["_id"]
            return
        assert segment.targets is not None
        found = self._segmentation[segment.targets].find({}, {"ids": 1}, batch_size=10)
        async for doc in found.sort("_id", 1):
            for value in doc.get("ids") or []:
                yield value

    async def _not_engaged(self, follow: NotEngaged) -> AsyncIterator[str]:
        """Campaign X's recipients (of its email, for "did not open") without a human event."""
        db = self.collection.database
        match: dict[str, Any] = {"campaign": str(follow.campaign), "state": DeliveryState.SENT}
        if follow.with_ == "open":
            match["channel"] = Channel.EMAIL.value  # only an email can be opened
        cursor = await db["deliveries"].aggregate(
            [{"$match": match}, {"$group": {"_id": "$customer"}}, {"$sort": {"_id": 1}}],
            allowDiskUse=True,
            batchSize=self._batch,
        )
        batch: list[str] = []
        async for row in cursor:
            batch.append(str(row["_id"]))
            if len(batch) >= self._batch:
                for value in await self._unengaged(follow, batch):
                    yield value
                batch = []
        if batch:
            for value in await self._unengaged(follow, batch):
                yield value

    async def _unengaged(self, follow: NotEngaged, batch: list[str]) -> list[str]:
        engaged = {
            str(doc.get("customer"))
            async for doc in self.collection.database["engagement"].find(
                {
                    "campaign": of_campaign(follow.campaign),
                    "class": "human",
                    "kind": {"$in": list(follow.kinds)},
                    "customer": {"$in": batch},
                },
                {"customer": 1},
            )
        }
        return [c for c in batch if c not in engaged]
