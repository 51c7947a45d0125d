"""Group commit for webhook events: concurrent requests' events are applied together, in a few
database round trips per batch instead of several per event, and each request is answered
only once its batch is applied (nothing is acknowledged that is not stored).

A batch closes when it holds MAX_BATCH events or WINDOW_S after its first event arrived, and
the next batch collects while one is being applied, so under load the window costs nothing
and a lone event waits at most WINDOW_S.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

WINDOW_S = 0.010
MAX_BATCH = 500


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        apply: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        window_s: float = WINDOW_S,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._apply = apply
        self._window_s = window_s
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._oldest_at = 0.0  # loop time the oldest pending event arrived
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self._pending:
            self._oldest_at = loop.time()
        self._pending.append((item, future))
        self._wake.set()
        return await future

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        return list(await asyncio.gather(*(self.submit(i) for i in items)))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._pending) < self._max_batch:
                await asyncio.sleep(self._window_s)
            batch, self._pending = (
                self._pending[: self._max_batch],
                self._pending[self._max_batch :],
            )
            if not self._pending:
                self._wake.clear()
            live = [(item, f) for item, f in batch if not f.done()]
            if not live:
                continue
            try:
                results = await self._apply([item for item, _ in live])
            except Exception as exc:  # one batch's failure is each of its requests' failure
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), result in zip(live, results, strict=True):
                if not f.done():
                    f.set_result(result)

    async def aclose(self) -> None:
        """Stop applying; requests still waiting get an error, not silence."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # never raises the task's cancellation here
            self._task = None
        pending, self._pending = self._pending, []
        for _, future in pending:
            if not future.done():
                future.set_exception(RuntimeError("shutting down"))
