"""A query planner's answer for `explain`: which index a find would use.

The embedded server scans collections (mongomock has no query plans); `explain` says what
mongod's planner would pick for the simple cases a driver checks: an index whose first key
field the filter constrains (equality, a range or `$in`) and — for a partial index — only when
the filter implies the index's `partialFilterExpression` (mongod would otherwise miss
documents), else a collection scan. Among candidates, an equality on the first field wins,
then the index covering more of the filter's fields, then the name.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from bson import ObjectId

Predicate = tuple[str, str, Any]  # (path, operator, operand); equality is "$eq"
_INDEXABLE = frozenset({"$eq", "$gt", "$gte", "$lt", "$lte", "$in"})
_UPPER = {"$lt", "$lte"}
_LOWER = {"$gt", "$gte"}


def conjuncts(query: dict[str, Any]) -> list[Predicate] | None:
    """The filter as a conjunction of field predicates; None when it is not one ($or, $nor,
    $expr ... at the top: nothing can be said of it here)."""
    out: list[Predicate] = []
    for name, value in query.items():
        if name == "$and" and isinstance(value, list):
            for clause in value:
                inner = conjuncts(clause) if isinstance(clause, dict) else None
                if inner is None:
                    return None
                out += inner
        elif name.startswith("$"):
            if name == "$comment":
                continue
            return None
        elif isinstance(value, dict) and value and all(str(k).startswith("$") for k in value):
            out += [(name, op, operand) for op, operand in value.items()]
        else:
            out.append((name, "$eq", value))
    return out


def _comparable(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return True
    return any(isinstance(a, t) and isinstance(b, t) for t in (str, dt.datetime, ObjectId))


def _bound_implies(op: str, value: Any, want_op: str, want: Any) -> bool:
    """Whether `field <op> value` implies `field <want_op> want` (both bounds of one side)."""
    if not _comparable(value, want):
        return False
    if want_op == "$lte":
        return bool(value <= want) if op in ("$eq", "$lte", "$lt") else False
    if want_op == "$lt":
        return bool(value < want if op in ("$eq", "$lte") else value <= want)
    if want_op == "$gte":
        return bool(value >= want) if op in ("$eq", "$gte", "$gt") else False
    return bool(value > want if op in ("$eq", "$gte") else value >= want)  # $gt


def _implies(have: Predicate, want: Predicate) -> bool:
    (path, op, value), (want_path, want_op, want_value) = have, want
    if path != want_path:
        return False
    if want_op == "$exists":
        return want_value is True and (
            (op == "$eq" and value is not None) or op in _LOWER | _UPPER or op == "$exists"
        )
    if want_op == "$eq":
        return op == "$eq" and _comparable(value, want_value) and value == want_value
    if want_op == "$type":
        return op == "$type" and value == want_value
    if want_op == "$in":
        values = want_value if isinstance(want_value, list) else []
        if op == "$eq":
            return any(_comparable(value, v) and value == v for v in values)
        return op == "$in" and isinstance(value, list) and all(v in values for v in value)
    if want_op in _UPPER | _LOWER:
        if (
            op == "$eq"
            or (op in _UPPER and want_op in _UPPER)
            or (op in _LOWER and want_op in _LOWER)
        ):
            return _bound_implies(op, value, want_op, want_value)
    return False


def implies(query: list[Predicate], partial: dict[str, Any]) -> bool:
    """Whether every document the query matches is in the partial index."""
    wanted = conjuncts(partial)
    if wanted is None:
        return False  # an $or in the partial filter: not proved here, so not used
    return all(any(_implies(have, want) for have in query) for want in wanted)


def _candidate(
    query: list[Predicate], name: str, info: Mapping[str, Any]
) -> tuple[Any, ...] | None:
    key = list(info["key"])
    if not all(direction in (1, -1) for _, direction in key):
        return None  # text, 2dsphere, hashed: not planned here
    first = key[0][0]
    on_first = [op for path, op, _ in query if path == first and op in _INDEXABLE]
    if not on_first:
        return None
    partial = info.get("partialFilterExpression")
    if partial is not None and not implies(query, partial):
        return None
    fields = {path for path, _, _ in query}
    covered = sum(1 for field, _ in key if field in fields)
    return ("$eq" not in on_first, -covered, name)


def winning_plan(
    query: dict[str, Any], indexes: Mapping[str, Mapping[str, Any]], namespace: str
) -> dict[str, Any]:
    """explain's `queryPlanner` for a find with `query` on a collection with `indexes`."""
    predicates = conjuncts(query)
    ranked = []
    for name, info in indexes.items():
        rank = None if predicates is None else _candidate(predicates, name, info)
        if rank is not None:
            ranked.append((rank, name, info))
    if not ranked:
        plan: dict[str, Any] = {"stage": "COLLSCAN", "filter": query, "direction": "forward"}
    else:
        _, name, info = min(ranked, key=lambda r: r[0])
        plan = {
            "stage": "FETCH",
            "filter": query,
            "inputStage": {
                "stage": "IXSCAN",
                "keyPattern": dict(info["key"]),
                "indexName": name,
                "isMultiKey": False,
                "isUnique": bool(info.get("unique", False)),
                "isSparse": bool(info.get("sparse", False)),
                "isPartial": "partialFilterExpression" in info,
                "direction": "forward",
            },
        }
    return {
        "namespace": namespace,
        "parsedQuery": query,
        "winningPlan": plan,
        "rejectedPlans": [],
    }
