"""The emulator's fast paths around mongomock, with mongomock's answers: `_id` and
indexed-equality lookups from hash tables instead of full scans, cheap BSON-shaped copies, and
plain top-level `$set`/`$setOnInsert`/`$inc`/`$unset` updates applied directly."""

from __future__ import annotations

import bisect
import collections
import copy
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mongomock
from bson import Timestamp
from mongomock import aggregate, filtering, helpers

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


_RANGE = {
    "$gt": lambda v, a: v > a,
    "$gte": lambda v, a: v >= a,
    "$lt": lambda v, a: v < a,
    "$lte": lambda v, a: v <= a,
}
Reject = tuple[str, Any, Any]  # field, how to test, the argument


def _quick_rejects(filter: dict[str, Any]) -> list[Reject]:
    """Tests that turn a candidate down without mongomock's general matcher (several µs a
    document): a top-level field pinned to a string (or strings), or bounded by dates. Each one
    rejects only a document whose value has the condition's exact type, where MongoDB's
    comparison is Python's (strings compare by code point, no collation; dates by instant);
    any other value (an array, a number, a missing field) goes to the matcher, which decides
    every document that is not rejected here."""
    out: list[Reject] = []
    for name, condition in filter.items():
        if name.startswith("$") or "." in name:
            continue
        if type(condition) is str:
            out.append((name, "eq", condition))
            continue
        bounds = _date_bounds(condition)
        if bounds is not None:
            out.extend((name, test, a) for test, a in bounds)
        elif type(condition) is dict and len(condition) == 1 and "$in" in condition:
            values = condition["$in"]
            if isinstance(values, list) and values and all(type(v) is str for v in values):
                out.append((name, "in", frozenset(values)))
    return out


def _rejected(doc: dict[str, Any], rejects: list[Reject]) -> bool:
    for name, test, arg in rejects:
        value = doc.get(name)
        if test == "eq":
            if type(value) is str and value != arg:
                return True
        elif test == "in":
            if type(value) is str and value not in arg:
                return True
        elif (
            type(value) is dt.datetime
            and (value.tzinfo is None) == (arg.tzinfo is None)
            and not test(value, arg)
        ):
            return True
    return False


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


_FIELD_STAGES = frozenset({"$set", "$addFields"})


def pipeline_fields(pipeline: Any) -> set[str] | None:
    """The top-level fields an update pipeline of `$set`/`$addFields` stages may change (each
    stage sets only the fields it names, and "$$REMOVE" removes only those); None for any other
    shape (`$project`, `$replaceWith`, `$unset`, ...), which may touch anything."""
    if not isinstance(pipeline, list) or not pipeline:
        return None
    fields: set[str] = set()
    for stage in pipeline:
        if not isinstance(stage, dict) or len(stage) != 1:
            return None
        ((name, spec),) = stage.items()
        if name not in _FIELD_STAGES or not isinstance(spec, dict) or not spec:
            return None
        for path in spec:
            if not isinstance(path, str) or not path or path.startswith("$"):
                return None
            fields.add(path.split(".", 1)[0])
    return fields


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

    def update_pipeline(self, _id: Any, pipeline: list[dict[str, Any]]) -> bool:
        """Apply an update pipeline of `$set`/`$addFields` stages to the document with this
        `_id` (which must exist) without mongomock's deep copy of the whole document: those
        stages copy the document shallowly and replace top-level values, so a counter update of
        a campaign carrying a long target list costs what the fields it sets cost. False when
        mongomock's path must do it instead. The caller keeps the copies for a rollback."""
        if isinstance(_id, dict) or pipeline_fields(pipeline) is None:
            return False
        store: Any = self._store
        doc: dict[str, Any] = store[_id]
        stages = helpers.patch_datetime_awareness_in_document(pipeline)
        [new] = aggregate.process_pipeline([doc], self.database, stages, None)
        before = dict(doc)
        doc.clear()
        doc.update(new)
        try:
            self._ensure_uniques(doc)
        except mongomock.DuplicateKeyError:
            doc.clear()
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
        rejects = _quick_rejects(filter)
        for doc in candidates:
            if rejects and _rejected(doc, rejects):
                continue
            if filtering.filter_applies(filter, doc):
                yield doc

    def _candidates(self, filter: dict[str, Any]) -> list[dict[str, Any]] | None:
        store: Any = self._store
        if "_id" in filter:
            ids = _equality_values(filter["_id"])
            if ids is not None:
                documents = _documents(store)
                out = []
                seen: set[Any] = set()
                for key in ids:
                    if key in seen:
                        continue
                    seen.add(key)
                    doc = documents.get(key)
                    if doc is not None:
                        out.append(doc)
                return out
        if getattr(store, "_reactor_writing", False):
            return None  # documents change in place during a write: tables would be stale
        indexes: list[tuple[str, ...]] | None = getattr(store, "_reactor_fields", None)
        if not indexes:
            return None
        version = getattr(store, "_reactor_version", 0)
        state: IndexState | None = getattr(store, "_reactor_index", None)
        if state is None or state.version != version:
            state = IndexState(version, {f for keys in indexes for f in keys})
            store._reactor_index = state
        best = _narrowest(filter, indexes, state, store)
        if best is None:
            return None
        table, values = best
        ids_in_order: list[tuple[int, Any]] = []
        for value in values:
            ids_in_order.extend(table.get(value, ()))
        ids_in_order.sort(key=lambda pair: pair[0])
        documents = _documents(store)
        out = []
        for _, key in ids_in_order:
            doc = documents.get(key)
            if doc is not None:
                out.append(doc)
        return out


