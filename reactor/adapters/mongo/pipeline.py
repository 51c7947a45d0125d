"""Pieces of aggregation expressions the adapters' pipeline updates share."""

from __future__ import annotations

from typing import Any

NOW = "$$NOW"


def literal(value: Any) -> dict[str, Any]:
    """A value the pipeline must not read as a field path or an operator."""
    return {"$literal": value}


def document_or_empty(field: str) -> dict[str, Any]:
    """`$field` if it holds a document, else {} (null, a string, missing): what a backend may
    have left in a field the reactor merges into."""
    return {"$cond": [{"$eq": [{"$type": f"${field}"}, "object"]}, f"${field}", {}]}
