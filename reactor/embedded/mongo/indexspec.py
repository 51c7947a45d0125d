"""Index specifications checked as mongod checks them, before mongomock builds the index.

mongomock accepts any `partialFilterExpression` and builds a text index with no `weights`;
mongod refuses a partial filter that is not a document (TypeMismatch), one it cannot parse
(BadValue: an unknown operator, a `$and` that is not an array) and one with expressions a
partial index does not support (CannotCreateIndex), and lists a text index with its weights
(every text field 1 unless `weights` says otherwise), its language fields and its version.
"""

from __future__ import annotations

from typing import Any

from .codes import CommandError

# Field operators mongod's parser knows (a superset of those a partial index supports).
_KNOWN_FIELD_OPS = frozenset(
    {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$type", "$not",
     "$regex", "$options", "$size", "$all", "$elemMatch", "$mod", "$bitsAllSet", "$bitsAnySet",
     "$bitsAllClear", "$bitsAnyClear", "$geoWithin", "$geoIntersects", "$near", "$nearSphere",
     "$jsonSchema"}
)  # fmt: skip
_PARTIAL_FIELD_OPS = frozenset({"$eq", "$gt", "$gte", "$lt", "$lte", "$type", "$exists", "$in"})
_KNOWN_TOP_OPS = frozenset({"$and", "$or", "$nor", "$expr", "$where", "$text", "$comment",
                            "$jsonSchema", "$alwaysTrue", "$alwaysFalse", "$sampleRate"})  # fmt: skip
_LOGICAL = ("$and", "$or", "$nor")
MAX_WORD_WEIGHT = 100_000  # mongod's fts_spec: weights lie in the open interval (0, 100000)


def _unsupported(what: str) -> CommandError:
    return CommandError(67, f"Expression not supported in partial index: {what}")


def check_partial_filter(value: object) -> None:
    """Raise the CommandError mongod answers for a `partialFilterExpression` it refuses."""
    if not isinstance(value, dict):
        raise CommandError(
            14,
            "The field 'partialFilterExpression' must be an object, but got "
            f"{type(value).__name__}",
            "TypeMismatch",
        )
    _check_clause(value, top=True)


def _check_clause(clause: dict[str, Any], *, top: bool) -> None:
    for name, value in clause.items():
        if name in _LOGICAL:
            if not isinstance(value, list):
                raise CommandError(2, f"{name} must be an array")
            if not value:
                raise CommandError(2, "$and/$or/$nor must be a nonempty array")
            for entry in value:
                if not isinstance(entry, dict):
                    raise CommandError(2, "$or/$and/$nor entries need to be full objects")
                _check_clause(entry, top=False)
            if name == "$nor":
                raise _unsupported(f"$nor: {value!r}")
        elif name.startswith("$"):
            if name not in _KNOWN_TOP_OPS:
                raise CommandError(2, f"unknown top level operator: {name}")
            raise _unsupported(f"{name}: {value!r}")
        else:
            _check_field(name, value)


def _check_field(path: str, condition: object) -> None:
    if not isinstance(condition, dict) or not any(str(k).startswith("$") for k in condition):
        return  # equality with a value (a document without operators is a value too)
    for op, operand in condition.items():
        if op not in _KNOWN_FIELD_OPS:
            raise CommandError(2, f"unknown operator: {op}")
        if op not in _PARTIAL_FIELD_OPS or (op == "$exists" and operand is not True):
            raise _unsupported(f"{path}: {{{op}: {operand!r}}}")


def text_index_options(key: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The options mongod stores with a text index ({} for an index with no text field)."""
    text_fields = [field for field, kind in key.items() if kind == "text"]
    if not text_fields:
        return {}
    weights: dict[str, int] = dict.fromkeys(text_fields, 1)
    given = spec.get("weights")
    if isinstance(given, dict):
        for field, weight in given.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise CommandError(67, "weight for text index needs numeric type")
            weights[field] = int(weight)
    elif given == "$**":
        weights["$**"] = 1
    elif given is not None:
        raise CommandError(67, "text index option 'weights' must be an object")
    for field, weight in weights.items():
        if not 0 < weight < MAX_WORD_WEIGHT:
            raise CommandError(
                67,
                "text index weight must be in the exclusive interval (0,"
                f"{MAX_WORD_WEIGHT}) but found: {weight} (field {field})",
            )
    return {
        "weights": dict(sorted(weights.items())),
        "default_language": spec.get("default_language", "english"),
        "language_override": spec.get("language_override", "language"),
        "textIndexVersion": spec.get("textIndexVersion", 3),
    }