def _documents(store: Any) -> dict[Any, dict[str, Any]]:
    """The store's documents, read directly: `store[key]` runs the TTL pass and takes
    mongomock's thread lock once per key, which made a lookup of thousands of candidates cost
    more than matching them (the pass runs once here; the emulator serves from one thread)."""
    store._remove_expired_documents()
    documents: dict[Any, dict[str, Any]] = store._documents
    return documents


def _narrowest(
    filter: dict[str, Any], indexes: list[tuple[str, ...]], state: IndexState, store: Any
) -> tuple[dict[Any, list[tuple[int, Any]]], list[Any]] | None:
    """The equality table (and the values looked up in it) that yields the fewest candidates,
    among the fields an index could serve by equality: those of an index's leading keys that
    the filter pins, every key before them pinned too (mongod uses {campaign: 1, customer: 1}
    for a filter on both, never for one on `customer` alone), or by a date range on its first
    key. None when no field qualifies."""
    pinned: dict[str, list[Any]] = {}
    for field_name, condition in filter.items():
        values = _equality_values(condition)
        if values is not None:
            pinned[field_name] = list(dict.fromkeys(values))
    usable: list[str] = []
    for keys in indexes:
        for key in keys:
            if key not in pinned:
                break
            if key not in usable:
                usable.append(key)
    best: tuple[int, dict[Any, list[tuple[int, Any]]], list[Any]] | None = None
    for field_name in usable:
        table = state.table(field_name, store)
        if table is None:
            continue
        size = sum(len(table.get(v, ())) for v in pinned[field_name])
        if best is None or size < best[0]:
            best = (size, table, pinned[field_name])
    # A date range on an index's first key (mongod scans that index between the bounds): the
    # table's dates within them. Only a date can meet a date bound, and a field with an array
    # anywhere has no table.
    for keys in indexes:
        bounds = _date_bounds(filter.get(keys[0])) if keys and keys[0] not in pinned else None
        if bounds is None:
            continue
        table = state.table(keys[0], store)
        if table is None:
            continue
        try:
            within = [
                v for v in table if type(v) is dt.datetime and all(test(v, a) for test, a in bounds)
            ]
        except TypeError:  # dates with and without a zone: no table answer
            continue
        size = sum(len(table[v]) for v in within)
        if best is None or size < best[0]:
            best = (size, table, within)
    return (best[1], best[2]) if best is not None else None


def _date_bounds(condition: Any) -> list[tuple[Any, dt.datetime]] | None:
    if type(condition) is not dict or not condition:
        return None
    if not all(op in _RANGE and type(a) is dt.datetime for op, a in condition.items()):
        return None
    return [(_RANGE[op], a) for op, a in condition.items()]


@dataclass
class IndexState:
    """Equality tables for one collection (built when its indexes are declared, or on a field's
    first query after an invalidation), valid for one write version, and patched by the writes
    that follow (the keys they changed) instead of rebuilt."""

    version: int
    fields: set[str]
    tables: dict[str, dict[Any, list[tuple[int, Any]]] | None] = field(default_factory=dict)
    # Per built table: each document's value and position (natural order), and the next one.
    values: dict[str, dict[Any, Any]] = field(default_factory=dict)
    positions: dict[str, dict[Any, int]] = field(default_factory=dict)
    next_position: dict[str, int] = field(default_factory=dict)

    def table(self, name: str, store: Any) -> dict[Any, list[tuple[int, Any]]] | None:
        if name in self.tables:
            return self.tables[name]
        table: dict[Any, list[tuple[int, Any]]] | None = {}
        assert table is not None
        values: dict[Any, Any] = {}
        positions: dict[Any, int] = {}
        position = -1
        for position, doc in enumerate(store.documents):
            positions[doc["_id"]] = position
            value = doc.get(name)
            if value is None:
                continue
            if not _is_plain_value(value):
                table = None  # arrays/sub-documents have richer equality: scan instead
                break
            table.setdefault(value, []).append((position, doc["_id"]))
            values[doc["_id"]] = value
        self.tables[name] = table
        if table is not None:
            self.values[name], self.positions[name] = values, positions
            self.next_position[name] = position + 1
        return table

    def patch(self, store: Any, keys: list[Any]) -> bool:
        """Bring the built tables up to date for the documents `keys` names (changed, added or
        removed); False when one no longer fits a table (the caller rebuilds)."""
        documents = store._documents  # not `store[...]`: no TTL pass, no lock per key
        for name, table in list(self.tables.items()):
            if table is None:
                continue
            values, positions = self.values[name], self.positions[name]
            for key in dict.fromkeys(keys):
                old = values.pop(key, None)
                if old is not None:
                    bucket = table.get(old, [])
                    # Buckets are sorted by position and positions are unique: find the pair
                    # by bisection (a status shared by thousands of documents must not cost a
                    # scan of them all per write).
                    i = bisect.bisect_left(bucket, (positions.get(key, -1),))
                    if i < len(bucket) and bucket[i][1] == key:
                        del bucket[i]
                    else:
                        bucket[:] = [pair for pair in bucket if pair[1] != key]
                    if not bucket:
                        table.pop(old, None)
                doc = documents.get(key)
                if doc is None:
                    positions.pop(key, None)
                    continue
                if key not in positions:
                    positions[key] = self.next_position[name]
                    self.next_position[name] += 1
                value = doc.get(name)
                if value is None:
                    continue
                if not _is_plain_value(value):
                    return False
                bucket = table.setdefault(value, [])
                position = positions[key]
                bucket.insert(bisect.bisect_left(bucket, (position,)), (position, key))
                values[key] = value
        return True
