"""What one execution of one campaign carries while it runs, and how it is told to stop."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio


class StopReason:
    WINDOW_CLOSED = "window_closed"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"


@dataclass
class Run:
    """One execution of one campaign by this instance."""

    key: str
    campaign_id: Any
    name: str
    epoch: int
    execution: dict[str, Any]
    stop_reason: str | None = None
    stopped: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    unflushed: dict[str, int] = field(default_factory=dict)
    flushed_at: float = -math.inf

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stopped.set()


async def unless_stopped(run: Run, wait: Callable[..., Awaitable[None]], *args: Any) -> bool:
    """Await `wait(*args)`; False, cutting it short, if the run stops first (or had stopped)."""
    if run.stop_reason is not None:
        return False
    finished = False
    async with anyio.create_task_group() as tg:

        async def cut_short() -> None:
            await run.stopped.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(cut_short)
        await wait(*args)
        finished = True
        tg.cancel_scope.cancel()
    return finished and run.stop_reason is None
