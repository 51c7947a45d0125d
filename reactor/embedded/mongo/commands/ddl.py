"""Databases, collections and indexes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import mongomock
from mongomock import filtering

from ..changestream import CommandError
from ..fastpath import FastCollection
from ..indexspec import check_partial_filter, text_index_options
from ..wire import Request
from .base import CommandsBase, Connection

# Index options mongod keeps and lists that mongomock does not.
KEPT_INDEX_OPTIONS = frozenset(
    {"background", "hidden", "weights", "default_language", "language_override", "collation",
     "storageEngine", "2dsphereIndexVersion", "textIndexVersion", "bits", "min", "max"}
)  # fmt: skip
# create options listed back by listCollections (and, for collMod, changed by it).
_CREATE_OPTIONS = ("capped", "size", "max", "validator", "validationLevel", "validationAction")


def _collection_options(command: dict[str, Any], modifying: bool = False) -> dict[str, Any]:
    options = {k: command[k] for k in _CREATE_OPTIONS if k in command}
    if modifying:
        options.pop("capped", None)
    if options.get("capped") and not isinstance(options.get("size"), int | float):
        raise CommandError(72, "the 'size' field is required when 'capped' is true")
    validator = options.get("validator")
    if validator is not None:
        if not isinstance(validator, dict):
            raise CommandError(14, "'validator' must be an object", "TypeMismatch")
        if "$jsonSchema" in repr(validator):
            raise CommandError(
                115, "$jsonSchema validators are not supported by the embedded server"
            )
        try:
            filtering.filter_applies(validator, {})
        except (mongomock.OperationFailure, NotImplementedError, TypeError, ValueError) as exc:
            raise CommandError(2, f"invalid validator: {exc}") from exc
    if options.get("validationLevel", "strict") not in ("off", "strict", "moderate"):
        raise CommandError(2, "validationLevel must be off, strict or moderate")
    if options.get("validationAction", "error") not in ("error", "warn"):
        raise CommandError(2, "validationAction must be error or warn")
    return options


def _index_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The options that make two indexes of one key different indexes to mongod."""
    out = {
        k: spec[k]
        for k in ("unique", "sparse", "expireAfterSeconds", "partialFilterExpression")
        if spec.get(k) not in (None, False)
    }
    if "expireAfterSeconds" in out:
        out["expireAfterSeconds"] = int(out["expireAfterSeconds"])
    return out


def _check_same_index(
    existing: dict[str, Any], index_name: str, key: dict[str, Any], spec: dict[str, Any]
) -> None:
    """An index of this name exists: creating it again is a no-op only if it is the same index
    (same key, same options), else mongod refuses."""
    if existing.get("key") != list(key.items()):
        raise CommandError(
            86,
            f"An existing index has the same name as the requested index: {index_name}",
            "IndexKeySpecsConflict",
        )
    if _index_options(existing) != _index_options(spec):
        raise CommandError(
            85,
            "An equivalent index already exists with the same name but different "
            f"options. Requested index: {index_name}",
            "IndexOptionsConflict",
        )


