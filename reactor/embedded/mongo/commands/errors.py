"""Error replies for writes: the one shape of a `writeErrors` entry, the duplicate-key error, and
the mapping of whatever the engine raises to a MongoDB code and message.

mongod never answers with a language runtime's message nor closes a connection because a write
failed; neither may the emulator. What mongomock raises with a MongoDB code keeps it; its
"not implemented" becomes NotImplemented (238); anything else is InternalError (1), logged here
with its traceback so that a gap in the engine is found, not hidden.
"""

from __future__ import annotations

import logging
from typing import Any

import mongomock

from ..changestream import CommandError
from ..values import render

log = logging.getLogger(__name__)

_WriteError: type[Exception] = mongomock.WriteError  # type: ignore[attr-defined]


def write_error(index: int | None, exc: CommandError, **extra: Any) -> dict[str, Any]:
    """One `writeErrors` entry (or, without an index, the body of a command error)."""
    err: dict[str, Any] = {"code": exc.code, "codeName": exc.code_name, "errmsg": exc.message}
    if index is not None:
        err["index"] = index
    err.update(extra)
    return err


def dup_key_error(db: str, name: str, coll: Any, doc: dict[str, Any]) -> CommandError:
    """E11000 naming the unique index `doc` collides on (and its key value), as mongod does."""
    index_name, key_value = "_id_", {"_id": doc.get("_id")}
    for iname, info in coll.index_information().items():
        if not info.get("unique"):
            continue
        values = {k: _get_dot(doc, k) for k, _ in info["key"]}
        if any(
            d.get("_id") != doc.get("_id") and all(_get_dot(d, k) == v for k, v in values.items())
            for d in coll._store.documents
        ):
            index_name, key_value = iname, values
            break
    return duplicate_key(db, name, index_name, key_value)


def duplicate_key(db: str, name: str, index_name: str, key_value: dict[str, Any]) -> CommandError:
    """mongod's E11000: the index, the key, and keyPattern / keyValue for drivers to read."""
    rendered = ", ".join(f"{k}: {render(v)}" for k, v in key_value.items())
    exc = CommandError(
        11000,
        f"E11000 duplicate key error collection: {db}.{name} index: {index_name} "
        f"dup key: {{ {rendered} }}",
        "DuplicateKey",
    )
    exc.extra = {"keyPattern": dict.fromkeys(key_value, 1), "keyValue": key_value}
    return exc


def engine_error(exc: Exception, command: str) -> CommandError:
    """What the engine raised, as mongod would answer it."""
    if isinstance(exc, CommandError):
        return exc
    code = getattr(exc, "code", None)
    if isinstance(exc, _WriteError | mongomock.OperationFailure) and isinstance(code, int):
        return CommandError(code, str(exc))
    if isinstance(exc, _WriteError | mongomock.OperationFailure):
        return CommandError(2, str(exc), "BadValue")
    if isinstance(exc, ValueError) and "field names cannot start with $" in str(exc):
        name = str(exc).rsplit("[", 1)[-1].rstrip("]")
        return CommandError(
            52,
            f"The dollar ($) prefixed field '{name}' in '{name}' is not valid for storage.",
            "DollarPrefixedFieldName",
        )
    if isinstance(exc, NotImplementedError):
        return CommandError(
            238, f"{command}: not implemented by the emulator: {exc}", "NotImplemented"
        )
    log.error("the emulator's engine failed in %s", command, exc_info=exc)
    return CommandError(
        1, f"{command} failed inside the emulator ({type(exc).__name__})", "InternalError"
    )


def _get_dot(doc: dict[str, Any], path: str) -> Any:
    try:
        return mongomock.helpers.get_value_by_dot(doc, path)
    except KeyError:
        return None
