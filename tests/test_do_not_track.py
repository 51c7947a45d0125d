"""Do-not-track customers, read with the batch's recipients (TRACKING_DO_NOT_TRACK_FIELD)."""

from __future__ import annotations

from typing import Any

from bson import Decimal128
from pymongo import AsyncMongoClient

from reactor.adapters.mongo import MongoRecipients
from reactor.config import RecipientsConfig

from .conftest import MongoTarget

Client = AsyncMongoClient[dict[str, Any]]


MARKED = [True, 1, 1.0, "true", "yes", "1", [False, True], Decimal128("1")]
NOT_MARKED = [
    False,
    0,
    2,
    "no",
    "TRUE",
    "",
    None,
    [[True]],
    {"x": True},
    Decimal128("0"),
    Decimal128("sNaN"),
    Decimal128("NaN"),
]


async def test_do_not_track_comes_with_the_recipients_read_from_any_of_their_rows(
    mongo: MongoTarget, client: Client
) -> None:
    """The send path learns who is do-not-track from the read that resolves the batch (no
    second query per batch): a customer any of whose order rows is marked, as a query
    `{field: {$in: [true, 1, "true", "yes", "1"]}}` would find them; ids in either spelling."""
    orders = client[mongo.segmentation_db]["newdatabase"]
    rows: list[dict[str, Any]] = []
    for n, value in enumerate(MARKED + NOT_MARKED):
        rows.append({"customer_id": n, "email": f"c{n}@example.com"})  # an unmarked row first
        rows.append({"customer_id": str(n), "dnt": value})  # the other spelling, marked or not
    await orders.insert_many(rows)
    ids = [str(n) for n in range(len(MARKED + NOT_MARKED))]
    found = await MongoRecipients(orders, RecipientsConfig(do_not_track_field="dnt")).resolve(ids)
    marked = {key for key, r in found.items() if r.do_not_track}
    assert marked == {str(n) for n in range(len(MARKED))}
    assert all(found[key].email for key in ids)  # the rows were merged
    unread = await MongoRecipients(orders, RecipientsConfig()).resolve(ids)
    assert not any(r.do_not_track for r in unread.values())


async def test_a_dotted_do_not_track_field_reads_through_an_array_of_documents(
    mongo: MongoTarget, client: Client
) -> None:
    """`{"prefs.dnt": {$in: [...]}}` matches a row whose `prefs` is an array of documents one of
    which is marked (or holds an array with a mark): so does the recipients' read."""
    orders = client[mongo.segmentation_db]["newdatabase"]
    await orders.insert_many(
        [
            {"customer_id": 1, "prefs": [{"dnt": False}, {"dnt": True}]},
            {"customer_id": 2, "prefs": [{"dnt": [0, "yes"]}]},
            {"customer_id": 3, "prefs": [{"dnt": [[True]]}]},
            {"customer_id": 4, "prefs": {"dnt": 1}},
            {"customer_id": 5, "prefs": [{"other": True}]},
        ]
    )
    config = RecipientsConfig(do_not_track_field="prefs.dnt")
    found = await MongoRecipients(orders, config).resolve(["1", "2", "3", "4", "5"])
    assert {key for key, r in found.items() if r.do_not_track} == {"1", "2", "4"}