class DdlCommands(CommandsBase):
    HANDLERS: ClassVar[dict[str, str]] = {
        "listDatabases": "_list_databases",
        "listCollections": "_list_collections",
        "create": "_create",
        "collMod": "_coll_mod",
        "drop": "_drop",
        "dropDatabase": "_drop_database",
        "createIndexes": "_create_indexes",
        "listIndexes": "_list_indexes",
        "dropIndexes": "_drop_indexes",
        "renameCollection": "_rename_collection",
    }

    async def _list_databases(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        names = self.engine.client.list_database_names()
        name_only = bool(request.command.get("nameOnly"))
        dbs = [
            {"name": n} if name_only else {"name": n, "sizeOnDisk": 0, "empty": False}
            for n in names
        ]
        flt = request.command.get("filter")
        if flt:
            dbs = [d for d in dbs if filtering.filter_applies(flt, d)]
        return {"databases": dbs, "totalSize": 0}

    async def _list_collections(
        self, request: Request, conn: Connection, db: str
    ) -> dict[str, Any]:
        names = (
            self.engine.client[db].list_collection_names()
            if db in self.engine.client.list_database_names()
            else []
        )
        infos = []
        for n in sorted(names):
            options: dict[str, Any] = dict(self.engine.collection_options.get((db, n), {}))
            if (db, n) in self.engine.pre_images_enabled:
                options["changeStreamPreAndPostImages"] = {"enabled": True}
            infos.append(
                {
                    "name": n,
                    "type": "collection",
                    "options": options,
                    "info": {"readOnly": False},
                    "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"},
                }
            )
        flt = request.command.get("filter")
        if flt:
            infos = [i for i in infos if filtering.filter_applies(flt, i)]
        if request.command.get("nameOnly"):
            infos = [{"name": i["name"], "type": i["type"]} for i in infos]
        return self._cursor_reply(f"{db}.$cmd.listCollections", infos, request.command)

    async def _create(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "create")
        if self.engine.collection_exists(db, name):
            raise CommandError(48, f"Collection {db}.{name} already exists.")
        command = request.command
        if "viewOn" in command:
            # Refused rather than made a plain collection that would answer queries wrongly.
            raise CommandError(115, "views are not supported by the embedded server")
        options = _collection_options(command)
        self.engine.client[db].create_collection(name)
        self._set_pre_images(db, name, request.command)
        if options:
            self.engine.collection_options[(db, name)] = options
        description = {"idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}}
        self._ddl_event(db, name, "create", description)
        return {}

    def _ddl_event(self, db: str, name: str, op: str, description: dict[str, Any]) -> None:
        """Record a DDL change, which only change streams with showExpandedEvents report."""
        self.engine.record([self.engine.make_entry(db, name, op, None, description=description)])

    async def _coll_mod(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "collMod")
        if not self.engine.collection_exists(db, name):
            raise CommandError(26, f"ns does not exist: {db}.{name}")
        self._set_pre_images(db, name, request.command)
        reply: dict[str, Any] = {}
        if "index" in request.command:
            reply = self._coll_mod_index(db, name, request.command["index"])
        updates = _collection_options(request.command, modifying=True)
        if updates:
            self.engine.collection_options.setdefault((db, name), {}).update(updates)
        changed = {k: v for k, v in request.command.items() if k != "collMod" and k[0] != "$"}
        for session_field in ("lsid", "txnNumber", "writeConcern", "comment"):
            changed.pop(session_field, None)
        self._ddl_event(db, name, "modify", changed)
        return reply

    def _coll_mod_index(self, db: str, name: str, spec: Any) -> dict[str, Any]:
        """collMod's `index: {name | keyPattern, expireAfterSeconds}`: a TTL index's expiry
        changed in place, as mongod does (its reply names the old and new values)."""
        if not isinstance(spec, dict):
            raise CommandError(14, "index must be an object", "TypeMismatch")
        store: Any = self.engine.collection(db, name)._store
        found = None
        for index_name, info in store.indexes.items():
            if spec.get("name") == index_name or (
                isinstance(spec.get("keyPattern"), dict)
                and list(spec["keyPattern"].items()) == info.get("key")
            ):
                found = index_name
        if found is None:
            raise CommandError(27, f"cannot find index {spec!r} for ns {db}.{name}")
        reply: dict[str, Any] = {}
        if "expireAfterSeconds" in spec:
            new = spec["expireAfterSeconds"]
            if not isinstance(new, int | float) or isinstance(new, bool) or new < 0:
                raise CommandError(2, "expireAfterSeconds must be a non-negative number")
            info = store.indexes[found]
            if info.get("expireAfterSeconds") is None:
                raise CommandError(72, "no expireAfterSeconds field to update")
            reply = {"expireAfterSeconds_old": info["expireAfterSeconds"]}
            info["expireAfterSeconds"] = int(new)
            store._ttl_indexes[found] = info
            reply["expireAfterSeconds_new"] = int(new)
        return reply

    def _set_pre_images(self, db: str, name: str, command: dict[str, Any]) -> None:
        option = command.get("changeStreamPreAndPostImages")
        if isinstance(option, dict):
            if option.get("enabled"):
                self.engine.pre_images_enabled.add((db, name))
            else:
                self.engine.pre_images_enabled.discard((db, name))

    async def _drop(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "drop")
        if not self.engine.collection_exists(db, name):
            return {"nIndexesWas": 0}
        coll = self.engine.collection(db, name)
        n_indexes = len(coll.index_information())
        self._drop_collection(db, name)
        return {"nIndexesWas": n_indexes, "ns": f"{db}.{name}"}

    def _drop_collection(self, db: str, name: str) -> None:
        self.engine.touch(db, name)
        self.engine.client[db].drop_collection(name)
        entry = self.engine.make_entry(db, name, "drop", None)
        self.engine.forget_collection(db, name)
        self.engine.record([entry])

    async def _rename_collection(
        self, request: Request, conn: Connection, db: str
    ) -> dict[str, Any]:
        if db != "admin":
            raise CommandError(13, "renameCollection may only be run against the admin database.")
        command = request.command
        source, target = command.get("renameCollection"), command.get("to")
        if not isinstance(source, str) or not isinstance(target, str):
            raise CommandError(2, "renameCollection and to must be namespace strings")
        (src_db, _, src), (dst_db, _, dst) = source.partition("."), target.partition(".")
        if not src or not dst:
            raise CommandError(73, f"Invalid target namespace: {target}", "InvalidNamespace")
        if not self.engine.collection_exists(src_db, src):
            raise CommandError(26, f"Source collection {source} does not exist")
        if source == target:
            raise CommandError(20, "Can't rename a collection to itself")
        description: dict[str, Any] = {"to": {"db": dst_db, "coll": dst}}
        if self.engine.collection_exists(dst_db, dst):
            if not command.get("dropTarget"):
                raise CommandError(48, "target namespace exists", "NamespaceExists")
            description["dropTarget"] = self.engine.collection_uuid(dst_db, dst)
            self._drop_collection(dst_db, dst)
        source_coll = self.engine.collection(src_db, src)
        indexes = [
            (info["key"], name, {k: info[k] for k in ("unique", "sparse", "expireAfterSeconds",
                                                      "partialFilterExpression") if k in info})
            for name, info in source_coll.index_information().items()
            if name != "_id_"
        ]  # fmt: skip
        documents: list[tuple[Any, Any]] = list(source_coll._store._documents.items())
        pre_images = (src_db, src) in self.engine.pre_images_enabled
        uuid = self.engine.collection_uuid(src_db, src)
        self.engine.touch(src_db, src)
        self.engine.client[src_db].drop_collection(src)
        entry = self.engine.make_entry(
            src_db, src, "rename", None, to=dict(description["to"]), description=description
        )
        kept_options = self.engine.collection_options.get((src_db, src))
        kept_index_options = {
            k[2]: v for k, v in self.engine.index_options.items() if k[:2] == (src_db, src)
        }
        self.engine.forget_collection(src_db, src)
        self.engine.client[dst_db].create_collection(dst)
        if kept_options:
            self.engine.collection_options[(dst_db, dst)] = kept_options
        for index_name, extra in kept_index_options.items():
            self.engine.index_options[(dst_db, dst, index_name)] = extra
        moved = self.engine.collection(dst_db, dst)
        for key, name, options in indexes:
            moved.create_index(key, name=name, **options)
        if documents:
            moved._store._documents.update(documents)
        self.engine._uuids[(dst_db, dst)] = uuid  # a rename keeps the collection's UUID
        if pre_images:
            self.engine.pre_images_enabled.add((dst_db, dst))
        self.engine.set_indexed_fields(dst_db, dst)
        self.engine.record([entry])
        return {}

    async def _drop_database(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        if db not in self.engine.client.list_database_names():
            return {}
        entries = []
        for name in self.engine.client[db].list_collection_names():
            self.engine.touch(db, name)
            entries.append(self.engine.make_entry(db, name, "drop", None))
            self.engine.forget_collection(db, name)
        self.engine.client.drop_database(db)
        entries.append(self.engine.make_entry(db, "", "dropDatabase", None))
        self.engine.record(entries)
        return {"dropped": db}

    async def _create_indexes(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "createIndexes")
        specs = request.command.get("indexes")
        if not isinstance(specs, list) or not specs:
            raise CommandError(2, "Must specify at least one index to create")
        coll = self.engine.collection(db, name)
        before = len(coll.index_information()) if self.engine.collection_exists(db, name) else 0
        created_collection = not self.engine.collection_exists(db, name)
        existing = coll.index_information()
        built: list[dict[str, Any]] = []
        for spec in specs:
            index = self._create_index(coll, db, name, spec, existing)
            if index is not None:
                built.append(index)
        self.engine.set_indexed_fields(db, name)
        if created_collection:
            self._ddl_event(
                db, name, "create", {"idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}}
            )
        if built:
            self._ddl_event(db, name, "createIndexes", {"indexes": built})
        after = len(coll.index_information())
        return {
            "numIndexesBefore": before or 1,
            "numIndexesAfter": after,
            "createdCollectionAutomatically": created_collection,
        }

    def _create_index(
        self,
        coll: FastCollection,
        db: str,
        name: str,
        spec: dict[str, Any],
        existing: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        """Build one index of a createIndexes command and return it as the change event lists
        it; None when an identical index already exists (mongod's no-op)."""
        key = spec.get("key")
        if not isinstance(key, dict) or not key:
            raise CommandError(2, "index specification must have a non-empty 'key'")
        if "partialFilterExpression" in spec:
            check_partial_filter(spec["partialFilterExpression"])
        text = text_index_options(key, spec)
        index_name = spec.get("name") or "_".join(f"{k}_{v}" for k, v in key.items())
        if index_name in existing:
            _check_same_index(existing[index_name], index_name, key, spec)
            return None
        kwargs: dict[str, Any] = {
            k: spec[k]
            for k in ("unique", "sparse", "expireAfterSeconds", "partialFilterExpression")
            if k in spec
        }
        try:
            coll.create_index(list(key.items()), name=index_name, **kwargs)
        except mongomock.DuplicateKeyError as exc:
            raise CommandError(
                11000,
                f"Index build failed: E11000 duplicate key error "
                f"collection: {db}.{name} index: {index_name}",
            ) from exc
        except (mongomock.OperationFailure, NotImplementedError, TypeError) as exc:
            raise CommandError(67, str(exc), "CannotCreateIndex") from exc
        extra = {k: v for k, v in spec.items() if k in KEPT_INDEX_OPTIONS} | text
        if extra:
            self.engine.index_options[(db, name, index_name)] = extra
        return {"v": 2, "key": dict(key), "name": index_name, **kwargs, **extra}

    async def _list_indexes(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "listIndexes")
        if not self.engine.collection_exists(db, name):
            raise CommandError(26, f"ns does not exist: {db}.{name}")
        infos = []
        for index_name, info in self.engine.collection(db, name).index_information().items():
            spec = {"v": 2, "key": dict(info["key"]), "name": index_name}
            for option in ("unique", "sparse", "expireAfterSeconds", "partialFilterExpression"):
                if option in info:
                    spec[option] = info[option]
            spec.update(self.engine.index_options.get((db, name, index_name), {}))
            infos.append(spec)
        return self._cursor_reply(f"{db}.{name}", infos, request.command)

    async def _drop_indexes(self, request: Request, conn: Connection, db: str) -> dict[str, Any]:
        name = self._coll_name(request, "dropIndexes")
        if not self.engine.collection_exists(db, name):
            raise CommandError(26, f"ns not found {db}.{name}")
        coll = self.engine.collection(db, name)
        which = request.command.get("index")
        existing = coll.index_information()
        before = len(existing)
        try:
            if which == "*":
                coll.drop_indexes()
            elif isinstance(which, str):
                coll.drop_index(which)
            elif isinstance(which, dict):
                coll.drop_index(list(which.items()))
            elif isinstance(which, list):
                for n in which:
                    coll.drop_index(n)
            else:
                raise CommandError(2, "dropIndexes needs 'index'")
        except mongomock.OperationFailure as exc:
            raise CommandError(27, str(exc), "IndexNotFound") from exc
        self.engine.set_indexed_fields(db, name)
        remaining = coll.index_information()
        dropped = [
            {"v": 2, "key": dict(info["key"]), "name": index_name}
            for index_name, info in existing.items()
            if index_name not in remaining
        ]
        for index in dropped:
            self.engine.index_options.pop((db, name, str(index["name"])), None)
        if dropped:
            self._ddl_event(db, name, "dropIndexes", {"indexes": dropped})
        return {"nIndexesWas": before}
