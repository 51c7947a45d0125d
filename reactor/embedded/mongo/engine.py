"""The emulator's storage: mongomock's engine for documents, queries, updates and aggregation, plus
what mongomock lacks and MongoDB has — an oplog-like change log with cluster times, per-write
change events with `updateDescription`, pre-images, and fast paths for `_id` and indexed-equality
lookups (mongomock scans every document for every query).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import datetime as dt
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import mongomock
import mongomock.aggregate
import mongomock.store
from bson import Timestamp

from .expressions import SYSTEM_VARIABLES, install_expressions, install_fast_operators
from .fastpath import FastCollection, clone, simple_update

__all__ = ["Engine", "FastCollection", "OplogEntry", "clone", "diff_documents", "simple_update"]


def ts_to_int(ts: Timestamp) -> int:
    return (ts.time << 32) | ts.inc


def int_to_ts(value: int) -> Timestamp:
    return Timestamp(value >> 32, value & 0xFFFFFFFF)


@dataclass
class OplogEntry:
    ts: int
    db: str
    coll: str
    op: str  # insert | update | replace | delete | drop | dropDatabase | rename
    document_key: dict[str, Any] | None
    wall_time: dt.datetime
    full_document: dict[str, Any] | None = None
    update_description: dict[str, Any] | None = None
    pre_image: dict[str, Any] | None = None


_INVALIDATE = object()  # a change no document key describes: the tables are rebuilt


class HistoryLost(Exception):
    """Raised when a change stream asks to resume from a point that is no longer in the log."""


class Engine:
    """One mongomock client plus a change log shared by every connection of the emulator."""

    def __init__(self, *, oplog_limit: int = 200_000) -> None:
        install_fast_operators()
        install_expressions()
        install_ttl_monitor()
        self.client: Any = mongomock.MongoClient()
        self.oplog: list[OplogEntry] = []
        self._oplog_ts: list[int] = []
        self.oplog_limit = oplog_limit
        # Entries at or before this cluster time are gone; resuming from before it fails.
        self.history_floor = 0
        self._last_ts = 0
        self.changed = asyncio.Condition()
        self.pre_images_enabled: set[tuple[str, str]] = set()
        self.indexed_fields: dict[tuple[str, str], set[str]] = {}
        # The document keys each write in progress changed, by collection (from its entries).
        self._write_keys: dict[tuple[str, str], list[Any]] = {}

    # ---- clock -------------------------------------------------------------------------------

    def next_ts(self) -> int:
        now = int(time.time()) << 32
        self._last_ts = max(now | 1, self._last_ts + 1)
        return self._last_ts

    def now(self) -> dt.datetime:
        """The server's clock, as stored: naive UTC at millisecond precision."""
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        return now.replace(microsecond=now.microsecond // 1000 * 1000)

    def begin_command(self) -> None:
        """Fix $$NOW and $$CLUSTER_TIME for the command about to run."""
        SYSTEM_VARIABLES["NOW"] = self.now()
        SYSTEM_VARIABLES["CLUSTER_TIME"] = int_to_ts(self.cluster_time)

    @property
    def cluster_time(self) -> int:
        if self._last_ts == 0:
            return self.next_ts()
        return self._last_ts

    # ---- collections -------------------------------------------------------------------------

    def collection(self, db: str, name: str) -> FastCollection:
        database = self.client[db]
        accesses = database._collection_accesses
        coll: Any = accesses.get(name)
        if not isinstance(coll, FastCollection):
            database._ensure_valid_collection_name(name)
            coll = FastCollection(
                database,
                name=name,
                _db_store=database._store,
                read_preference=database.read_preference,
                codec_options=database._codec_options,
            )
            accesses[name] = coll
        return coll

    def collection_exists(self, db: str, name: str) -> bool:
        if db not in self.client.list_database_names():
            return False
        return name in self.client[db].list_collection_names()

    def touch(self, db: str, name: str) -> None:
        """Invalidate the equality tables of a collection."""
        store = self.client[db]._store[name]
        store._reactor_version = getattr(store, "_reactor_version", 0) + 1
        store._reactor_index = None
        store._reactor_fields = self.indexed_fields.get((db, name), set())

    @contextlib.contextmanager
    def writing(self, db: str, name: str) -> Iterator[None]:
        """Bracket a write: equality tables are not used while it runs. Afterwards the documents
        it changed (the keys of the change entries it recorded) are patched into the tables;
        anything else (no entries to go by, a drop) invalidates them."""
        store = self.client[db]._store[name]
        store._reactor_writing = True
        keys: list[Any] = []
        self._write_keys[(db, name)] = keys
        try:
            yield
        finally:
            self._write_keys.pop((db, name), None)
            store._reactor_writing = False
            state = getattr(store, "_reactor_index", None)
            version = getattr(store, "_reactor_version", 0)
            if (
                state is not None
                and state.version == version
                and _INVALIDATE not in keys
                and state.patch(store, keys)
            ):
                store._reactor_version = version + 1
                state.version = version + 1
            else:
                self.touch(db, name)

    def set_indexed_fields(self, db: str, name: str) -> None:
        coll = self.collection(db, name)
        fields: set[str] = set()
        for info in coll.index_information().values():
            keys = info.get("key", [])
            if keys and keys[0][0] != "_id" and keys[0][1] in (1, -1):
                fields.add(keys[0][0])
        self.indexed_fields[(db, name)] = fields
        self.touch(db, name)

    # ---- change log --------------------------------------------------------------------------

    def record(self, entries: Iterable[OplogEntry]) -> None:
        added = False
        for entry in entries:
            keys = self._write_keys.get((entry.db, entry.coll))
            if keys is not None:
                key = (entry.document_key or {}).get("_id", _INVALIDATE)
                keys.append(
                    key if entry.op in ("insert", "update", "replace", "delete") else _INVALIDATE
                )
            self.oplog.append(entry)
            self._oplog_ts.append(entry.ts)
            added = True
        if len(self.oplog) > self.oplog_limit:
            cut = len(self.oplog) - self.oplog_limit
            self.history_floor = max(self.history_floor, self.oplog[cut - 1].ts)
            del self.oplog[:cut]
            del self._oplog_ts[:cut]
        if added:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def entries_after(self, position: int) -> list[OplogEntry]:
        if position < self.history_floor:
            raise HistoryLost(position)
        start = bisect.bisect_right(self._oplog_ts, position)
        return self.oplog[start:]

    def drop_history(self) -> None:
        """Forget every change so far, as an oplog rollover would. Like mongod's periodic no-op
        oplog entries, the cluster time then moves on, so watching from now still works."""
        self.history_floor = self.cluster_time
        self.oplog.clear()
        self._oplog_ts.clear()
        self.next_ts()

    def make_entry(
        self,
        db: str,
        coll: str,
        op: str,
        document_key: dict[str, Any] | None,
        **extra: Any,
    ) -> OplogEntry:
        return OplogEntry(
            ts=self.next_ts(),
            db=db,
            coll=coll,
            op=op,
            document_key=document_key,
            wall_time=dt.datetime.now(dt.UTC).replace(tzinfo=None),
            **extra,
        )


def diff_documents(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """updateDescription for a change from `before` to `after`, with dotted paths into
    sub-documents the way MongoDB reports `$set` / `$inc` on nested fields."""
    updated: dict[str, Any] = {}
    removed: list[str] = []

    def walk(old: dict[str, Any], new: dict[str, Any], prefix: str) -> None:
        for key, value in new.items():
            path = prefix + key
            if key not in old:
                updated[path] = copy.deepcopy(value)
            elif isinstance(value, dict) and isinstance(old[key], dict):
                walk(old[key], value, path + ".")
            elif old[key] != value or type(old[key]) is not type(value):
                updated[path] = copy.deepcopy(value)
        for key in old:
            if key not in new:
                removed.append(prefix + key)

    walk(before, after, "")
    return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": []}


TTL_MONITOR_S = 60.0  # mongod's TTLMonitor pass interval (ttlMonitorSleepSecs)


def install_ttl_monitor() -> None:
    """mongomock expires TTL documents by scanning the collection on every access, which makes
    each lookup in a TTL collection cost its size. mongod removes expired documents in a pass
    every 60 seconds; do the same (idempotent)."""
    store_cls: Any = mongomock.store.CollectionStore
    if getattr(store_cls, "_reactor_ttl_paced", False):
        return
    scan = store_cls._remove_expired_documents

    def paced(self: Any) -> None:
        if not self._ttl_indexes:
            return
        now = time.monotonic()
        if now - getattr(self, "_reactor_ttl_at", float("-inf")) < TTL_MONITOR_S:
            return
        self._reactor_ttl_at = now
        scan(self)

    store_cls._remove_expired_documents = paced
    store_cls._reactor_ttl_paced = True
