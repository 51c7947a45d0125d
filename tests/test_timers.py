"""The timer heap under a fake clock: nothing here sleeps for real."""

from __future__ import annotations

import datetime as dt

import anyio
import pytest

from reactor.limits.ratelimit import TokenBucket
from reactor.scheduling.timers import TimerHeap

from .fakes import FakeClock

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


class Fired:
    def __init__(self) -> None:
        self.events: list[tuple[str, dt.datetime, float]] = []

    def __call__(self, key: str, due_at: dt.datetime, lateness_s: float) -> None:
        self.events.append((key, due_at, lateness_s))

    @property
    def keys(self) -> list[str]:
        return [k for k, _, _ in self.events]


async def run_heap(
    clock: FakeClock, heap: TimerHeap[str], fired: Fired, tg: anyio.abc.TaskGroup
) -> None:
    await tg.start(heap.run, fired)
    await anyio.wait_all_tasks_blocked()


async def test_timers_fire_in_due_order_at_their_instant() -> None:
    clock = FakeClock(T0)
    heap: TimerHeap[str] = TimerHeap(clock, max_sleep_s=2)
    fired = Fired()
    heap.arm("b", at(10))
    heap.arm("a", at(5))
    heap.arm("c", at(10.5))
    async with anyio.create_task_group() as tg:
        await run_heap(clock, heap, fired, tg)
        await clock.advance(4.999)
        assert fired.keys == []
        await clock.advance(0.001)
        assert fired.keys == ["a"]
        await clock.advance(6)
        assert fired.keys == ["a", "b", "c"]
        for _, _, lateness in fired.events:
            assert lateness == 0  # fired exactly at the due instant of the fake clock
        tg.cancel_scope.cancel()


async def test_arming_an_earlier_timer_wakes_the_loop() -> None:
    clock = FakeClock(T0)
    heap: TimerHeap[str] = TimerHeap(clock, max_sleep_s=3600)
    fired = Fired()
    heap.arm("late", at(3000))
    async with anyio.create_task_group() as tg:
        await run_heap(clock, heap, fired, tg)
        heap.arm("soon", at(1))
        await anyio.wait_all_tasks_blocked()
        await clock.advance(1)
        assert fired.keys == ["soon"]
        tg.cancel_scope.cancel()


async def test_disarm_and_move() -> None:
    clock = FakeClock(T0)
    heap: TimerHeap[str] = TimerHeap(clock)
    fired = Fired()
    heap.arm("x", at(5))
    heap.arm("y", at(5))
    assert heap.disarm("y")
    assert not heap.disarm("y")
    assert heap.arm("x", at(8))  # moved later
    assert not heap.arm("x", at(8))  # same instant: nothing to do
    async with anyio.create_task_group() as tg:
        await run_heap(clock, heap, fired, tg)
        await clock.advance(6)
        assert fired.keys == []
        await clock.advance(2)
        assert fired.keys == ["x"]
        assert len(heap) == 0
        tg.cancel_scope.cancel()


async def test_far_future_timer_does_not_fire_early_when_the_clock_jumps_back() -> None:
    """The loop never sleeps past max_sleep_s without re-reading the wall clock, so a timer
    armed far ahead fires on the wall clock's instant, not on a stale sleep."""
    clock = FakeClock(T0)
    heap: TimerHeap[str] = TimerHeap(clock, max_sleep_s=2)
    fired = Fired()
    heap.arm("far", at(100))
    async with anyio.create_task_group() as tg:
        await run_heap(clock, heap, fired, tg)
        await clock.advance(50)
        clock.set(at(10))  # NTP stepped the clock back by 40 s
        await clock.advance(60)  # wall time now 70: not due
        assert fired.keys == []
        await clock.advance(30)  # wall time 100
        assert fired.keys == ["far"]
        tg.cancel_scope.cancel()


async def test_clock_stepping_forward_fires_overdue_timers_within_max_sleep() -> None:
    clock = FakeClock(T0)
    heap: TimerHeap[str] = TimerHeap(clock, max_sleep_s=2)
    fired = Fired()
    heap.arm("t", at(1000))
    async with anyio.create_task_group() as tg:
        await run_heap(clock, heap, fired, tg)
        clock.set(at(1500))  # the wall clock jumped; the loop is mid-sleep
        await clock.advance(2)
        assert fired.keys == ["t"]
        tg.cancel_scope.cancel()


