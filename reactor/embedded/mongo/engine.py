"""The emulator's storage: mongomock's engine for documents, queries, updates and aggregation, plus
what mongomock lacks and MongoDB has — an oplog-like change log with cluster times, per-write
change events with `updateDescription`, pre-images, and fast paths for `_id` and indexed-equality
lookups (mongomock scans every document for every query).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import copy
import datetime as dt
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mongomock
import mongomock.aggregate
from bson import Timestamp
from mongomock import filtering

from .values import bson_type


def ts_to_int(ts: Timestamp) -> int:
    return (ts.time << 32) | ts.inc


def int_to_ts(value: int) -> Timestamp:
    return Timestamp(value >> 32, value & 0xFFFFFFFF)


_SCALAR_ID_TYPES = (str, int, float, bytes, dt.datetime, mongomock.ObjectId)


def _is_plain_value(value: Any) -> bool:
    return isinstance(value, _SCALAR_ID_TYPES) and not isinstance(value, bool)


def _equality_values(condition: Any) -> list[Any] | None:
    """Values a filter condition pins a field to, or None when it is not a plain equality/$in."""
    if _is_plain_value(condition):
        return [condition]
    if isinstance(condition, dict) and len(condition) == 1:
        ((op, arg),) = condition.items()
        if op == "$eq" and _is_plain_value(arg):
            return [arg]
        if op == "$in" and isinstance(arg, list) and all(_is_plain_value(v) for v in arg):
            return list(arg)
    return None


_mongomock_in = filtering._in_op
NOTHING: Any = vars(filtering)["NOTHING"]  # mongomock's "field absent" marker
_in_cache: list[Any] = [None, 0, None]  # the last $in list seen, its length, its value set


def _in_set(search_val: list[Any] | tuple[Any, ...]) -> frozenset[Any] | None:
    """The values of a long `$in` list as a set, prepared once per query (mongomock rescans
    the whole list for every document, which makes a 1,000-id match quadratic). None when
    the list holds something a set cannot answer for: regexes, documents or arrays."""
    if _in_cache[0] is search_val and _in_cache[1] == len(search_val):
        cached: frozenset[Any] | None = _in_cache[2]
        return cached
    values: frozenset[Any] | None = None
    if not any(isinstance(v, filtering._RE_TYPES) for v in search_val):
        try:
            values = frozenset(search_val)
        except TypeError:  # unhashable members (documents, arrays)
            values = None
    # Holding the list keeps its id from being reused by another one while it is cached.
    _in_cache[:] = [search_val, len(search_val), values]
    return values


def _fast_in(doc_val: Any, search_val: Any) -> bool:
    """mongomock's `$in` with the same answers, in O(1) per document for long plain lists."""
    if not isinstance(search_val, (list, tuple)) or len(search_val) < 16:
        return bool(_mongomock_in(doc_val, search_val))
    values = _in_set(search_val)
    if values is None:
        return bool(_mongomock_in(doc_val, search_val))
    if doc_val is NOTHING:
        return None in values
    for x in doc_val if isinstance(doc_val, (list, tuple)) else (doc_val,):
        try:
            if x in values:
                return True
        except TypeError:  # an unhashable document value: compare it the slow way
            if x in search_val:
                return True
    return False


# $$NOW and $$CLUSTER_TIME of the command being executed (mongod fixes both for a whole
# command). mongomock knows only $$ROOT and $$CURRENT; `install_system_variables` teaches its
# expression parser the other two.
_SYSTEM_VARIABLES: dict[str, Any] = {}


