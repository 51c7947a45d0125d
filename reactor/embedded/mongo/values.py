"""BSON values as mongod names, compares and prints them in its error messages."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

from bson import Decimal128, Int64, ObjectId, Timestamp


def same_value(a: Any, b: Any) -> bool:
    """BSON equality: same type family and value (1 == 1.0, but not True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if is_number(a) and is_number(b):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


def is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) or isinstance(
        value, Decimal128
    )


def bson_type(value: Any) -> str:
    """mongod's name for the BSON type of `value`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, Int64):
        return "long"
    if isinstance(value, int):
        return "int" if -(2**31) <= value < 2**31 else "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dt.datetime):
        return "date"
    if isinstance(value, ObjectId):
        return "objectId"
    if isinstance(value, Timestamp):
        return "timestamp"
    if isinstance(value, Decimal128):
        return "decimal"
    if isinstance(value, bytes):
        return "binData"
    return type(value).__name__


def render(value: Any) -> str:
    """A value as mongod prints it in error messages."""
    return "".join(_render(value))


def _render(value: Any) -> Iterator[str]:
    if value is None:
        yield "null"
    elif isinstance(value, bool):
        yield "true" if value else "false"
    elif isinstance(value, str):
        yield '"' + value.replace('"', '\\"') + '"'
    elif isinstance(value, ObjectId):
        yield f"ObjectId('{value}')"
    elif isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        yield f"new Date({int(aware.timestamp() * 1000)})"
    elif isinstance(value, Mapping):
        if not value:
            yield "{}"
            return
        yield "{ "
        for i, (k, v) in enumerate(value.items()):
            if i:
                yield ", "
            yield f"{k}: "
            yield from _render(v)
        yield " }"
    elif isinstance(value, list | tuple):
        if not value:
            yield "[]"
            return
        yield "[ "
        for i, v in enumerate(value):
            if i:
                yield ", "
            yield from _render(v)
        yield " ]"
    else:
        yield str(value)