def test_counts_per_class_follow_arm_disarm_and_firing() -> None:
    heap: TimerHeap[str] = TimerHeap(FakeClock(T0), classify=lambda key: key[0])
    heap.arm("s1", at(1))
    heap.arm("s2", at(2))
    heap.arm("e1", at(3))
    heap.arm("s1", at(4))  # moved, still one timer
    assert heap.counts == {"s": 2, "e": 1}
    heap.disarm("s2")
    heap.pop_due(at(3))
    assert heap.counts == {"s": 1, "e": 0}


def test_lazy_deletion_is_compacted() -> None:
    heap: TimerHeap[int] = TimerHeap(FakeClock(T0))
    for i in range(5000):
        heap.arm(i, at(i))
    for i in range(5000):
        heap.arm(i, at(i + 1))  # move each once: half the heap entries are dead
    assert len(heap) == 5000
    assert len(heap._heap) < 2 * 5000 + 2
    due = heap.pop_due(at(10))
    assert [k for k, _, _ in due] == list(range(10))


async def test_overdue_timer_lateness_counts_from_arming() -> None:
    clock = FakeClock(at(100))
    heap: TimerHeap[str] = TimerHeap(clock)
    heap.arm("approved-late", at(70))
    clock.set(at(100.5))
    ((key, due_at, lateness),) = heap.pop_due(clock.now())
    assert key == "approved-late"
    assert due_at == at(70)
    assert lateness == pytest.approx(0.5)


async def test_token_bucket_paces_callers_and_pauses_on_retry_after() -> None:
    clock = FakeClock(T0)
    bucket = TokenBucket(clock, rate_per_s=10, burst=1, monotonic=clock.monotonic)
    times: list[float] = []

    async def caller() -> None:
        for _ in range(5):
            await bucket.acquire()
            times.append(clock.monotonic() - T0.timestamp())

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        await clock.advance(1)
    assert times == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    bucket.pause(5)
    times.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        await clock.advance(10)
    assert times[0] >= 6.0 - 1e-9  # held back by the pause that started at t=1


async def test_token_bucket_take_hands_out_only_free_tokens() -> None:
    clock = FakeClock(T0)
    bucket = TokenBucket(clock, rate_per_s=4, burst=3, monotonic=clock.monotonic)
    assert bucket.take(5) == 1  # a new bucket holds one token
    assert bucket.take(1) == 0
    assert bucket.wait_s() == pytest.approx(0.25)
    clock.set(at(10))
    assert bucket.take(5) == 3  # a full bucket: the burst, no more
    assert bucket.take(1) == 0
    assert bucket.take(0) == 0
    assert bucket.wait_s() == pytest.approx(0.25)
    clock.set(at(10.5))
    assert bucket.take(5) == 2  # two intervals later
    bucket.pause(2)
    assert bucket.wait_s() == pytest.approx(2.0)
    assert bucket.take(1) == 0
    clock.set(at(12.5))
    assert bucket.take(5) == 1  # the pause ended now: the schedule restarts from it


async def test_a_retried_timer_fires_as_due_at_its_first_instant() -> None:
    """The database said "not due yet": the timer is re-armed a little later, but fires with
    the instant it was first due, late by the time since then (not since the retry)."""
    clock = FakeClock(at(10))
    heap: TimerHeap[str] = TimerHeap(clock)
    heap.arm("start", at(10.05), origin=at(10))
    clock.set(at(10.25))
    ((key, due_at, lateness),) = heap.pop_due(clock.now())
    assert key == "start"
    assert due_at == at(10)
    assert lateness == pytest.approx(0.25)
    # An ordinary re-arm forgets the origin.
    heap.arm("start", at(11), origin=at(10))
    heap.arm("start", at(12))
    clock.set(at(12.5))
    ((_, due_at, lateness),) = heap.pop_due(clock.now())
    assert due_at == at(12)
    assert lateness == pytest.approx(0.5)