def install_system_variables() -> None:
    """Make `$$NOW` and `$$CLUSTER_TIME` resolve in aggregation, `$expr` and pipeline updates
    (idempotent)."""
    parser: Any = mongomock.aggregate._Parser
    if getattr(parser, "_reactor_system_variables", False):
        return
    original = parser._parse_basic_expression

    def parse_basic_expression(self: Any, expression: Any) -> Any:
        if isinstance(expression, str) and expression.startswith("$$"):
            name, _, rest = expression[2:].partition(".")
            if name in _SYSTEM_VARIABLES and name not in self._user_vars:
                if rest:
                    return mongomock.helpers.get_value_by_dot(_SYSTEM_VARIABLES[name], rest)
                return _SYSTEM_VARIABLES[name]
        return original(self, expression)

    parser._parse_basic_expression = parse_basic_expression
    parser._reactor_system_variables = True

    # $type (an aggregation expression since MongoDB 3.4), which mongomock lacks.
    if "$type" not in mongomock.aggregate.type_operators:
        mongomock.aggregate.type_operators.append("$type")
        handle_type = parser._handle_type_operator

        def handle_type_operator(self: Any, operator: str, values: Any) -> Any:
            if operator != "$type":
                return handle_type(self, operator, values)
            argument = values[0] if isinstance(values, list) and len(values) == 1 else values
            try:
                value = self.parse(argument)
            except KeyError:
                return "missing"
            return bson_type(value)

        parser._handle_type_operator = handle_type_operator

    # $mergeObjects as an expression (mongomock has it only as a $group accumulator).
    if "$mergeObjects" in mongomock.aggregate.object_operators:
        mongomock.aggregate.object_operators.remove("$mergeObjects")
        parse = parser.parse

        def parse_with_merge(self: Any, expression: Any) -> Any:
            if (
                isinstance(expression, dict)
                and len(expression) == 1
                and "$mergeObjects" in expression
            ):
                arguments = expression["$mergeObjects"]
                if not isinstance(arguments, list):
                    arguments = [arguments]
                merged: dict[str, Any] = {}
                for argument in arguments:
                    try:
                        value = self.parse(argument)
                    except KeyError:
                        continue  # missing: ignored, as null is
                    if value is None:
                        continue
                    if not isinstance(value, dict):
                        raise mongomock.OperationFailure(
                            f"$mergeObjects requires object inputs, but input {value!r} is of "
                            f"type {bson_type(value)}",
                            code=40400,
                        )
                    merged.update(value)
                return merged
            return parse(self, expression)

        parser.parse = parse_with_merge

    # Date arithmetic in $add and $subtract: date + ms -> date, date - date -> ms (a long),
    # date - ms -> date. mongomock's arithmetic accepts numbers only.
    if not getattr(parser, "_reactor_date_arithmetic", False):
        arithmetic = parser._handle_arithmetic_operator

        def handle_arithmetic(self: Any, operator: str, values: Any) -> Any:
            if operator in ("$add", "$subtract") and isinstance(values, list):
                try:
                    parsed = [self.parse(v) for v in values]
                except KeyError:
                    return None
                if any(isinstance(v, dt.datetime) for v in parsed):
                    return _date_arithmetic(operator, parsed)
            return arithmetic(self, operator, values)

        parser._handle_arithmetic_operator = handle_arithmetic
        parser._reactor_date_arithmetic = True


def _date_arithmetic(operator: str, values: list[Any]) -> Any:
    if any(v is None for v in values):
        return None
    if operator == "$add":
        dates = [v for v in values if isinstance(v, dt.datetime)]
        if len(dates) != 1:
            raise mongomock.OperationFailure(
                "only one date allowed in an $add expression", code=16612
            )
        ms = sum(v for v in values if not isinstance(v, dt.datetime))
        return _round_ms(dates[0] + dt.timedelta(milliseconds=ms))
    if len(values) != 2:
        raise mongomock.OperationFailure(
            "Expression $subtract takes exactly 2 arguments.", code=16020
        )
    a, b = values
    if isinstance(a, dt.datetime) and isinstance(b, dt.datetime):
        return int((a - b) / dt.timedelta(milliseconds=1))
    if isinstance(a, dt.datetime) and isinstance(b, int | float):
        return _round_ms(a - dt.timedelta(milliseconds=b))
    raise mongomock.OperationFailure(
        f"can't $subtract {bson_type(b)} from {bson_type(a)}", code=16556
    )


def _round_ms(value: dt.datetime) -> dt.datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def install_fast_operators() -> None:
    """Swap mongomock's `$in`/`$nin` matchers for the set-based ones (idempotent)."""
    operators = filtering._filterer_inst._operator_map
    operators["$in"] = _fast_in
    operators["$nin"] = lambda dv, sv: not _fast_in(dv, sv)


_SCALARS = (str, int, float, bytes, bool, type(None), mongomock.ObjectId)
# Values no write changes in place: a private copy of a document can share them.
_IMMUTABLE = (*_SCALARS, dt.datetime, Timestamp)


def clone(value: Any) -> Any:
    """A private copy of a stored value, as `copy.deepcopy` gives, several times cheaper for
    documents made of plain dicts, lists and scalars (everything else is deep-copied)."""
    if isinstance(value, _IMMUTABLE):
        return value
    kind = type(value)
    if kind is dict or kind is collections.OrderedDict:
        return kind((k, clone(v)) for k, v in value.items())
    if kind is list:
        return [clone(v) for v in value]
    return copy.deepcopy(value)


