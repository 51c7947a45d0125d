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
        self.release = asyncio.Event()

    async def apply(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
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


async def test_a_lone_event_waits_about_one_window_not_two() -> None:
    recorder = Recorder(delay_s=0.1)
    commit: GroupCommit[int, int] = GroupCommit(recorder.apply, window_s=0.05, max_inflight=1)
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(commit.submit(1))
    await asyncio.sleep(0.06)  # the first batch is now being applied (0.1 s)
    t0 = loop.time()
    second = asyncio.ensure_future(commit.submit(2))
    await first
    assert await second == 20
    # The second waited for the slot (about 0.09 s left of the first apply), then applied at
    # once, since its window had passed meanwhile: no fresh window on top.
    assert loop.time() - t0 < 0.09 + 0.1 + 0.04
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
    assert await asyncio.gather(commit.submit(2), commit.submit(3)) == [20, 30]
    assert recorder.batches == [[1], [2, 3]]
