"""Group commit: concurrent callers' items are applied together, in a few database round trips
per batch instead of several per item, and each caller gets its own result only once its batch
is applied (a webhook acknowledges nothing that is not stored; a start claim is known won or
lost). Used for webhook events and for start claims that fire together.

A batch closes when it holds MAX_BATCH items or WINDOW_S after its oldest item arrived. Up
to MAX_INFLIGHT batches are applied at once (each apply is several sequential round trips, so
one batch at a time would make an event that just missed a batch wait for two applies); the
next batch collects meanwhile, so under load the window costs nothing and a lone event waits
at most WINDOW_S. Applies must therefore commute: each event's effect is an idempotent
insert or an atomic increment, never a read-then-write across events.

At most MAX_PENDING items wait for a batch: a `submit` beyond that waits (in arrival order) until
batches taken by the applies make room, so a burst faster than the database slows its callers
(and, for a webhook, the provider's retries) instead of growing memory; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

WINDOW_S = 0.010
MAX_BATCH = 500
MAX_INFLIGHT = 3
MAX_PENDING = 10 * MAX_BATCH


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        apply: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        window_s: float = WINDOW_S,
        max_batch: int = MAX_BATCH,
        max_inflight: int = MAX_INFLIGHT,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._max_pending = max_pending
        self._waiters: deque[asyncio.Future[None]] = deque()  # submits waiting for room
        self._apply = apply
        self._window_s = window_s
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._oldest_at = 0.0  # loop time the oldest pending event arrived
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(max_inflight)
        self._applying: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Items waiting for a batch (not yet handed to an apply)."""
        return len(self._pending)

    async def submit(self, item: T) -> R:
        """Queue `item` (waiting first while MAX_PENDING items wait) and return its result once
        its batch is applied."""
        while len(self._pending) >= self._max_pending or self._waiters:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # let in, it leaves: the room goes to the next
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if len(self._pending) < self._max_pending:
                break
        return await self.offer(item)

    def offer(self, item: T) -> asyncio.Future[R]:
        """Queue `item` without waiting: the caller holds its result's future (a producer that
        must not wait for the write, such as a tracked link's redirect). It is not held back by
        MAX_PENDING (it cannot wait), but it counts toward it: `submit`s wait behind it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self._pending:
            self._oldest_at = loop.time()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return future

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        return list(await asyncio.gather(*(self.submit(i) for i in items)))

    async def _run(self) -> None:
        """Form and start batches while items wait; then end (the next submit starts it again),
        so nothing lingers between bursts."""
        loop = asyncio.get_running_loop()
        while self._pending:
            await self._slots.acquire()
            try:
                if len(self._pending) < self._max_batch:
                    # Only what is left of the oldest item's window: items that collected
                    # while the slots were busy have waited already.
                    remaining = self._oldest_at + self._window_s - loop.time()
                    if remaining > 0:
                        await asyncio.sleep(remaining)
                batch, self._pending = (
                    self._pending[: self._max_batch],
                    self._pending[self._max_batch :],
                )
                if self._pending:
                    self._oldest_at = loop.time()
                self._wake()
                live = [(item, f) for item, f in batch if not f.done()]
            except BaseException:
                self._slots.release()
                raise
            if not live:
                self._slots.release()
                continue
            task = loop.create_task(self._apply_batch(live))
            self._applying.add(task)
            task.add_done_callback(self._applying.discard)

    def _wake(self) -> None:
        """Let as many waiting submits in (oldest first) as there is room for."""
        room = self._max_pending - len(self._pending)
        while room > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                room -= 1

    async def _apply_batch(self, live: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._apply([item for item, _ in live])
        except Exception as exc:  # one batch's failure is each of its requests' failure
            for _, f in live:
                if not f.done():
                    f.set_exception(exc)
            return
        except asyncio.CancelledError:
            for _, f in live:
                if not f.done():
                    f.set_exception(RuntimeError("shutting down"))
            raise
        finally:
            self._slots.release()
        for (_, f), result in zip(live, results, strict=True):
            if not f.done():
                f.set_result(result)

    async def aclose(self) -> None:
        """Stop applying; requests still waiting get an error, not silence."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # never raises the task's cancellation here
            self._task = None
        for task in list(self._applying):
            task.cancel()
        if self._applying:
            await asyncio.wait(list(self._applying))
        pending, self._pending = self._pending, []
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("shutting down"))
        for _, future in pending:
            if not future.done():
                future.set_exception(RuntimeError("shutting down"))