# ---- simple operator updates without mongomock's general update machinery --------------------
#
# A ledger row is written with `$set`/`$setOnInsert`/`$inc`/`$unset` on top-level fields of a
# document pinned by `_id`. mongomock runs that through its general path (positional
# operators, dotted paths, per-field BSON validation, datetime patching of the whole
# statement, deep copies), which makes each such write ~10x dearer than the work it does.
# Statements of exactly that simple shape are applied directly here, with the results mongomock
# gives (the same stored document, key order included: a test compares the two); anything else,
# dotted paths such as campaign counters and leases included, goes through mongomock.

_SIMPLE_UPDATE_OPS = frozenset({"$set", "$setOnInsert", "$inc", "$unset"})
# Query operators an upsert drops when it builds the new document (mongod and mongomock alike).
_DROPPED_QUERY_OPS = frozenset({"$lt", "$lte", "$gt", "$gte", "$ne"})


def _plain_field(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and "." not in name and not name.startswith("$")


def _stored_as_is(value: Any) -> bool:
    """True when mongomock would store `value` unchanged: no datetime it would convert or
    round, no zero Timestamp it would fill in, no field name it would refuse."""
    if isinstance(value, _SCALARS):
        return "\0" not in value if isinstance(value, str) else True
    if isinstance(value, dt.datetime):
        return value.tzinfo is None and value.microsecond % 1000 == 0
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and "\0" not in k and _stored_as_is(v) for k, v in value.items()
        )
    if isinstance(value, list):
        return all(_stored_as_is(v) for v in value)
    return False  # Timestamps, Decimal128, regexes, codes…: mongomock's own path


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def simple_update(update: Any) -> bool:
    """True when `update` is an operator update this module applies itself."""
    if not isinstance(update, dict) or not update:
        return False
    seen: set[str] = set()
    for op, spec in update.items():
        if op not in _SIMPLE_UPDATE_OPS or not isinstance(spec, dict) or not spec:
            return False
        for name, value in spec.items():
            if not _plain_field(name) or name == "_id" or name in seen:
                return False  # dotted paths, _id and conflicting operators: mongomock's path
            seen.add(name)
            if op == "$inc" and not _number(value):
                return False
            if op != "$unset" and not _stored_as_is(value):
                return False
    return True


def _apply_simple(doc: dict[str, Any], update: dict[str, Any], *, inserting: bool) -> bool:
    """Apply a `simple_update` to `doc` in place; False (and `doc` untouched) when an `$inc`
    meets a stored value that is not a number, which mongomock's path must report."""
    for name in update.get("$inc", {}):
        if name in doc and not _number(doc[name]):
            return False
    for op, spec in update.items():
        if op == "$setOnInsert" and not inserting:
            continue
        for name, value in spec.items():
            if op == "$inc":
                doc[name] = doc.get(name, 0) + value
            elif op == "$unset":
                doc.pop(name, None)
            else:
                doc[name] = clone(value)
    return True


def _upsert_seed(query: Any) -> dict[str, Any] | None:
    """The document an upsert starts from, for a query of plain equalities (one of them on
    `_id`) and dropped range conditions; None for anything richer."""
    if not isinstance(query, dict) or not _is_plain_value(query.get("_id")):
        return None
    seed: dict[str, Any] = collections.OrderedDict()
    for name, condition in query.items():
        if not _plain_field(name):
            return None
        if isinstance(condition, dict):
            if not condition or not set(condition) <= _DROPPED_QUERY_OPS:
                return None
            continue
        if not _is_plain_value(condition) or not _stored_as_is(condition):
            return None
        seed[name] = condition
    return seed


