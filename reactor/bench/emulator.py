"""Emulator benchmark: inserts per second, and the delay from an insert's acknowledgement to its
change event reaching a waiting `watch()` (target p99 <= 10 ms)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pymongo import AsyncMongoClient

from .common import emulator_process, summary_ms
from .figures import Figure


async def run(quick: bool = False) -> dict[str, Any]:
    n_events = 300 if quick else 2000
    n_bulk = 2000 if quick else 20000
    async with emulator_process() as uri:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
        coll = client.bench.events
        await coll.insert_one({"warm": True})

        t0 = time.perf_counter()
        for i in range(n_events // 2):
            await coll.insert_one({"seq": -i})
        single_rate = (n_events // 2) / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        docs = [{"seq": i, "payload": "x" * 64} for i in range(n_bulk)]
        for start in range(0, n_bulk, 1000):
            await client.bench.bulk.insert_many(docs[start : start + 1000])
        bulk_rate = n_bulk / (time.perf_counter() - t0)

        received: dict[int, float] = {}
        acked: dict[int, float] = {}
        stream = await coll.watch([{"$match": {"operationType": "insert"}}], max_await_time_ms=5000)
        done = asyncio.Event()

        async def consume() -> None:
            while len(received) < n_events:
                event = await stream.try_next()
                if event is not None and "lat" in event["fullDocument"]:
                    received[event["fullDocument"]["lat"]] = time.perf_counter()
            done.set()

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        for i in range(n_events):
            await coll.insert_one({"lat": i})
            acked[i] = time.perf_counter()
            await asyncio.sleep(0.002)  # a steady trickle, like approvals, not a flood
        await asyncio.wait_for(done.wait(), 60)
        consumer.cancel()
        await stream.close()
        await client.close()
    delays = [max(0.0, received[i] - acked[i]) for i in range(n_events)]
    return {
        "inserts_per_s_sequential": round(single_rate),
        "inserts_per_s_bulk_1000": round(bulk_rate),
        "insert_ack_to_event": summary_ms(delays),
        "target_p99_ms": 10,
    }


SOURCES = ["reactor/embedded/mongo", "reactor/bench/emulator.py"]


def figures(result: dict[str, Any]) -> list[Figure]:
    event = result["insert_ack_to_event"]
    return [
        Figure("inserts/s, one at a time", result["inserts_per_s_sequential"], "/s"),
        Figure("inserts/s, batches of 1,000", result["inserts_per_s_bulk_1000"], "/s"),
        Figure("insert ack → change event, p50", event["p50_ms"], "ms"),
        Figure(
            "insert ack → change event, p99",
            event["p99_ms"],
            "ms",
            goal=result["target_p99_ms"],
            op="<=",
        ),
    ]
