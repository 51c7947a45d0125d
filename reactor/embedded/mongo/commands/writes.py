"""insert, update, delete and findAndModify.

Per-statement failures are reported as mongod reports them: `ok: 1` with a `writeErrors` entry
per failed statement (index, code, codeName, errmsg); an ordered command stops at the first
failure, an unordered one goes on. findAndModify answers a failure as a command error. Every
change that lands is recorded in the oplog for the change streams, in statement order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import bson
import mongomock
from bson import ObjectId

from ..changestream import CommandError
from ..engine import OplogEntry, clone
from ..failpoints import CloseConnection
from ..wire import MAX_DOCUMENT_SIZE, Request
from .base import CommandsBase, Connection, StatementLog
from .errors import dup_key_error, engine_error, write_error
from .updating import Statement, StatementApplier, UpdateResult

# What an update statement may carry in mongod 7.0 (`sort` arrived in 8.0).
# Documents an insert writes between two turns of the event loop (see `_insert`).
INSERT_CHUNK = 16
UPDATE_STATEMENT_FIELDS = frozenset(
    {"q", "u", "multi", "upsert", "arrayFilters", "hint", "collation", "c", "upsertSupplied"}
)


class WriteCommands(CommandsBase):
    HANDLERS: ClassVar[dict[str, str]] = {
        "insert": "_insert",
        "update": "_update",
        "delete": "_delete",
        "findAndModify": "_find_and_modify",
        "findandmodify": "_find_and_modify",
    }

    @contextlib.contextmanager
    def _recording(self, entries: list[OplogEntry]) -> Iterator[None]:
        """Record the entries collected, also when the client is dropped part way through."""
        try:
            yield
        finally:
            self.engine.record(entries)

    def _statements(self, request: Request, field: str) -> tuple[str, list[Any], bool]:
        name = self._coll_name(request, next(iter(request.command)))
        statements = request.command.get(field)
        if not isinstance(statements, list):
            raise CommandError(9, f"BSON field '{field}' is missing but a required field")
        return name, statements, bool(request.command.get("ordered", True))

    def _failure(self, db: str, name: str, exc: Exception, doc: Any, command: str) -> CommandError:
        if isinstance(exc, mongomock.DuplicateKeyError):
            coll = self.engine.collection(db, name)
            return dup_key_error(db, name, coll, doc if isinstance(doc, dict) else {})
        return engine_error(exc, command)

    # ---- insert ------------------------------------------------------------------------------

    async def _insert(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name, docs, ordered = self._statements(request, "documents")
        coll = self.engine.collection(db, name)
        too_large = {
            i: n for i, n in request.large.get("documents", {}).items() if n > MAX_DOCUMENT_SIZE
        }
        n = 0
        errors: list[dict[str, Any]] = []
        log = self._statement_log(request)
        bypass = bool(request.command.get("bypassDocumentValidation"))
        stopped = False
        for start in range(0, max(len(docs), 1), INSERT_CHUNK):  # (none: still one pass)
            if start:
                # Other connections' commands run between chunks, as mongod runs them beside
                # a long insert: a 500-document batch does not hold every read behind it.
                await asyncio.sleep(0)
                coll = self.engine.collection(db, name)  # (dropped meanwhile: a new one)
            options = self.engine.collection_options.get((db, name)) or {}
            entries: list[OplogEntry] = []
            with self.engine.writing(db, name), self._recording(entries):
                for i in range(start, min(start + INSERT_CHUNK, len(docs))):
                    if log.previous(i) is not None:  # committed by an earlier attempt
                        n += 1
                        continue
                    raw = docs[i]
                    doc = dict(raw) if isinstance(raw, dict) else raw
                    try:
                        doc = _insertable(doc, too_large.get(i))
                        if options:
                            self.engine.validate(db, name, doc, bypass=bypass)
                        token = log.before_commit()
                        coll.insert_one(doc)
                        if options.get("capped") and _trim_capped(coll, options):
                            self.engine.touch(db, name)  # documents left outside the tables
                    except CloseConnection:
                        raise
                    except Exception as exc:
                        err = self._failure(db, name, exc, doc, "insert")
                        errors.append(write_error(i, err, **err.extra))
                        if ordered:
                            stopped = True
                            break
                        continue
                    n += 1
                    entries.append(
                        self.engine.make_entry(
                            db, name, "insert", {"_id": doc["_id"]}, full_document=clone(doc)
                        )
                    )
                    log.committed(i, True, token)
            if stopped:
                break
        reply: dict[str, Any] = {"n": n}
        if errors:
            reply["writeErrors"] = errors
        return reply

    # ---- update ------------------------------------------------------------------------------

    async def _update(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name, statements, ordered = self._statements(request, "updates")
        n = n_modified = 0
        upserted: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for stmt in statements:  # parsing the command, as mongod's IDL does: before any write
            unknown = sorted(set(stmt) - UPDATE_STATEMENT_FIELDS) if isinstance(stmt, dict) else []
            if unknown:
                raise CommandError(
                    40415,
                    f"BSON field 'update.updates.{unknown[0]}' is an unknown field.",
                    "Location40415",
                )
        log = self._statement_log(request)
        with self.engine.writing(db, name):
            applier = StatementApplier(
                self.engine,
                db,
                name,
                full_documents=False,
                bypass=bool(request.command.get("bypassDocumentValidation")),
            )
            large = request.large.get("updates", {})
            for i, stmt in enumerate(statements):
                q = stmt.get("q", {}) if isinstance(stmt, dict) else {}
                result = log.previous(i)  # committed by an earlier attempt
                if result is None:
                    try:
                        result = self._update_statement(applier, log, i, stmt, i in large)
                    except CloseConnection:
                        raise
                    except Exception as exc:
                        err = self._failure(db, name, exc, _written(q, stmt), "update")
                        errors.append(write_error(i, err, **err.extra))
                        if ordered:
                            break
                        continue
                n += result.matched
                n_modified += result.modified
                if result.upserted:
                    n += 1
                    upserted.append({"index": i, "_id": result.upserted_id})
        reply: dict[str, Any] = {"n": n, "nModified": n_modified}
        if upserted:
            reply["upserted"] = upserted
        if errors:
            reply["writeErrors"] = errors
        return reply

    def _update_statement(
        self, applier: StatementApplier, log: StatementLog, i: int, stmt: Any, large: bool
    ) -> UpdateResult:
        """Apply update statement `i`, record its changes, and log it as committed."""
        if not isinstance(stmt, dict):
            raise CommandError(14, "update statements must be objects")
        token = log.before_commit()
        result = applier.apply(
            Statement(
                q=stmt.get("q", {}),
                u=stmt.get("u"),
                multi=bool(stmt.get("multi")),
                upsert=bool(stmt.get("upsert")),
                array_filters=stmt.get("arrayFilters"),
                check_size=large,
            )
        )
        self.engine.record(result.entries)
        result.entries, result.images = [], []  # only the counts are kept
        log.committed(i, result, token)
        return result

    # ---- delete ------------------------------------------------------------------------------

    async def _delete(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name, statements, ordered = self._statements(request, "deletes")
        coll = self.engine.collection(db, name)
        n = 0
        errors: list[dict[str, Any]] = []
        log = self._statement_log(request)
        with self.engine.writing(db, name):
            for i, stmt in enumerate(statements):
                previous = log.previous(i)
                if previous is not None:  # committed by an earlier attempt
                    n += previous
                    continue
                try:
                    if not isinstance(stmt, dict) or not isinstance(stmt.get("q", {}), dict):
                        raise CommandError(14, "delete statements must be objects")
                    docs = list(coll._iter_documents(stmt.get("q", {})))
                    token = log.before_commit()
                except CloseConnection:
                    raise
                except Exception as exc:
                    err = engine_error(exc, "delete")
                    errors.append(write_error(i, err))
                    if ordered:
                        break
                    continue
                if stmt.get("limit", 0):
                    docs = docs[:1]
                entries = []
                for doc in docs:
                    pre = self._pre_image(db, name, doc)
                    coll.delete_one({"_id": doc["_id"]})
                    entries.append(
                        self.engine.make_entry(
                            db, name, "delete", {"_id": doc["_id"]}, pre_image=pre
                        )
                    )
                    n += 1
                self.engine.record(entries)
                log.committed(i, len(entries), token)
        reply: dict[str, Any] = {"n": n}
        if errors:
            reply["writeErrors"] = errors
        return reply

    def _pre_image(self, db: str, name: str, doc: dict[str, Any] | None) -> dict[str, Any] | None:
        if doc is None or (db, name) not in self.engine.pre_images_enabled:
            return None
        return clone(doc)

    # ---- findAndModify -----------------------------------------------------------------------

    async def _find_and_modify(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        command = request.command
        name = self._coll_name(request, next(iter(command)))
        q = command.get("query") or {}
        log = self._statement_log(request)
        previous = log.previous(0)
        if previous is not None:  # committed by an earlier attempt
            return dict(previous)
        with self.engine.writing(db, name):
            try:
                token = log.before_commit()
                if command.get("remove"):
                    reply = self._find_and_remove(db, name, command, q)
                else:
                    reply = self._find_and_update(db, name, command, q)
            except CloseConnection:
                raise
            except Exception as exc:
                err = self._failure(
                    db, name, exc, _written(q, {"u": command.get("update")}), "findAndModify"
                )
                raise err from exc
        log.committed(0, reply, token)
        return reply

    def _find_and_remove(
        self, db: str, name: str, command: dict[str, Any], q: dict[str, Any]
    ) -> dict[str, Any]:
        if command.get("update") is not None or command.get("new"):
            raise CommandError(9, "Cannot specify both remove and update/new")
        coll = self.engine.collection(db, name)
        sort = command.get("sort")
        found = list(coll.find(q, sort=list(sort.items()) if sort else None, limit=1))
        if not found:
            return {"lastErrorObject": {"n": 0}, "value": None}
        doc = found[0]
        coll.delete_one({"_id": doc["_id"]})
        self.engine.record(
            [
                self.engine.make_entry(
                    db,
                    name,
                    "delete",
                    {"_id": doc["_id"]},
                    pre_image=self._pre_image(db, name, doc),
                )
            ]
        )
        return {"lastErrorObject": {"n": 1}, "value": _project(coll, doc, command.get("fields"))}

    def _find_and_update(
        self, db: str, name: str, command: dict[str, Any], q: dict[str, Any]
    ) -> dict[str, Any]:
        if "update" not in command:
            raise CommandError(9, "Either an update or remove=true must be specified")
        # The reply needs the whole document only without an inclusion projection: with one,
        # the images hold the fields it names and those the update touches.
        keep = _included_fields(command.get("fields"))
        applier = StatementApplier(
            self.engine,
            db,
            name,
            full_documents=keep is None,
            bypass=bool(command.get("bypassDocumentValidation")),
            keep=keep or frozenset(),
        )
        result = applier.apply(
            Statement(
                q=q,
                u=command["update"],
                upsert=bool(command.get("upsert")),
                array_filters=command.get("arrayFilters"),
                sort=command.get("sort"),
            )
        )
        self.engine.record(result.entries)
        last_error: dict[str, Any] = {
            "n": result.matched or (1 if result.upserted else 0),
            "updatedExisting": bool(result.matched),
        }
        if result.upserted:
            last_error["upserted"] = result.upserted_id
        if not result.images:
            return {"lastErrorObject": last_error, "value": None}
        before, after = result.images[0]
        value = after if command.get("new") else before
        coll = self.engine.collection(db, name)
        return {
            "lastErrorObject": last_error,
            "value": _project(coll, value, command.get("fields")) if value is not None else None,
        }


def _included_fields(fields: Any) -> frozenset[str] | None:
    """The top-level fields an inclusion projection ({"a": 1, "b.c": 1}) returns; None for
    none, an exclusion or anything richer (then the whole document is needed)."""
    if not isinstance(fields, dict) or not fields:
        return None
    out: set[str] = set()
    for path, value in fields.items():
        if path == "_id":
            continue
        if not isinstance(path, str) or not path or path.startswith("$") or "$" in path:
            return None
        if value is not True and (isinstance(value, bool) or value not in (1, 1.0)):
            return None
        out.add(path.split(".", 1)[0])
    if not out and fields.get("_id") in (0, False):
        return None  # {"_id": 0}: an exclusion, everything else returned
    return frozenset(out)


def _project(coll: Any, doc: dict[str, Any], fields: dict[str, Any] | None) -> dict[str, Any]:
    """The reply's projection of `doc`, a private image of the write (never the stored document):
    projected first, so a large document's other fields are never copied."""
    if not fields:
        return doc
    return coll._copy_only_fields(doc, dict(fields), dict)