class FastCollection(mongomock.Collection):  # type: ignore[type-arg]
    """A mongomock collection that answers `_id` and indexed-field equality filters from a hash
    lookup instead of a full scan. Every candidate still goes through mongomock's matcher."""

    def update_simple(self, _id: Any, update: dict[str, Any]) -> bool:
        """Apply a `simple_update` to the document with this `_id` (which must exist); False
        when mongomock's path must do it instead."""
        if isinstance(_id, dict):
            return False  # stored under a hashable stand-in: mongomock's path
        store: Any = self._store
        doc: dict[str, Any] = store[_id]
        before = dict(doc)  # shallow: every change below replaces a top-level value
        if not _apply_simple(doc, update, inserting=False):
            return False
        try:
            self._ensure_uniques(doc)
        except mongomock.DuplicateKeyError:
            doc.clear()  # roll back, as mongomock does
            doc.update(before)
            raise
        return True

    def upsert_simple(self, query: Any, update: dict[str, Any]) -> tuple[bool, Any]:
        """Insert what an upsert of a `simple_update` that matched nothing inserts: (False,
        None) when the query is too rich for this path."""
        doc = _upsert_seed(query)
        if doc is None:
            return False, None
        if not _apply_simple(doc, update, inserting=True):
            return False, None  # an $inc of a field the query pins to a non-number
        store: Any = self._store
        if doc["_id"] in store:
            raise mongomock.DuplicateKeyError("E11000 Duplicate Key Error", 11000)
        store[doc["_id"]] = doc
        try:
            self._ensure_uniques(doc)
        except mongomock.DuplicateKeyError:
            del store[doc["_id"]]
            raise
        return True, doc["_id"]

    def _iter_documents(self, filter: dict[str, Any]) -> Iterator[dict[str, Any]]:
        candidates = self._candidates(filter) if isinstance(filter, dict) else None
        if candidates is None:
            yield from super()._iter_documents(filter)  # type: ignore[misc]
            return
        for doc in candidates:
            if filtering.filter_applies(filter, doc):
                yield doc

    def _candidates(self, filter: dict[str, Any]) -> list[dict[str, Any]] | None:
        store: Any = self._store
        if "_id" in filter:
            ids = _equality_values(filter["_id"])
            if ids is not None:
                out = []
                seen: set[Any] = set()
                for key in ids:
                    if key in seen:
                        continue
                    seen.add(key)
                    try:
                        out.append(store[key])
                    except KeyError:
                        continue
                return out
        if getattr(store, "_reactor_writing", False):
            return None  # documents change in place during a write: tables would be stale
        fields = getattr(store, "_reactor_fields", None)
        if not fields:
            return None
        version = getattr(store, "_reactor_version", 0)
        state: _IndexState | None = getattr(store, "_reactor_index", None)
        if state is None or state.version != version:
            state = _IndexState(version, set(fields))
            store._reactor_index = state
        for field_name, condition in filter.items():
            if field_name not in state.fields:
                continue
            values = _equality_values(condition)
            if values is None:
                continue
            table = state.table(field_name, store)
            if table is None:
                continue
            ids_in_order: list[tuple[int, Any]] = []
            for value in dict.fromkeys(values):
                ids_in_order.extend(table.get(value, ()))
            ids_in_order.sort(key=lambda pair: pair[0])
            out = []
            for _, key in ids_in_order:
                try:
                    out.append(store[key])
                except KeyError:
                    continue
            return out
        return None


@dataclass
class _IndexState:
    """Lazily built equality tables for one collection, valid for one write version."""

    version: int
    fields: set[str]
    tables: dict[str, dict[Any, list[tuple[int, Any]]] | None] = field(default_factory=dict)

    def table(self, name: str, store: Any) -> dict[Any, list[tuple[int, Any]]] | None:
        if name in self.tables:
            return self.tables[name]
        table: dict[Any, list[tuple[int, Any]]] | None = {}
        assert table is not None
        for position, doc in enumerate(store.documents):
            value = doc.get(name)
            if value is None:
                continue
            if not _is_plain_value(value):
                table = None  # arrays/sub-documents have richer equality: scan instead
                break
            table.setdefault(value, []).append((position, doc["_id"]))
        self.tables[name] = table
        return table


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


class HistoryLost(Exception):
    """Raised when a change stream asks to resume from a point that is no longer in the log."""


class Engine:
    """One mongomock client plus a change log shared by every connection of the emulator."""

    def __init__(self, *, oplog_limit: int = 200_000) -> None:
        install_fast_operators()
        install_system_variables()
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
        _SYSTEM_VARIABLES["NOW"] = self.now()
        _SYSTEM_VARIABLES["CLUSTER_TIME"] = int_to_ts(self.cluster_time)

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
        """Bracket a write: equality tables are neither used nor trusted while it runs."""
        store = self.client[db]._store[name]
        store._reactor_writing = True
        self.touch(db, name)
        try:
            yield
        finally:
            store._reactor_writing = False
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
