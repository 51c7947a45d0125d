"""The change feed: the campaigns database's change stream and what list-then-watch needs around
it — the cluster time to open it at, resume tokens kept per instance in `reactor_state`, barrier
markers the stream carries back, and the server's own clock.

The stream's server-side pipeline passes only changes that can alter a schedule. It judges an
update by the *names* of the fields it changed, because mongod names them differently by how a
field was written: a `$set` of a whole sub-document reports `execution`, a pipeline update or a
dotted `$set` reports `execution.owner`. The reactor's own heartbeats (`execution.leaseUntil`)
and counters (`performance.*`) never match, so they never come back as work.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from bson import Timestamp
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.database import AsyncDatabase

from ...domain.models import utc

STATE_COLLECTION = "reactor_state"

# Updated or removed fields that can change what a campaign's schedule wants: any field under
# these top-level names...
# Content too: its templates are compiled when armed, so an edit may arm or disarm a campaign.
SCHEDULE_FIELDS = ["status", "startDate", "endDate", "targetedCustomerIds", "email", "sms"]
SCHEDULE_FIELDS += ["variants", "abTest"]  # a split's decision timer and operator's winner
# ...and these exact names (a release or takeover changes the owner and the epoch).
EXECUTION_FIELDS = ["execution", "execution.owner", "execution.epoch", "execution.sendsDone"]


def _touches_schedule() -> dict[str, Any]:
    names = {
        "$concatArrays": [
            {
                "$map": {
                    "input": {
                        "$objectToArray": {"$ifNull": ["$updateDescription.updatedFields", {}]}
                    },
                    "as": "f",
                    "in": "$$f.k",
                }
            },
            {"$ifNull": ["$updateDescription.removedFields", []]},
        ]
    }
    return {
        "$gt": [
            {
                "$size": {
                    "$filter": {
                        "input": names,
                        "as": "name",
                        "cond": {
                            "$or": [
                                {"$in": ["$$name", EXECUTION_FIELDS]},
                                {
                                    "$in": [
                                        {"$arrayElemAt": [{"$split": ["$$name", "."]}, 0]},
                                        SCHEDULE_FIELDS,
                                    ]
                                },
                            ]
                        },
                    }
                }
            },
            0,
        ]
    }


def pipeline(campaigns: str, barrier_id: str) -> list[dict[str, Any]]:
    """The server-side filter for a stream on the campaigns database."""
    return [
        {
            "$match": {
                "$or": [
                    {
                        "ns.coll": campaigns,
                        "$or": [
                            {
                                "operationType": {
                                    "$in": ["insert", "replace", "delete", "drop", "rename"]
                                }
                            },
                            {"operationType": "update", "$expr": _touches_schedule()},
                        ],
                    },
                    {"operationType": {"$in": ["dropDatabase", "invalidate"]}},
                    {"ns.coll": STATE_COLLECTION, "documentKey._id": barrier_id},
                ]
            }
        },
        {"$project": {"fullDocument.targetedCustomerIds": 0}},
    ]


class MongoChangeFeed:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], campaigns: str, instance_id: str) -> None:
        self.db = db
        self.campaigns = campaigns
        self.instance_id = instance_id
        self.barrier_id = f"barrier:{instance_id}"
        self._state = db[STATE_COLLECTION]

    async def cluster_time(self) -> Timestamp:
        """The server's current operation time: the point a change stream opened after a sweep
        must start from so that nothing written during the sweep is lost."""
        client = self.db.client
        async with client.start_session() as session:
            await self.db.command("ping", session=session)
            if isinstance(session.operation_time, Timestamp):
                return session.operation_time
        hello = await client.admin.command("hello")
        ts = hello.get("lastWrite", {}).get("opTime", {}).get("ts")
        if isinstance(ts, Timestamp):
            return ts
        raise RuntimeError("the server reported no operation time; is it a replica set member?")

    async def server_time(self) -> dt.datetime:
        """The server's wall clock (`hello.localTime`)."""
        hello = await self.db.client.admin.command("hello")
        local = utc(hello.get("localTime"))
        if local is None:
            raise RuntimeError("the server's hello reply has no localTime")
        return local

    async def open(
        self,
        *,
        token: Mapping[str, Any] | None,
        start_at: Timestamp,
        max_await_ms: int,
    ) -> AsyncChangeStream[dict[str, Any]]:
        """Open the stream after `token`, or at `start_at` when there is none."""
        kwargs: dict[str, Any] = {
            "full_document": "updateLookup",
            "max_await_time_ms": max_await_ms,
        }
        if token:
            kwargs["resume_after"] = token
        else:
            kwargs["start_at_operation_time"] = start_at
        return await self.db.watch(pipeline(self.campaigns, self.barrier_id), **kwargs)

    def is_barrier(self, event: Mapping[str, Any]) -> bool:
        return (event.get("ns") or {}).get("coll") == STATE_COLLECTION

    async def write_barrier(self, nonce: str) -> None:
        await self._state.update_one(
            {"_id": self.barrier_id}, {"$set": {"nonce": nonce}}, upsert=True
        )

    async def load_token(self) -> Mapping[str, Any] | None:
        doc = await self._state.find_one({"_id": f"resume_token:{self.instance_id}"})
        token = doc.get("token") if doc else None
        return token if isinstance(token, dict) else None

    async def save_token(self, token: Mapping[str, Any], now: dt.datetime) -> None:
        await self._state.update_one(
            {"_id": f"resume_token:{self.instance_id}"},
            {"$set": {"token": dict(token), "savedAt": now}},
            upsert=True,
        )
