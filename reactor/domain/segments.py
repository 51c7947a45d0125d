"""Audiences too large for a document: a campaign's `segment` names them instead of
`targetedCustomerIds`.

- `{query: {...}}`: a read-only query on the orders collection; the audience is every distinct
  customer id of the rows it matches. Only query operators are allowed: nothing that runs code
  (`$where`, `$function`, `$accumulator`), no `$expr` (it can hold `$function`), and no field
  name that starts with `$`.
- `{targets: "<collection>"}`: a collection of the segmentation database holding the ids in
  chunks: documents with an `ids` array, read in `_id` order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import InvalidCampaign

# Query operators a segment may use (MongoDB's comparison, logical, element, array and
# evaluation operators that read data without running code).
QUERY_OPERATORS = frozenset(
    {
        "$eq",
        "$ne",
        "$gt",
        "$gte",
        "$lt",
        "$lte",
        "$in",
        "$nin",
        "$and",
        "$or",
        "$nor",
        "$not",
        "$exists",
        "$type",
        "$regex",
        "$options",
        "$elemMatch",
        "$size",
        "$all",
        "$mod",
    }
)
MAX_DEPTH = 16
_COLLECTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,119}$")


@dataclass(frozen=True)
class Segment:
    query: dict[str, Any] | None = None  # on the orders collection
    targets: str | None = None  # a collection of id chunks

    @property
    def kind(self) -> str:
        return "query" if self.query is not None else "targets"


def parse_segment(raw: Any) -> Segment | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in ("query", "targets"):
        raise InvalidCampaign(
            "bad_segment", "segment must be {query: {...}} or {targets: '<collection>'}"
        )
    if "query" in raw:
        query = raw["query"]
        if not isinstance(query, dict):
            raise InvalidCampaign("bad_segment", "segment.query must be a document")
        _check(query, "segment.query", 0)
        return Segment(query=query)
    name = raw["targets"]
    if (
        not isinstance(name, str)
        or not _COLLECTION.match(name)
        or name.startswith("system.")
        or ".." in name
    ):
        raise InvalidCampaign("bad_segment", f"segment.targets is not a collection name: {name!r}")
    return Segment(targets=name)


def _check(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidCampaign("bad_segment", f"{where} is nested deeper than {MAX_DEPTH}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]", depth + 1)
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise InvalidCampaign("bad_segment", f"{where} has an empty field name")
        if key.startswith("$") and key not in QUERY_OPERATORS:
            raise InvalidCampaign(
                "bad_segment", f"{where} uses {key}, which a segment may not (only query operators)"
            )
        _check(item, f"{where}.{key}", depth + 1)
