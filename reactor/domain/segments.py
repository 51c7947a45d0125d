"""Audiences too large for a document: a campaign's `segment` names them instead of
`targetedCustomerIds`.

- `{query: {...}}`: a read-only query on the orders collection; the audience is every distinct
  customer id of the rows it matches. Only query operators are allowed: nothing that runs code
  (`$where`, `$function`, `$accumulator`), no `$expr` (it can hold `$function`), and no field
  name that starts with `$`.
- `{targets: "<collection>"}`: a collection of the segmentation database holding the ids in
  chunks: documents with an `ids` array, read in `_id` order.
- `{notEngaged: {campaign: <ObjectId>, with: "open" | "click"}}`: a follow-up: the customers
  campaign X sent to who did not open (or click) it, by human events only (a privacy proxy's
  prefetch or a link scanner is not engagement; a human click also counts as an open).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

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
    not_engaged: NotEngaged | None = None  # a follow-up to campaign X's non-openers

    @property
    def kind(self) -> str:
        if self.not_engaged is not None:
            return "notEngaged"
        return "query" if self.query is not None else "targets"


@dataclass(frozen=True)
class NotEngaged:
    campaign: Any  # campaign X's _id as stored (an ObjectId)
    with_: str  # "open" | "click"

    @property
    def kinds(self) -> tuple[str, ...]:
        """The human event kinds that count as engaged (a click proves an open)."""
        return ("open", "click") if self.with_ == "open" else ("click",)


def parse_not_engaged(raw: Any) -> Segment:
    if not isinstance(raw, dict) or set(raw) != {"campaign", "with"}:
        raise InvalidCampaign(
            "bad_segment", "segment.notEngaged must be {campaign: <ObjectId>, with: 'open'|'click'}"
        )
    campaign = raw["campaign"]
    if isinstance(campaign, str):
        try:
            campaign = ObjectId(campaign)
        except InvalidId:
            raise InvalidCampaign(
                "bad_segment", f"segment.notEngaged.campaign is not an ObjectId: {campaign!r}"
            ) from None
    if not isinstance(campaign, ObjectId):
        raise InvalidCampaign("bad_segment", "segment.notEngaged.campaign must be an ObjectId")
    if raw["with"] not in ("open", "click"):
        raise InvalidCampaign("bad_segment", "segment.notEngaged.with must be 'open' or 'click'")
    return Segment(not_engaged=NotEngaged(campaign, raw["with"]))


def parse_segment(raw: Any) -> Segment | None:
    if raw is None:
        return None
    if isinstance(raw, dict) and len(raw) == 1 and "notEngaged" in raw:
        return parse_not_engaged(raw["notEngaged"])
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in ("query", "targets"):
        raise InvalidCampaign(
            "bad_segment",
            "segment must be {query: {...}}, {targets: '<collection>'} or {notEngaged: {...}}",
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
