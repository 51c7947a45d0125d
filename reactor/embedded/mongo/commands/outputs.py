"""`$out` and `$merge`: an aggregation's results written to a collection, as mongod 7.0 does.

`$out` replaces the target's documents with the results (its indexes stay); `$merge` matches each
result to a target document `on` one or more fields (`_id` by default) and then, as asked,
replaces, merges into, keeps or fails on a match, and inserts, discards or fails on a miss. The
changes are recorded for change streams like any other write.
"""

from __future__ import annotations

from typing import Any

import mongomock
from bson import ObjectId

from ..changestream import CommandError
from ..engine import Engine, OplogEntry, clone, diff_documents
from .errors import duplicate_key

WRITE_STAGES = frozenset({"$out", "$merge"})
_MATCHED = ("replace", "keepExisting", "merge", "fail")
_NOT_MATCHED = ("insert", "discard", "fail")


def write_results(engine: Engine, db: str, stage: dict[str, Any], results: list[Any]) -> None:
    name = next(iter(stage))
    if name == "$out":
        target_db, target = _namespace(stage[name], db, "$out")
        _out(engine, target_db, target, results)
    else:
        spec = stage[name]
        if isinstance(spec, str):
            spec = {"into": spec}
        if not isinstance(spec, dict) or "into" not in spec:
            raise CommandError(40414, "BSON field '$merge.into' is missing but a required field")
        target_db, target = _namespace(spec["into"], db, "$merge")
        _merge(engine, target_db, target, spec, results)


def _namespace(value: Any, db: str, stage: str) -> tuple[str, str]:
    if isinstance(value, str) and value:
        return db, value
    if isinstance(value, dict) and isinstance(value.get("coll"), str):
        return str(value.get("db") or db), value["coll"]
    raise CommandError(16990, f"{stage} needs a collection name or {{db, coll}}", "Location16990")


def _out(engine: Engine, db: str, name: str, results: list[Any]) -> None:
    docs = [_with_id(doc) for doc in results]
    if len({repr(d["_id"]) for d in docs}) != len(docs):
        raise CommandError(11000, f"E11000 duplicate key error collection: {db}.{name}")
    coll: Any = engine.collection(db, name)
    entries: list[OplogEntry] = []
    with engine.writing(db, name):
        for old in list(coll.find({}, {"_id": 1})):
            coll.delete_one({"_id": old["_id"]})
            entries.append(engine.make_entry(db, name, "delete", {"_id": old["_id"]}))
        for doc in docs:
            coll.insert_one(doc)
            entries.append(
                engine.make_entry(db, name, "insert", {"_id": doc["_id"]}, full_document=clone(doc))
            )
        coll._store.create()  # $out makes its target even from no results
        engine.record(entries)


def _merge(engine: Engine, db: str, name: str, spec: dict[str, Any], results: list[Any]) -> None:
    on = spec.get("on", "_id")
    fields = [on] if isinstance(on, str) else list(on) if isinstance(on, list) else None
    if not fields or not all(isinstance(f, str) for f in fields):
        raise CommandError(51186, "$merge 'on' must be a field name or an array of them")
    matched = spec.get("whenMatched", "merge")
    not_matched = spec.get("whenNotMatched", "insert")
    if not (isinstance(matched, list) or matched in _MATCHED):
        raise CommandError(9, f"Enumeration value '{matched}' for field 'whenMatched' is not valid")
    if not_matched not in _NOT_MATCHED:
        raise CommandError(9, f"Enumeration value '{not_matched}' for field 'whenNotMatched'")
    coll: Any = engine.collection(db, name)
    entries: list[OplogEntry] = []
    with engine.writing(db, name):
        try:
            for result in results:
                doc = _with_id(result) if fields == ["_id"] or "_id" in result else dict(result)
                key = {f: _get(doc, f) for f in fields}
                if any(v is _MISSING for v in key.values()):
                    raise CommandError(51132, "$merge write error: 'on' field cannot be missing")
                found = coll.find_one(key)
                if found is None:
                    if not_matched == "fail":
                        raise CommandError(13113, "$merge could not find a matching document")
                    if not_matched == "insert":
                        doc.setdefault("_id", ObjectId())
                        coll.insert_one(doc)
                        entries.append(
                            engine.make_entry(
                                db, name, "insert", {"_id": doc["_id"]}, full_document=clone(doc)
                            )
                        )
                    continue
                if matched == "fail":
                    index = "_id_" if fields == ["_id"] else "_".join(f"{f}_1" for f in fields)
                    raise duplicate_key(db, name, index, key)
                entry = _merge_matched(engine, db, name, coll, matched, doc, found)
                if entry is not None:
                    entries.append(entry)
        except mongomock.DuplicateKeyError as exc:
            raise CommandError(11000, f"E11000 duplicate key error: {exc}", "DuplicateKey") from exc
        finally:
            engine.record(entries)


def _merge_matched(
    engine: Engine,
    db: str,
    name: str,
    coll: Any,
    matched: Any,
    doc: dict[str, Any],
    found: dict[str, Any],
) -> OplogEntry | None:
    """A result that matched `found`, applied as `whenMatched` says; the change it made, if
    any (keepExisting, or an update that changes nothing, makes none)."""
    if matched == "keepExisting":
        return None
    if isinstance(matched, list):
        coll.update_one({"_id": found["_id"]}, matched)
    elif matched == "replace":
        doc["_id"] = found["_id"]
        coll.replace_one({"_id": found["_id"]}, doc)
    else:  # merge: the result's top-level fields set on the match
        fields_set = {k: v for k, v in doc.items() if k != "_id"}
        if fields_set:
            coll.update_one({"_id": found["_id"]}, {"$set": fields_set})
    after = coll.find_one({"_id": found["_id"]})
    if after == found:
        return None
    if matched == "replace":
        return engine.make_entry(
            db, name, "replace", {"_id": found["_id"]}, full_document=clone(after)
        )
    description, ambiguous = diff_documents(found, after, arrays=True)
    return engine.make_entry(
        db,
        name,
        "update",
        {"_id": found["_id"]},
        update_description=description,
        disambiguated=ambiguous,
    )


_MISSING = object()


def _with_id(doc: Any) -> dict[str, Any]:
    out = dict(doc)
    out.setdefault("_id", ObjectId())
    return out


def _get(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node
