"""MongoDB's rules for update documents, checked before the engine applies anything.

mongomock applies what it is given and fails halfway, with Python's messages, or not at all where
mongod refuses. These checks give mongod 7.0's answer (code and message shape) instead:

- static, on the update alone: unknown modifier (9), a modifier whose argument is not a document
  (9), empty paths and field names (56), `$`-prefixed field names (52), non-numeric `$inc`/`$mul`
  arguments (14), `$rename` and `$pop` arguments (2, 9), and two modifiers touching the same path
  or one path and its parent or child (40, ConflictingUpdateOperators) — `$setOnInsert` included,
  whether the write inserts or not;
- against the document about to change: a path that runs through a value that is neither a
  document nor an array, `null` included (28, PathNotViable); arithmetic on a stored value that
  is not a number (14, TypeMismatch); array modifiers on a stored value that is not an array (2,
  BadValue; `$pop` 14).

The immutable `_id` (66) is checked after applying, by comparing, because setting `_id` to its
own value is allowed. Atomicity — a failed write changes nothing — is the caller's: it restores
the document it snapshotted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .changestream import CommandError
from .values import bson_type, is_number, render, same_value

UPDATE_OPERATORS = frozenset(
    {
        "$set",
        "$unset",
        "$inc",
        "$mul",
        "$min",
        "$max",
        "$rename",
        "$setOnInsert",
        "$currentDate",
        "$push",
        "$addToSet",
        "$pop",
        "$pull",
        "$pullAll",
        "$bit",
    }
)
RENAME_TARGET = "$rename (target)"
# Modifiers that create their path when it is missing (so the path must be viable).
_CREATING = frozenset(
    {
        "$set",
        "$setOnInsert",
        "$inc",
        "$mul",
        "$min",
        "$max",
        "$currentDate",
        "$push",
        "$addToSet",
        "$bit",
        RENAME_TARGET,
    }
)
_ARITHMETIC = {"$inc": "increment", "$mul": "multiply"}
_ARRAY_APPENDING = frozenset({"$push", "$addToSet"})
_ARRAY_REMOVING = frozenset({"$pull", "$pullAll"})

_MISSING = object()


class UpdateKind:
    OPERATORS = "operators"
    REPLACEMENT = "replacement"
    PIPELINE = "pipeline"


def update_kind(update: Any) -> str:
    """What kind of update `update` is; code 9 for one that is none of them."""
    if isinstance(update, list):
        return UpdateKind.PIPELINE
    if not isinstance(update, Mapping):
        raise CommandError(
            9, f"Update argument must be either an object or an array, not {bson_type(update)}"
        )
    keys = list(update)
    if not keys or not any(isinstance(k, str) and k.startswith("$") for k in keys):
        return UpdateKind.REPLACEMENT
    return UpdateKind.OPERATORS


# ---- static checks ---------------------------------------------------------------------------


Target = tuple[str, str, Any]  # (modifier, path, argument)


def check_operators(update: Mapping[str, Any]) -> list[Target]:
    """Check an operator update on its own; returns its (modifier, path, argument) targets in
    order. A `$rename` gives two: (`$rename`, source, target) and (RENAME_TARGET, target, None)."""
    pairs: list[Target] = []
    for op, spec in update.items():
        if op not in UPDATE_OPERATORS:
            raise CommandError(
                9,
                f"Unknown modifier: {op}. Expected a valid update modifier or pipeline-style "
                "update specified as an array",
                "FailedToParse",
            )
        if not isinstance(spec, Mapping):
            raise CommandError(
                9,
                f"Modifiers operate on fields but we found type {bson_type(spec)} instead. For "
                f"example: {{$mod: {{<field>: ...}}}} not {{{op}: {render(spec)}}}",
                "FailedToParse",
            )
        for path, value in spec.items():
            _check_path(path)
            _check_argument(op, path, value)
            pairs.append((op, path, value))
            if op == "$rename":
                pairs.append((RENAME_TARGET, value, None))
    _check_conflicts(pairs)
    return pairs


def _check_path(path: Any) -> None:
    if not isinstance(path, str) or path == "":
        raise CommandError(56, "An empty update path is not valid.", "EmptyFieldName")
    parts = path.split(".")
    if any(p == "" for p in parts):
        raise CommandError(
            56,
            f"The update path '{path}' contains an empty field name, which is not allowed.",
            "EmptyFieldName",
        )
    for part in parts:
        if part.startswith("$") and not _positional(part):
            raise CommandError(
                52,
                f"The dollar ($) prefixed field '{part}' in '{path}' is not valid for storage.",
                "DollarPrefixedFieldName",
            )


def _positional(part: str) -> bool:
    return part == "$" or (part.startswith("$[") and part.endswith("]"))


def _check_argument(op: str, path: str, value: Any) -> None:
    if op in _ARITHMETIC and not is_number(value):
        raise CommandError(
            14,
            f"Cannot {_ARITHMETIC[op]} with non-numeric argument: {{{path}: {render(value)}}}",
            "TypeMismatch",
        )
    if op == "$rename":
        if not isinstance(value, str):
            raise CommandError(
                2, f"The 'to' field for $rename must be a string: {path}: {render(value)}"
            )
        _check_path(value)
        if value == path:
            raise CommandError(
                2, f"The source and target field for $rename must differ: {path}: {render(value)}"
            )
        if _overlap(path.split("."), value.split(".")):
            raise CommandError(
                2,
                "The source and target field for $rename must not be on the same path: "
                f"{path}: {render(value)}",
            )
    if op == "$pop" and (not is_number(value) or value not in (1, -1)):
        raise CommandError(9, f"$pop expects 1 or -1, found: {render(value)}", "FailedToParse")
    if op == "$currentDate":
        ok = isinstance(value, bool) or (
            isinstance(value, Mapping)
            and set(value) == {"$type"}
            and value["$type"] in ("date", "timestamp")
        )
        if not ok:
            raise CommandError(
                2,
                f"{render(value)} is not valid type for $currentDate. Please use a boolean "
                "('true') or a $type expression ({$type: 'timestamp/date'}).",
            )


def _overlap(a: list[str], b: list[str]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _check_conflicts(pairs: list[Target]) -> None:
    seen: list[list[str]] = []
    for _op, path, _value in pairs:
        parts = path.split(".")
        for other in seen:
            if _overlap(parts, other):
                shorter = other if len(other) <= len(parts) else parts
                raise CommandError(
                    40,
                    f"Updating the path '{path}' would create a conflict at '{'.'.join(shorter)}'",
                    "ConflictingUpdateOperators",
                )
        seen.append(parts)


# ---- checks against the document ---------------------------------------------------------------


def check_against(doc: Mapping[str, Any], pairs: list[Target], *, inserting: bool) -> None:
    """Check an operator update (already through `check_operators`) against the stored document
    (or, for an upsert, the document it starts from)."""
    for op, path, argument in pairs:
        if op == "$setOnInsert" and not inserting:
            continue
        if (path == "_id" or path.startswith("_id.")) and not inserting and "_id" in doc:
            unchanged = op == "$set" and path == "_id" and same_value(argument, doc["_id"])
            if not unchanged:
                raise CommandError(
                    66,
                    "Performing an update on the path '_id' would modify the immutable field '_id'",
                    "ImmutableField",
                )
        value = _target(doc, path, create=op in _CREATING)
        if value is _MISSING:
            continue
        if op in _ARITHMETIC and not is_number(value):
            raise CommandError(
                14,
                f"Cannot apply {op} to a value of non-numeric type. {{_id: {render(doc.get('_id'))}}} "
                f"has the field '{path.split('.')[-1]}' of non-numeric type {bson_type(value)}",
                "TypeMismatch",
            )
        if op in _ARRAY_APPENDING and not isinstance(value, list):
            raise CommandError(
                2,
                f"The field '{path}' must be an array but is of type {bson_type(value)} in "
                f"document {{_id: {render(doc.get('_id'))}}}",
            )
        if op == "$pop" and not isinstance(value, list):
            raise CommandError(
                14,
                f"Path '{path}' contains an element of non-array type '{bson_type(value)}'",
                "TypeMismatch",
            )
        if op in _ARRAY_REMOVING and not isinstance(value, list):
            raise CommandError(2, "Cannot apply $pull to a non-array value")
        if op == "$bit" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise CommandError(
                14,
                f"Cannot apply $bit to a value of non-integral type.{{_id: "
                f"{render(doc.get('_id'))}}} has the field {path.split('.')[-1]} of non-integer "
                f"type {bson_type(value)}",
                "TypeMismatch",
            )


def _target(doc: Mapping[str, Any], path: str, *, create: bool) -> Any:
    """The value at `path`, or _MISSING. With `create`, a path that cannot be created because
    it runs through a scalar (or names a field of an array) raises PathNotViable."""
    current: Any = doc
    parent_name = ""
    for part in path.split("."):
        if _positional(part):
            return _MISSING  # resolved against the query by the engine
        if isinstance(current, Mapping):
            if part not in current:
                return _MISSING
            parent_name, current = part, current[part]
            continue
        if isinstance(current, list):
            if part.isdigit():
                index = int(part)
                if index >= len(current):
                    return _MISSING  # $set pads the array with nulls
                parent_name, current = part, current[index]
                continue
        if create:
            raise CommandError(
                28,
                f"Cannot create field '{part}' in element {{{parent_name}: {render(current)}}}",
                "PathNotViable",
            )
        return _MISSING
    return current


def check_id_unchanged(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    if "_id" in before and ("_id" not in after or not same_value(before["_id"], after["_id"])):
        raise CommandError(
            66,
            "Performing an update on the path '_id' would modify the immutable field '_id'",
            "ImmutableField",
        )


def check_replacement(replacement: Mapping[str, Any], stored_id: Any) -> None:
    for name in replacement:
        if isinstance(name, str) and name.startswith("$"):
            raise CommandError(
                52,
                f"The dollar ($) prefixed field '{name}' in '{name}' is not allowed in the "
                "context of an update's replacement document. Consider using an aggregation "
                "pipeline with $replaceWith.",
                "DollarPrefixedFieldName",
            )
    if "_id" in replacement and not same_value(replacement["_id"], stored_id):
        raise CommandError(
            66,
            "After applying the update, the (immutable) field '_id' was found to have been "
            f"altered to _id: {render(replacement['_id'])}",
            "ImmutableField",
        )
