"""Targeted customers' contact details, from the segmentation database's orders collection.

Each batch of ids is one aggregation: match the order rows of those customers (in both string
and numeric spellings), group them per customer, and keep the first non-empty email, phone and
name in insertion order, and the newest row whole (what templates see as `customer`). While
tracking is on, the same read says who is marked do-not-track (on any of their rows): no
second query per batch. Memory is bounded by the batch, never by the audience."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bson import Decimal128
from pymongo.asynchronous.collection import AsyncCollection

from ...config import RecipientsConfig
from ...domain.ids import id_variants, normalise_id
from ...domain.templates import plain_row
from ...ports import Recipient


class MongoRecipients:
    def __init__(self, orders: AsyncCollection[dict[str, Any]], config: RecipientsConfig) -> None:
        self._orders = orders
        self._config = config

    async def resolve(self, customer_ids: Sequence[Any]) -> dict[str, Recipient]:
        c = self._config
        variants: list[Any] = []
        for value in customer_ids:
            variants.extend(id_variants(value))
        pipeline: list[dict[str, Any]] = [
            {"$match": {c.id_field: {"$in": variants}}},
            {"$sort": {"_id": 1}},
            {
                "$group": {
                    "_id": f"${c.id_field}",
                    "emails": {"$push": f"${c.email_field}"},
                    "phones": {"$push": f"${c.phone_field}"},
                    "names": {"$push": f"${c.name_field}"},
                    "row": {"$last": "$$ROOT"},
                    **({"zones": {"$push": f"${c.timezone_field}"}} if c.timezone_field else {}),
                    **(
                        {"dnt": {"$push": f"${c.do_not_track_field}"}}
                        if c.do_not_track_field
                        else {}
                    ),
                }
            },
        ]
        out: dict[str, Recipient] = {}
        depth = 1 + (c.do_not_track_field or "").count(".")
        cursor = await self._orders.aggregate(pipeline)
        async for row in cursor:
            key = normalise_id(row["_id"])
            prev = out.get(key)
            email = _first(row.get("emails"))
            phone = _first(row.get("phones"))
            name = _first(row.get("names"))
            fields = plain_row(row.get("row") or {})
            zone = _first(row.get("zones"))
            dnt = any(_marked(v, depth) for v in row.get("dnt") or ())
            if prev is not None:  # the same customer stored under both spellings
                email, phone, name = prev.email or email, prev.phone or phone, prev.name or name
                fields = {**prev.row, **fields}
                zone = prev.timezone or zone
                dnt = prev.do_not_track or dnt
            out[key] = Recipient(
                customer_id=key,
                name=name,
                email=email,
                phone=phone,
                row=fields,
                timezone=zone,
                do_not_track=dnt,
            )
        return out


_MARKS = ("true", "yes", "1")


def _marked(value: Any, depth: int = 1) -> bool:
    """Does this do-not-track field say so? `true`, `1` (any number type), "true", "yes" or
    "1", or an array holding one, as a query `{field: {$in: [...]}}` matches: `depth` levels
    of arrays (one, and one more for each array a dotted field passes through)."""
    if isinstance(value, list):
        return depth > 0 and any(_marked(v, depth - 1) for v in value)
    if isinstance(value, bool):
        return value
    if isinstance(value, Decimal128):
        number = value.to_decimal()
        return not number.is_nan() and number == 1
    if isinstance(value, int | float):
        return value == 1
    return isinstance(value, str) and value in _MARKS


def _first(values: Any) -> str | None:
    if not isinstance(values, list):
        return None
    for value in values:
        if value is None:
            continue
        text = str(value).strip()
        if text:
            return text
    return None
