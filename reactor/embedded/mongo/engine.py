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
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import mongomock
import mongomock.aggregate
import mongomock.store
from bson import Binary, Timestamp
from mongomock import filtering

from .codes import CommandError
from .expressions import (
    LET_VARIABLES,
    SYSTEM_VARIABLES,
    install_expressions,
    install_fast_operators,
)
from .fastpath import FastCollection, IndexState, clone, simple_update

log = logging.getLogger(__name__)

__all__ = [
    "EXPANDED_OPS",
    "Engine",
    "FastCollection",
    "OplogEntry",
    "clone",
    "describe_update",
    "diff_documents",
    "simple_update",
]


def ts_to_int(ts: Timestamp) -> int:
    return (ts.time << 32) | ts.inc


def int_to_ts(value: int) -> Timestamp:
    return Timestamp(value >> 32, value & 0xFFFFFFFF)


@dataclass
class OplogEntry:
    ts: int
    db: str
    coll: str
    # insert | update | replace | delete | drop | dropDatabase | rename, and the events only
    # streams with showExpandedEvents see: create | createIndexes | dropIndexes | modify
    op: str
    document_key: dict[str, Any] | None
    wall_time: dt.datetime
    full_document: dict[str, Any] | None = None
    update_description: dict[str, Any] | None = None
    pre_image: dict[str, Any] | None = None
    post_image: dict[str, Any] | None = None  # kept where changeStreamPreAndPostImages is on
    collection_uuid: Binary | None = None
    description: dict[str, Any] | None = None  # operationDescription of a DDL event
    to: dict[str, Any] | None = None  # a rename's target namespace
    # updateDescription.disambiguatedPaths (shown with showExpandedEvents): each reported path
    # whose dotted form is ambiguous (a numeric field name, a dot in a name), as its components
    disambiguated: dict[str, list[Any]] | None = None


