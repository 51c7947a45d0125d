"""The ledger's invariants, held by the database's conditional writes: two owners of one campaign
interleaved write by write through the real store and driver (no timing involved)."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from reactor.adapters.mongo import MongoLedger
from reactor.domain.deliveries import DeliveryRecord, DeliveryState, LedgerOp, delivery_id

from .conftest import MongoTarget
from .helpers import now

Client = AsyncMongoClient[dict[str, Any]]
CAMPAIGN = "c1"
P, S, F, U, K = (
    DeliveryState.PENDING,
    DeliveryState.SENT,
    DeliveryState.FAILED,
    DeliveryState.UNCERTAIN,
    DeliveryState.SKIPPED,
)


def rec(customer: str, state: str, op: LedgerOp) -> DeliveryRecord:
    return DeliveryRecord(customer, "email", state, op=op)


async def write(ledger: MongoLedger, epoch: int, *records: DeliveryRecord) -> set[str]:
    refused = await ledger.write(CAMPAIGN, epoch=epoch, records=records, now=now())
    return {i.rsplit(":", 1)[-1] for i in refused}


async def rows(ledger: MongoLedger) -> dict[str, tuple[str, int]]:
    found = await ledger.states(CAMPAIGN, "email", ["a", "b", "c", "d"])
    assert all(row.shard is None for row in found.values())
    return {c: (row.state, row.epoch) for c, row in found.items()}


async def test_two_owners_write_by_write(mongo: MongoTarget, client: Client) -> None:
    ledger = MongoLedger(client[mongo.campaigns_db])
    await ledger.ensure_indexes()
    # Epoch 1 marks a, b and c.
    assert await write(ledger, 1, *(rec(c, P, LedgerOp.MARK) for c in "abc")) == set()
    # Epoch 2 took over (epoch 1 stalled). It cannot mark, or record, what epoch 1 has.
    assert await write(ledger, 2, rec("a", P, LedgerOp.MARK), rec("b", K, LedgerOp.RECORD)) == {
        "a",
        "b",
    }
    # It settles a: uncertain, still showing who marked it.
    assert await write(ledger, 2, rec("a", U, LedgerOp.SETTLE)) == set()
    # Epoch 1 wakes up: its outcome for a is refused (a is terminal now), for b it applies.
    assert await write(ledger, 1, rec("a", S, LedgerOp.OUTCOME), rec("b", S, LedgerOp.OUTCOME)) == {
        "a"
    }
    # Nobody overwrites a terminal row: not a newer epoch, not the same one, not by settling.
    assert await write(
        ledger,
        3,
        rec("b", P, LedgerOp.MARK),
        rec("b", U, LedgerOp.SETTLE),
        rec("b", F, LedgerOp.OUTCOME),
        rec("a", S, LedgerOp.OUTCOME),
    ) == {"a", "b"}
    assert await write(ledger, 1, rec("b", F, LedgerOp.OUTCOME)) == {"b"}
    # A newer epoch's outcome cannot finish an older epoch's in-flight row either.
    assert await write(ledger, 2, rec("c", S, LedgerOp.OUTCOME)) == {"c"}
    # An epoch that gave a send up before sending removes only its own pending row.
    await ledger.forget_pending([delivery_id(CAMPAIGN, "email", "c")], epoch=2)
    assert (await rows(ledger))["c"] == (P, 1)
    await ledger.forget_pending([delivery_id(CAMPAIGN, "email", "c")], epoch=1)
    assert "c" not in await rows(ledger)
    # ...after which whoever resumes may mark and send it.
    assert await write(ledger, 2, rec("c", P, LedgerOp.MARK)) == set()
    assert await write(ledger, 2, rec("c", S, LedgerOp.OUTCOME)) == set()
    assert await rows(ledger) == {"a": (U, 1), "b": (S, 1), "c": (S, 2)}
    doc = await client[mongo.campaigns_db].deliveries.find_one({"_id": f"{CAMPAIGN}:email:a"})
    assert doc is not None
    assert doc["settledBy"] == 2


async def test_marks_and_outcomes_in_one_ordered_write(mongo: MongoTarget, client: Client) -> None:
    """Outcomes first, then new marks: the window's one write per refill."""
    ledger = MongoLedger(client[mongo.campaigns_db])
    assert await write(ledger, 1, rec("a", P, LedgerOp.MARK), rec("b", P, LedgerOp.MARK)) == set()
    refused = await write(
        ledger,
        1,
        rec("a", S, LedgerOp.OUTCOME),
        rec("b", F, LedgerOp.OUTCOME),
        rec("c", P, LedgerOp.MARK),
        rec("a", P, LedgerOp.MARK),  # already has a row: refused, never sent twice
        rec("d", K, LedgerOp.RECORD),
    )
    assert refused == {"a"}
    assert await rows(ledger) == {"a": (S, 1), "b": (F, 1), "c": (P, 1), "d": (K, 1)}


async def test_failures_count_in_a_row_and_progress_resets_them(
    mongo: MongoTarget, client: Client
) -> None:
    import datetime as dt

    from reactor.adapters.mongo import MongoCampaignStore

    store = MongoCampaignStore(client[mongo.campaigns_db], "campaigns")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    await store.campaigns.insert_one(
        {
            "_id": "f",
            "name": "f",
            "status": "approved",
            "startDate": start,
            "endDate": start + dt.timedelta(hours=1),
            "execution": None,
        }
    )
    claimed = await store.claim_start("f", owner="a", lease_s=30, grace_s=60)
    assert claimed is not None
    status = await store.record_failure(
        "f", epoch=1, detail="boom", max_failures=3, retry_after_s=0
    )
    assert status == "running"
    claimed = await store.claim_takeover("f", old_epoch=1, owner="a", lease_s=30)
    assert claimed is not None
    assert claimed["execution"]["failures"] == 1
    # The new execution makes progress: the count of failures in a row starts again.
    assert await store.add_performance("f", epoch=2, counts={"emailsSent": 1})
    doc = await store.get("f")
    assert doc is not None
    assert doc["execution"]["failures"] == 0
    assert doc["execution"]["lastError"]["detail"] == "boom"  # the last error stays visible
