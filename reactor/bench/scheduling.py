"""Scheduling benchmark on the emulator (in its own process):

* 10,000 approved campaigns armed, starting over a window: timer-fire lateness (target p99 <=
  5 ms) and start lateness to the committed `running` claim (target p99 <= 50 ms);
* approval -> armed for single approvals while those timers are held (target p99 <= 100 ms);
* memory per armed timer with 100,000 armed (target <= 1 KiB).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import time
import tracemalloc
from typing import Any, ClassVar

import anyio
from bson import ObjectId
from pymongo import AsyncMongoClient

from ..app import Reactor
from ..config import SchedulerConfig, Settings
from ..domain.schedule import TimerKey, TimerKind
from ..metrics import Metrics
from ..scheduling.scheduler import Scheduler
from .common import emulator_process, summary_ms
from .figures import Figure


def _doc(name: str, start: dt.datetime) -> dict[str, Any]:
    return {
        "name": name,
        "status": "approved",
        "channels": ["email"],
        "startDate": start,
        "endDate": start + dt.timedelta(hours=1),
        "email": {"subject": "s", "text": "t"},
        "targetedCustomerIds": [],
    }


class _Observed:
    """One reactor's scheduler, watched: when each campaign was armed (by the local monotonic
    clock), how late each timer fired and each start reached `running`."""

    def __init__(self, sched: Scheduler, coll: Any) -> None:
        self.sched = sched
        self.coll = coll
        self.fire_lateness: dict[str, float] = {}
        self.start_lateness: dict[str, float] = {}
        self.armed_at: dict[str, float] = {}
        sched.on_fired.append(
            lambda key, due, late: self.fire_lateness.__setitem__(key.campaign, late)
        )
        sched.on_started.append(
            lambda key, late: self.start_lateness.__setitem__(key.campaign, late)
        )
        original_arm = sched.timers.arm

        def arm(key: TimerKey, due_at: dt.datetime, *, origin: dt.datetime | None = None) -> bool:
            self.armed_at.setdefault(key.campaign, time.perf_counter())
            return original_arm(key, due_at, origin=origin)

        sched.timers.arm = arm  # type: ignore[method-assign]

    async def background(self, n_armed: int) -> None:
        """n_armed timers held, due in an hour or two."""
        now = dt.datetime.now(dt.UTC)
        docs = [
            _doc(f"armed {i}", now + dt.timedelta(hours=1, seconds=3600 * i / n_armed))
            for i in range(n_armed)
        ]
        for start in range(0, n_armed, 1000):
            await self.coll.insert_many(docs[start : start + 1000])
        with anyio.fail_after(120):
            while len(self.sched.timers) < n_armed:
                await anyio.sleep(0.05)

    async def approvals(self, n: int) -> list[float]:
        """Single approvals while the background is held: approval -> armed, each."""
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)
        delays = []
        for i in range(n):
            res = await self.coll.insert_one(_doc(f"single {i}", later))
            acked = time.perf_counter()
            key = str(res.inserted_id)
            with anyio.fail_after(10):
                while key not in self.armed_at:
                    await anyio.sleep(0.0005)
            delays.append(max(0.0, self.armed_at[key] - acked))
            await anyio.sleep(0.01)
        return delays

    async def measured(self, n: int, spacing_s: float) -> list[str]:
        """Starts one every `spacing_s`, among everything armed; their campaign ids."""
        first = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
        res = await self.coll.insert_many(
            [_doc(f"measured {i}", first + dt.timedelta(seconds=spacing_s * i)) for i in range(n)]
        )
        keys = [str(i) for i in res.inserted_ids]
        with anyio.fail_after(60 + n * spacing_s):
            while not all(k in self.start_lateness for k in keys):
                await anyio.sleep(0.2)
        return keys

    async def burst(self, n: int, lead_s: float) -> tuple[list[str], float]:
        """n campaigns due at the same instant, approved together far enough ahead that every
        one is armed first (arming is measured on its own: each approval's targets are checked
        in the database as it arrives); their ids and how long arming them all took."""
        burst_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lead_s)
        inserted_at = time.perf_counter()
        res = await self.coll.insert_many([_doc(f"burst {i}", burst_at) for i in range(n)])
        keys = [str(i) for i in res.inserted_ids]
        with anyio.fail_after(60):
            while not all(k in self.armed_at for k in keys):
                await anyio.sleep(0.05)
        armed_s = max(self.armed_at[k] for k in keys) - inserted_at
        assert dt.datetime.now(dt.UTC) < burst_at, "the burst was armed after it was due"
        with anyio.fail_after(300):
            while not all(k in self.start_lateness for k in keys):
                await anyio.sleep(0.2)
        return keys, armed_s


async def run(quick: bool = False) -> dict[str, Any]:
    n_armed = 2000 if quick else 10_000
    n_measured = 100 if quick else 300
    spacing_s = 0.05
    n_approvals = 50 if quick else 200
    n_burst = 200 if quick else 1000
    async with emulator_process() as uri:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
        settings = Settings(
            mongo_uri=uri,
            metrics_port=0,
            metrics_host="127.0.0.1",
            reactor_instance_id="bench",
            lease_seconds=60,
            reconcile_interval_seconds=3600,
        )
        reactor = Reactor(settings, serve_http=False)
        async with anyio.create_task_group() as tg:
            await tg.start(reactor.run)
            await reactor.ready.wait()
            assert reactor.scheduler is not None
            seen = _Observed(reactor.scheduler, client.marketing.campaigns)
            await seen.background(n_armed)
            approval_delays = await seen.approvals(n_approvals)
            measured_keys = await seen.measured(n_measured, spacing_s)
            burst_keys, burst_armed_s = await seen.burst(n_burst, 4.0 if quick else 8.0)
            reactor.request_shutdown()
        await client.close()
    fire_lateness, start_lateness = seen.fire_lateness, seen.start_lateness
    burst_all_running_s = max(start_lateness[k] for k in burst_keys)
    memory = per_timer_memory(20_000 if quick else 100_000)
    return {
        "timers_armed_in_background": n_armed,
        "measured_starts": n_measured,
        "measured_start_spacing_ms": spacing_s * 1000,
        "timer_fire_lateness": summary_ms([fire_lateness[k] for k in measured_keys]),
        "start_lateness_to_running": summary_ms([start_lateness[k] for k in measured_keys]),
        "approval_to_armed": summary_ms(approval_delays),
        "burst": {
            "campaigns_due_at_once": n_burst,
            "approved_together_all_armed_after_s": round(burst_armed_s, 3),
            "all_running_after_s": round(burst_all_running_s, 3),
            "starts_per_s": round(n_burst / burst_all_running_s, 1),
            "start_lateness": summary_ms([start_lateness[k] for k in burst_keys]),
        },
        "memory_per_armed_timer_bytes": memory,
        "targets": {
            "timer_fire_p99_ms": 5,
            "start_p99_ms": 50,
            "approval_p99_ms": 100,
            "bytes_per_timer": 1024,
            "burst_all_running_s": 1.0,
            "burst_start_p99_ms": 1000,
        },
    }


def per_timer_memory(n: int) -> float:
    """Bytes of scheduler state per armed start timer, measured with tracemalloc while syncing
    `n` approved campaign documents (no I/O: valid documents never touch the store)."""

    class _NoExecutor:
        runs: ClassVar[dict[str, Any]] = {}

        def active(self, key: str) -> bool:
            return False

    class _TargetsFine:
        """The one store call a valid document's sync makes (its targets are checked once)."""

        async def target_problem(self, campaign_id: Any) -> str | None:
            return None

    start = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    docs = [
        {
            "_id": ObjectId(),
            "name": f"campaign {i}",
            "status": "approved",
            "startDate": start + dt.timedelta(seconds=i * 0.5),
            "endDate": start + dt.timedelta(seconds=i * 0.5 + 3600),
            "email": {"subject": "s", "text": "t"},
        }
        for i in range(n)
    ]

    async def fill() -> float:
        from ..adapters.clock import SystemClock

        sched = Scheduler(
            store=_TargetsFine(),  # type: ignore[arg-type]
            executor=_NoExecutor(),  # type: ignore[arg-type]
            clock=SystemClock(),
            metrics=Metrics(),
            config=SchedulerConfig(instance_id="mem"),
        )
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for doc in docs:
            await sched.sync(doc)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        assert len(sched.timers) == n
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        return round(grown / n, 1)

    return asyncio.run(fill()) if not _in_loop() else _run_in_thread(fill)


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_in_thread(fn: Any) -> float:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(fn())).result()  # type: ignore[no-any-return]


