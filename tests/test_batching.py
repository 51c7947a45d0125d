"""Group commit for webhook events, on its own: batches form within the window, several apply at
once (bounded), each request gets its own result, and one batch's failure is only its own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from reactor.batching import GroupCommit


class Recorder:
    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.inflight = 0
        self.most_inflight = 0
        self._delay_s = delay_s
        self._fail_on = fail_on
        self.gate: asyncio.Event | None = None  # when set up, each apply waits for it
        self.started_at: list[float] = []
        self.entered = asyncio.Event()  # an apply has begun

    async def apply(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.started_at.append(asyncio.get_running_loop().time())
        self.entered.set()
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            if self.gate is not None:
                await self.gate.wait()
            if self._fail_on is not None and self._fail_on in items:
                raise RuntimeError("database unavailable")
            return [i * 10 for i in items]
        finally:
            self.inflight -= 1


async def test_concurrent_requests_share_one_batch_and_get_their_own_results() -> None:
    recorder = Recorder()
    commit: GroupCommit[int, int] = GroupCommit(recorder.apply, window_s=0.02)
    results = await asyncio.gather(*(commit.submit(i) for i in range(50)))
    assert results == [i * 10 for i in range(50)]
    assert len(recorder.batches) == 1
    await commit.aclose()


async def test_batches_apply_concurrently_up_to_the_bound() -> None:
    recorder = Recorder(delay_s=0.05)
    commit: GroupCommit[int, int] = GroupCommit(
        recorder.apply, window_s=0.001, max_batch=5, max_inflight=3
    )
    results = await asyncio.gather(*(commit.submit(i) for i in range(40)))
    assert results == [i * 10 for i in range(40)]
    assert all(len(b) <= 5 for b in recorder.batches)
    assert sorted(i for b in recorder.batches for i in b) == list(range(40))
    assert recorder.most_inflight == 3  # overlapped, and never more than the bound
    await commit.aclose()


async def test_an_event_whose_window_passed_while_the_slot_was_busy_goes_at_once() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    window_s = 0.4
    commit: GroupCommit[int, int] = GroupCommit(recorder.apply, window_s=window_s, max_inflight=1)
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(commit.submit(1))
    await recorder.entered.wait()  # the first batch is being applied, and holds the only slot
    second = asyncio.ensure_future(commit.submit(2))
    await asyncio.sleep(window_s + 0.1)  # the second's window passes while it waits
    released_at = loop.time()
    recorder.gate.set()
    assert await first == 10
    assert await second == 20
    assert recorder.batches == [[1], [2]]
    # Applied as soon as the slot was free: no fresh window on top of the wait.
    assert recorder.started_at[1] - released_at < window_s / 2
    await commit.aclose()


async def test_a_failed_batch_fails_only_its_own_requests() -> None:
    recorder = Recorder(fail_on=3)
    commit: GroupCommit[int, int] = GroupCommit(recorder.apply, window_s=0.01, max_batch=4)
    outcomes = await asyncio.gather(*(commit.submit(i) for i in range(8)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes[:4])
    assert outcomes[4:] == [40, 50, 60, 70]
    assert await commit.submit(9) == 90  # and the loop goes on
    await commit.aclose()


async def test_close_fails_waiting_requests_instead_of_leaving_them_hanging() -> None:
    recorder = Recorder(delay_s=10)
    commit: GroupCommit[int, int] = GroupCommit(recorder.apply, window_s=0.001, max_inflight=1)
    applying = asyncio.ensure_future(commit.submit(1))
    await asyncio.sleep(0.02)
    waiting = asyncio.ensure_future(commit.submit(2))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(commit.aclose(), 1)
    for request in (applying, waiting):  # the one being applied and the one waiting
        with pytest.raises(RuntimeError, match="shutting down"):
            await request


async def test_nothing_lingers_between_bursts() -> None:
    recorder = Recorder()
    commit: GroupCommit[int, int] = GroupCommit(recorder.apply, window_s=0.001)
    assert await commit.submit(1) == 10
    await asyncio.sleep(0.01)
    assert commit._task is not None
    assert commit._task.done()  # no task left waiting for the next item
    assert list(await asyncio.gather(commit.submit(2), commit.submit(3))) == [20, 30]
    assert recorder.batches == [[1], [2, 3]]


async def test_submits_beyond_the_pending_bound_wait_and_none_is_dropped() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    commit: GroupCommit[int, int] = GroupCommit(
        recorder.apply, window_s=0.0, max_batch=4, max_inflight=1, max_pending=6
    )
    tasks = [asyncio.create_task(commit.submit(i)) for i in range(40)]
    await recorder.entered.wait()  # the first batch (4) is being applied, and holds the slot
    for _ in range(20):
        await asyncio.sleep(0)
    assert commit.pending == 6  # the bound: the other 30 submits wait, queued nowhere
    assert sum(len(b) for b in recorder.batches) == 4
    recorder.gate.set()
    results = await asyncio.gather(*tasks)
    assert results == [i * 10 for i in range(40)]
    applied = [i for batch in recorder.batches for i in batch]
    assert sorted(applied) == list(range(40))  # each once: nothing dropped, nothing twice
    assert max(len(b) for b in recorder.batches) <= 4
    await commit.aclose()


async def test_a_submit_cancelled_while_waiting_for_room_leaves_the_queue() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    commit: GroupCommit[int, int] = GroupCommit(
        recorder.apply, window_s=0.0, max_batch=1, max_inflight=1, max_pending=1
    )
    first = asyncio.create_task(commit.submit(0))
    await recorder.entered.wait()
    second = asyncio.create_task(commit.submit(1))  # pending: [1]
    third = asyncio.create_task(commit.submit(2))  # waits for room
    fourth = asyncio.create_task(commit.submit(3))  # waits behind it
    for _ in range(5):
        await asyncio.sleep(0)
    assert commit.pending == 1
    third.cancel()
    recorder.gate.set()
    assert list(await asyncio.wait_for(asyncio.gather(first, second, fourth), 5)) == [0, 10, 30]
    assert third.cancelled()
    assert [i for b in recorder.batches for i in b] == [0, 1, 3]
    await commit.aclose()


async def test_close_fails_the_submits_still_waiting_for_room() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    commit: GroupCommit[int, int] = GroupCommit(
        recorder.apply, window_s=0.0, max_batch=1, max_inflight=1, max_pending=1
    )
    tasks = [asyncio.create_task(commit.submit(i)) for i in range(3)]
    await recorder.entered.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    await commit.aclose()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and str(o) == "shutting down" for o in outcomes)
