"""One update statement (of `update` or `findAndModify`) applied to a collection, as mongod does.

The statement is checked against MongoDB's update rules (`updates.py`) before the engine sees it,
and again against each document it is about to change. Each document's change is atomic: if the
engine fails halfway, the document is restored from the snapshot taken before, so a failed write
changes nothing. A multi-document update stops at the first failing document, keeping the
documents already updated, as mongod's multi-updates do.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import bson
import mongomock

from ..arrayfilters import filters_by_identifier, has_filtered_paths, resolve
from ..changestream import CommandError
from ..engine import Engine, OplogEntry, clone, describe_update, diff_documents, simple_update
from ..fastpath import pipeline_fields
from ..updates import (
    Target,
    UpdateKind,
    check_against,
    check_id_unchanged,
    check_operators,
    check_replacement,
    update_kind,
)
from ..wire import MAX_DOCUMENT_SIZE

Image = dict[str, Any] | None


@dataclass
class UpdateResult:
    matched: int = 0
    modified: int = 0
    upserted_id: Any = None
    upserted: bool = False  # (an upserted _id may be null)
    entries: list[OplogEntry] = field(default_factory=list)
    images: list[tuple[Image, Image]] = field(default_factory=list)  # (before, after) per doc


@dataclass
class Statement:
    q: dict[str, Any]
    u: Any
    multi: bool = False
    upsert: bool = False
    array_filters: Any = None
    sort: Any = None
    check_size: bool = False  # a large statement: its resulting document must fit 16 MiB


class StatementApplier:
    """Applies update statements to one collection of an engine."""

    def __init__(
        self,
        engine: Engine,
        db: str,
        name: str,
        *,
        full_documents: bool,
        bypass: bool = False,
        keep: frozenset[str] = frozenset(),
    ) -> None:
        # Top-level fields the images must hold besides those the update touches (what a
        # findAndModify's inclusion projection returns).
        self.keep = keep
        self.engine = engine
        self.db = db
        self.name = name
        self.coll: Any = engine.collection(db, name)
        self.pre_images = (db, name) in engine.pre_images_enabled
        # document validation: the whole document before and after is needed
        self.validating = "validator" in engine.collection_options.get((db, name), {})
        self.bypass = bypass
        self.full_documents = full_documents or self.pre_images or self.validating

    def apply(self, st: Statement) -> UpdateResult:
        if not isinstance(st.q, dict):
            raise CommandError(14, "query must be an object", "TypeMismatch")
        kind = update_kind(st.u)
        if st.array_filters is not None or has_filtered_paths(st.u):
            if kind != UpdateKind.OPERATORS:
                raise CommandError(
                    2, "arrayFilters may not be specified for pipeline-style or replacement updates"
                )
            return self._apply_filtered(st)
        if kind == UpdateKind.REPLACEMENT and st.multi:
            raise CommandError(9, "multi update is not supported for replacement-style update")
        pairs = check_operators(st.u) if kind == UpdateKind.OPERATORS else []
        # Plain $set/$setOnInsert/$inc/$unset of top-level fields skip mongomock's general
        # update path (see engine.simple_update); the results are the same.
        simple = kind == UpdateKind.OPERATORS and simple_update(st.u)
        ids = self._matching_ids(st)
        result = UpdateResult()
        # Only the fields an operator update can touch are copied for the change event: campaign
        # documents carry long target lists that no counter update should have to copy.
        touched = None
        if kind == UpdateKind.OPERATORS and not self.full_documents:
            touched = _touched_fields(st.u)
        elif kind == UpdateKind.PIPELINE and not self.full_documents:
            touched = pipeline_fields(st.u)
        if touched is not None:
            touched = touched | self.keep
        for _id in ids:
            self._update_one(st, kind, pairs, simple, touched, _id, result)
        if not ids and st.upsert:
            self._upsert(st, kind, pairs, simple, result)
        return result

    def _matching_ids(self, st: Statement) -> list[Any]:
        """The `_id`s the statement updates: in `sort` order if given, one unless `multi`."""
        if st.sort:
            ids = [d["_id"] for d in self.coll.find(st.q, {"_id": 1}, sort=list(st.sort.items()))]
        else:
            ids = [d["_id"] for d in self.coll._iter_documents(st.q)]
        return ids if st.multi else ids[:1]

    def _apply_filtered(self, st: Statement) -> UpdateResult:
        """An update with `$[]` / `$[<id>]` paths: resolved per document, then applied."""
        check_operators(st.u)
        filters = filters_by_identifier(st.array_filters, st.u)
        result = UpdateResult()
        ids = self._matching_ids(st)
        for _id in ids:
            key = _store_key(_id)
            concrete = resolve(st.u, filters, self.coll._store[key])
            if not concrete:  # matched, nothing to change
                result.matched += 1
                unchanged = clone(self.coll._store[key])
                result.images.append((unchanged, unchanged))
                continue
            one = dataclasses.replace(st, u=concrete, array_filters=None)
            self._update_one(one, UpdateKind.OPERATORS, check_operators(concrete), False, None,
                             _id, result)  # fmt: skip
        if not ids and st.upsert:
            concrete = resolve(st.u, filters, _seed(st.q))
            one = dataclasses.replace(st, u=concrete, array_filters=None)
            self._upsert(one, UpdateKind.OPERATORS, check_operators(concrete), False, result)
        return result

    def _update_one(
        self,
        st: Statement,
        kind: str,
        pairs: list[Target],
        simple: bool,
        touched: set[str] | None,
        _id: Any,
        result: UpdateResult,
    ) -> None:
        key = _store_key(_id)
        stored: dict[str, Any] = self.coll._store[key]
        if kind == UpdateKind.OPERATORS:
            check_against(stored, pairs, inserting=False)
        elif kind == UpdateKind.REPLACEMENT:
            check_replacement(st.u, _id)
        order = list(stored)
        before = _snapshot(stored, touched)
        target = _pinned(st, kind, _id)
        try:
            if kind == UpdateKind.REPLACEMENT:
                self.coll.replace_one(target, dict(st.u))
            elif kind == UpdateKind.PIPELINE and touched is not None:
                if not self.coll.update_pipeline(_id, st.u):
                    self.coll.update_one(target, st.u)
            elif not (simple and self.coll.update_simple(_id, st.u)):
                self.coll.update_one(target, st.u)
            after = _snapshot(self.coll._store[key], touched)
            check_id_unchanged(before, after)
            if self.validating:
                self.engine.validate(
                    self.db, self.name, self.coll._store[key], before=before, bypass=self.bypass
                )
            if st.check_size:
                _check_size(self.coll._store[key], "Resulting document after update is larger than")
        except BaseException:
            self._restore(key, order, before, touched)
            raise
        result.matched += 1
        result.images.append((before, after))
        if after == before:
            return
        result.modified += 1
        entry = self._oplog_entry(st, kind, _id, before, after)
        result.entries.append(entry)

    def _oplog_entry(
        self, st: Statement, kind: str, _id: Any, before: dict[str, Any], after: dict[str, Any]
    ) -> OplogEntry:
        """The change a modifying update records: a replace with the whole document, or an
        update with its description (a pipeline's diffed, since it names no fields)."""
        pre_image = clone(before) if self.pre_images else None
        post_image = clone(after) if self.pre_images else None
        if kind == UpdateKind.REPLACEMENT:
            return self.engine.make_entry(
                self.db,
                self.name,
                "replace",
                {"_id": _id},
                full_document=clone(after),
                pre_image=pre_image,
                post_image=post_image,
            )
        if kind == UpdateKind.PIPELINE:
            description, ambiguous = diff_documents(before, after, arrays=True)
        else:
            description, ambiguous = describe_update(st.u, before, after)
        return self.engine.make_entry(
            self.db,
            self.name,
            "update",
            {"_id": _id},
            update_description=description,
            disambiguated=ambiguous,
            pre_image=pre_image,
            post_image=post_image,
        )

    def _restore(
        self, key: Any, order: list[str], before: dict[str, Any], touched: set[str] | None
    ) -> None:
        """Put the document back as it was before a failed write (key order included)."""
        current: dict[str, Any] = self.coll._store[key]
        restored: dict[str, Any] = collections.OrderedDict()
        for name in order:
            if touched is None or name in touched or name == "_id":
                restored[name] = before[name]
            else:
                restored[name] = current[name]
        self.coll._store[key] = restored

    def _upsert(
        self,
        st: Statement,
        kind: str,
        pairs: list[Target],
        simple: bool,
        result: UpdateResult,
    ) -> None:
        if kind == UpdateKind.REPLACEMENT:
            doc = dict(st.u)
            if "_id" not in doc:
                q_id = st.q.get("_id")
                doc = {"_id": q_id if _id_is_plain(q_id) else mongomock.ObjectId(), **doc}
            check_replacement(doc, doc["_id"])
            self.coll.insert_one(doc)
            upserted_id = doc["_id"]
        else:
            if kind == UpdateKind.OPERATORS:
                check_against(_seed(st.q), pairs, inserting=True)
            done, upserted_id = self.coll.upsert_simple(st.q, st.u) if simple else (False, None)
            if not done:
                # mongomock builds the new document aside and inserts it last: a failure
                # leaves nothing behind.
                upserted_id = self.coll.update_one(st.q, st.u, upsert=True).upserted_id
                if "_id" in st.q and st.q["_id"] is None:
                    self._null_id(upserted_id)
                    upserted_id = None
        # The store keys a document _id by its hashable form, as mongomock does.
        key = _store_key(upserted_id)
        try:
            if st.check_size:
                _check_size(self.coll._store[key], "object to insert too large. max size:")
            if self.validating:
                self.engine.validate(self.db, self.name, self.coll._store[key], bypass=self.bypass)
        except CommandError:
            self.coll.delete_one({"_id": upserted_id})  # nothing left behind
            raise
        after = _snapshot(self.coll._store[key], None)
        result.upserted_id = upserted_id
        result.upserted = True
        result.entries.append(
            self.engine.make_entry(
                self.db, self.name, "insert", {"_id": upserted_id}, full_document=clone(after)
            )
        )
        result.images.append((None, after))

    def _null_id(self, generated: Any) -> None:
        """An upsert whose query pins `_id: null` inserts `_id: null`, as mongod does
        (mongomock made an ObjectId up)."""
        store: Any = self.coll._store
        doc = store[generated]
        del store[generated]
        if None in store:
            raise mongomock.DuplicateKeyError("E11000 duplicate key error dup key: { _id: null }")
        doc["_id"] = None
        store[None] = doc


def _store_key(_id: Any) -> Any:
    """The key mongomock's store files a document under (a sub-document `_id` hashed)."""
    return mongomock.helpers.hashdict(_id) if isinstance(_id, dict) else _id


def _check_size(doc: dict[str, Any], message: str) -> None:
    """mongod's 16 MiB document limit on what a write leaves."""
    size = len(bson.encode(doc))
    if size > MAX_DOCUMENT_SIZE:
        raise CommandError(
            10334, f"{message} {MAX_DOCUMENT_SIZE} (size: {size})", "BSONObjectTooLarge"
        )


def _seed(query: dict[str, Any]) -> dict[str, Any]:
    """The document an upsert starts from: the query's equality conditions, as nested fields."""
    seed: dict[str, Any] = {}
    for name, condition in query.items():
        if name.startswith("$"):
            continue
        if isinstance(condition, dict) and any(str(k).startswith("$") for k in condition):
            if "$eq" not in condition:
                continue
            condition = condition["$eq"]
        node = seed
        parts = name.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = condition
    return seed


def _snapshot(doc: dict[str, Any], fields: set[str] | None) -> dict[str, Any]:
    """A private copy of a stored document (or of only its top-level `fields`, plus _id)."""
    if fields is None:
        return clone(doc)
    return {k: clone(v) for k, v in doc.items() if k in fields or k == "_id"}


def _touched_fields(update: dict[str, Any]) -> set[str] | None:
    """Top-level fields an operator update may change; None when that cannot be told."""
    fields: set[str] = set()
    for op, spec in update.items():
        if not isinstance(spec, dict):
            return None
        for path in spec:
            fields.add(path.split(".", 1)[0])
        if op == "$rename":
            fields.update(str(v).split(".", 1)[0] for v in spec.values())
    return fields


def _id_is_plain(value: Any) -> bool:
    return value is not None and not isinstance(value, dict)


def _pinned(st: Statement, kind: str, _id: Any) -> dict[str, Any]:
    """The filter that pins the document by _id (the engine's fast path). An operator update
    keeps the statement's own filter, for its positional operators; a replacement or a pipeline
    has none, and the filter was just evaluated on this document within this command."""
    if kind != UpdateKind.OPERATORS:
        return {"_id": _id}
    if "_id" in st.q:
        return {"_id": _id, "$and": [st.q]}
    return {**st.q, "_id": _id}