__all__ = ["TimerKind", "run"]


SOURCES = [
    "reactor/scheduling",
    "reactor/adapters/mongo/claims.py",
    "reactor/adapters/mongo/feed.py",
    "reactor/batching.py",
    "reactor/bench/scheduling.py",
]


def figures(result: dict[str, Any]) -> list[Figure]:
    t = result["targets"]
    burst = result["burst"]
    among = (
        f"{result['measured_starts']} starts among {result['timers_armed_in_background']:,} armed"
    )
    return [
        Figure(
            f"timer-fire lateness p99, {among}",
            result["timer_fire_lateness"]["p99_ms"],
            "ms",
            goal=t["timer_fire_p99_ms"],
            op="<=",
        ),
        Figure(
            "start lateness to committed `running`, p99",
            result["start_lateness_to_running"]["p99_ms"],
            "ms",
            goal=t["start_p99_ms"],
            op="<=",
        ),
        Figure(
            "approval → armed, p99",
            result["approval_to_armed"]["p99_ms"],
            "ms",
            goal=t["approval_p99_ms"],
            op="<=",
        ),
        Figure(
            f"burst: {burst['campaigns_due_at_once']:,} due at once, all running after",
            burst["all_running_after_s"],
            "s",
            goal=t["burst_all_running_s"],
            op="<=",
        ),
        Figure(
            "burst start lateness p99",
            burst["start_lateness"]["p99_ms"],
            "ms",
            goal=t["burst_start_p99_ms"],
            op="<=",
        ),
        Figure(
            "memory per armed timer",
            result["memory_per_armed_timer_bytes"],
            "bytes",
            goal=t["bytes_per_timer"],
            op="<=",
        ),
    ]