EXPANDED_OPS = frozenset({"create", "createIndexes", "dropIndexes", "modify"})


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
        # Set (and replaced) at each write's change entries: what an awaiting getMore waits on.
        self._changed = asyncio.Event()
        self.pre_images_enabled: set[tuple[str, str]] = set()
        self._uuids: dict[tuple[str, str], Binary] = {}
        # create / collMod options kept as given: capped, size, max, validator…
        self.collection_options: dict[tuple[str, str], dict[str, Any]] = {}
        # createIndexes options mongomock does not keep (background, weights, hidden…)
        self.index_options: dict[tuple[str, str, str], dict[str, Any]] = {}
        # Per collection, each index's key fields in order (`set_indexed_fields`).
        self.indexed_fields: dict[tuple[str, str], list[tuple[str, ...]]] = {}
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

    def begin_command(self, let: Any = None) -> None:
        """Fix $$NOW and $$CLUSTER_TIME for the command about to run, and its `let` variables
        (each evaluated once, as mongod does: constants and expressions of other variables)."""
        SYSTEM_VARIABLES["NOW"] = self.now()
        SYSTEM_VARIABLES["CLUSTER_TIME"] = int_to_ts(self.cluster_time)
        LET_VARIABLES.clear()
        if let is None:
            return
        if not isinstance(let, dict):
            raise CommandError(14, "BSON field 'let' is the wrong type, expected type 'object'")
        for name, value in let.items():
            if not isinstance(name, str) or not name[:1].islower() or not name.isidentifier():
                raise CommandError(
                    16866,
                    f"'{name}' starts with an invalid character for a user variable name",
                    "Location16866",
                )
            try:
                LET_VARIABLES[name] = mongomock.aggregate._Parser({}).parse(value)
            except (KeyError, ValueError, TypeError, NotImplementedError) as exc:
                raise CommandError(17276, f"Use of undefined variable: {exc}") from exc

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

    def collection_uuid(self, db: str, name: str) -> Binary:
        """The collection's UUID (a new one once it is dropped and made again)."""
        found = self._uuids.get((db, name))
        if found is None:
            found = self._uuids[(db, name)] = Binary.from_uuid(uuid.uuid4())
        return found

    def validate(
        self, db: str, name: str, doc: dict[str, Any], *, before: Any = None, bypass: bool = False
    ) -> None:
        """Document validation, as mongod applies a collection's validator: a write leaving a
        document that does not match it fails with DocumentValidationFailure (121), unless the
        write bypasses validation, the level is off, or (moderate) the document was already
        invalid before an update; with validationAction warn it is only logged."""
        options = self.collection_options.get((db, name))
        if not options or bypass or "validator" not in options:
            return
        level = options.get("validationLevel", "strict")
        validator = options["validator"]
        if level == "off" or filtering.filter_applies(validator, doc):
            return
        if (
            level == "moderate"
            and before is not None
            and not filtering.filter_applies(validator, before)
        ):
            return
        if options.get("validationAction", "error") == "warn":
            log.warning("document %r in %s.%s failed validation", doc.get("_id"), db, name)
            return
        error = CommandError(121, "Document failed validation", "DocumentValidationFailure")
        error.extra = {
            "errInfo": {
                "failingDocumentId": doc.get("_id"),
                "details": {
                    # mongod names the clauses that failed; the embedded server knows only that
                    # the document as a whole did not match
                    "operatorName": "$and",
                    "specifiedAs": validator,
                    "reason": "the document did not match the collection's validator",
                },
            }
        }
        raise error

    def forget_collection(self, db: str, name: str) -> None:
        self.collection_options.pop((db, name), None)
        for key in [k for k in self.index_options if k[:2] == (db, name)]:
            del self.index_options[key]
        self._uuids.pop((db, name), None)
        self.pre_images_enabled.discard((db, name))
        self.indexed_fields.pop((db, name), None)

    def touch(self, db: str, name: str) -> None:
        """Invalidate the equality tables of a collection."""
        store = self.client[db]._store[name]
        store._reactor_version = getattr(store, "_reactor_version", 0) + 1
        store._reactor_index = None
        store._reactor_fields = self.indexed_fields.get((db, name), [])

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
            if store._documents:
                # A collection a write filled goes on existing once emptied, as in mongod
                # (mongomock forgets a collection with no documents and no indexes).
                store._is_force_created = True
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
        """Note the collection's indexes' key fields (each index's leading ascending or
        descending keys), and build an equality table for every such field."""
        coll = self.collection(db, name)
        indexes: list[tuple[str, ...]] = []
        for info in coll.index_information().values():
            fields: list[str] = []
            for field_name, direction in info.get("key", []):
                if direction not in (1, -1) or "." in field_name:
                    # text, 2dsphere, hashed, or a path into sub-documents or arrays: no
                    # equality table (a table holds top-level values only)
                    break
                fields.append(field_name)
            if fields and fields[0] != "_id":
                indexes.append(tuple(fields))
        self.indexed_fields[(db, name)] = indexes
        self.touch(db, name)
        # Built now, as mongod builds an index when it is created, and patched by every write
        # from here on. Built on a field's first query instead, that query paid for a scan of
        # the whole collection (50 ms at 20,000 ledger rows) at whatever moment it came: under
        # load, the first webhook batch that looked a row up by address.
        store = self.client[db]._store[name]
        state = IndexState(store._reactor_version, {f for keys in indexes for f in keys})
        for field_name in sorted(state.fields):
            state.table(field_name, store)
        store._reactor_index = state

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
            self._changed.set()
            self._changed = asyncio.Event()

    def change_signal(self) -> asyncio.Event:
        """An event set by the next write that records change entries. Taken with no await
        after reading the log, it cannot miss a write in between (the loop is single-threaded);
        no lock is involved, so a cancelled waiter leaves nothing half-held."""
        return self._changed

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
            collection_uuid=self.collection_uuid(db, coll) if coll else None,
            **extra,
        )


