"""Pieces of aggregation expressions the adapters' pipeline updates share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NOW = "$$NOW"


def literal(value: Any) -> dict[str, Any]:
    """A value the pipeline must not read as a field path or an operator."""
    return {"$literal": value}


def document_or_empty(field: str) -> dict[str, Any]:
    """`$field` if it holds a document, else {} (null, a string, missing): what a backend may
    have left in a field the reactor merges into."""
    return {"$cond": [{"$eq": [{"$type": f"${field}"}, "object"]}, f"${field}", {}]}


def ms(seconds: float) -> int:
    return round(seconds * 1000)


def now_plus(seconds: float) -> dict[str, Any]:
    """The database's now + `seconds` (a lease's end, by its clock)."""
    return {"$add": [NOW, ms(seconds)]}


def set_execution(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A pipeline stage that merges `fields` into `execution`, whatever shape it had."""
    return {
        "$set": {"execution": {"$mergeObjects": [document_or_empty("execution"), dict(fields)]}}
    }