def _written(query: Any, statement: Any) -> dict[str, Any]:
    """What an update statement would have written, as far as the query's equalities and the
    fields it sets tell: the document a duplicate-key error is reported about."""
    doc: dict[str, Any] = {}
    if isinstance(query, dict):
        for key, value in query.items():
            if not key.startswith("$") and not (
                isinstance(value, dict) and any(str(k).startswith("$") for k in value)
            ):
                doc[key] = value
    update = statement.get("u") if isinstance(statement, dict) else None
    if isinstance(update, dict):
        if update and all(str(k).startswith("$") for k in update):
            for modifier in ("$set", "$setOnInsert"):
                if isinstance(update.get(modifier), dict):
                    doc.update(update[modifier])
        else:
            doc.update(update)
    return doc


def _trim_capped(coll: Any, options: dict[str, Any]) -> bool:
    """A capped collection drops its oldest documents once over `max` documents or `size`
    bytes, as mongod does (in insertion order)."""
    store = coll._store._documents
    before = len(store)
    limit = options.get("max")
    size = options.get("size")
    while isinstance(limit, int) and limit > 0 and len(store) > limit:
        store.popitem(last=False)
    if isinstance(size, int | float) and size > 0:
        total = sum(len(bson.encode(d)) for d in store.values())
        while total > size and len(store) > 1:
            _, oldest = store.popitem(last=False)
            total -= len(bson.encode(oldest))
    return len(store) < before


def _insertable(doc: Any, size: int | None) -> dict[str, Any]:
    """The document as mongod stores it (an `_id` first, generated when missing), or the error
    mongod gives for it: not an object, over 16 MiB (`size`, when the wire saw it so), an array
    `_id`, or an `_id` with `$`-prefixed fields."""
    if not isinstance(doc, dict):
        raise CommandError(14, "documents must be objects", "TypeMismatch")
    if size is not None:
        raise CommandError(
            10334,
            f"object to insert too large. size in bytes: {size}, max size: {MAX_DOCUMENT_SIZE}",
            "BSONObjectTooLarge",
        )
    if "_id" not in doc:
        doc = {"_id": ObjectId(), **doc}
    if isinstance(doc["_id"], list):
        raise CommandError(53, "can't use an array for _id", "InvalidIdField")
    if isinstance(doc["_id"], dict):
        dollar = next((k for k in doc["_id"] if k.startswith("$")), None)
        if dollar is not None:
            raise CommandError(
                52,
                f"_id fields may not contain '$'-prefixed fields: {dollar} is "
                "not valid for storage.",
                "DollarPrefixedFieldName",
            )
    return doc