def diff_documents(
    before: dict[str, Any], after: dict[str, Any], *, arrays: bool = False
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """updateDescription for a change from `before` to `after`, with dotted paths into
    sub-documents the way MongoDB reports `$set` / `$inc` on nested fields; with `arrays` (a
    pipeline update, which mongod diffs whole documents for), into arrays too, element by
    element, a shortened array reported in truncatedArrays. Also the ambiguous paths."""
    updated: dict[str, Any] = {}
    removed: list[str] = []
    truncated: list[dict[str, Any]] = []
    ambiguous: dict[str, list[Any]] = {}

    def path_of(parts: list[Any]) -> str:
        path = ".".join(str(p) for p in parts)
        if any(isinstance(p, str) and (p.isdigit() or "." in p) for p in parts):
            ambiguous[path] = list(parts)
        return path

    def walk_doc(old: dict[str, Any], new: dict[str, Any], parts: list[Any]) -> None:
        for key, value in new.items():
            here = [*parts, key]
            if key not in old:
                updated[path_of(here)] = copy.deepcopy(value)
            else:
                compare(old[key], value, here)
        for key in old:
            if key not in new:
                removed.append(path_of([*parts, key]))

    def walk_array(old: list[Any], new: list[Any], parts: list[Any]) -> None:
        if len(new) < len(old):
            truncated.append({"field": path_of(parts), "newSize": len(new)})
        for index, value in enumerate(new):
            here = [*parts, index]
            if index >= len(old):
                updated[path_of(here)] = copy.deepcopy(value)
            else:
                compare(old[index], value, here)

    def compare(old: Any, new: Any, parts: list[Any]) -> None:
        if isinstance(new, dict) and isinstance(old, dict):
            walk_doc(old, new, parts)
        elif arrays and isinstance(new, list) and isinstance(old, list):
            walk_array(old, new, parts)
        elif old != new or type(old) is not type(new):
            updated[path_of(parts)] = copy.deepcopy(new)

    walk_doc(before, after, [])
    description = {"updatedFields": updated, "removedFields": removed, "truncatedArrays": truncated}
    return description, ambiguous


def describe_update(
    update: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """updateDescription of an update by modifiers, as mongod logs it: the paths the modifiers
    name (array modifiers: the whole array), cut at the first part that did not exist before."""
    paths: set[str] = set()
    for modifier, args in update.items():
        if not isinstance(args, dict):
            continue
        for path in args:
            if "$" in path:  # positional: which elements changed is known only by comparing
                return diff_documents(before, after)
            paths.add(path)
            if modifier == "$rename" and isinstance(args[path], str):
                paths.add(args[path])
    updated: dict[str, Any] = {}
    removed: list[str] = []
    ambiguous: dict[str, list[Any]] = {}
    for path in sorted(paths):
        parts = _resolve(before, path.split("."), after)
        if parts is None:
            continue
        dotted = ".".join(str(p) for p in parts)
        if any(isinstance(p, str) and (p.isdigit() or "." in p) for p in parts):
            ambiguous[dotted] = parts
        old, new = _get(before, parts), _get(after, parts)
        if new is _ABSENT:
            if old is not _ABSENT:
                removed.append(dotted)
        elif old is _ABSENT or old != new or type(old) is not type(new):
            updated[dotted] = copy.deepcopy(new)
    return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": []}, ambiguous


_ABSENT = object()


def _resolve(before: Any, names: list[str], after: Any) -> list[Any] | None:
    """The path's parts (array indices as ints), cut after the first one `before` lacks."""
    parts: list[Any] = []
    node: Any = before
    for name in names:
        if isinstance(node, list) and name.isdigit():
            parts.append(int(name))
            node = node[int(name)] if int(name) < len(node) else _ABSENT
        elif isinstance(node, dict):
            parts.append(name)
            node = node.get(name, _ABSENT)
        else:
            return None if not parts else parts
        if node is _ABSENT:
            return parts
    return parts


def _get(doc: Any, parts: list[Any]) -> Any:
    node = doc
    for part in parts:
        if isinstance(part, int) and isinstance(node, list):
            node = node[part] if part < len(node) else _ABSENT
        elif isinstance(node, dict):
            node = node.get(part, _ABSENT)
        else:
            return _ABSENT
        if node is _ABSENT:
            return _ABSENT
    return node


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
