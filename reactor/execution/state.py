"""What one execution of one campaign carries while it runs, and how it is told to stop."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..domain.shards import Shard
from ..ports import Clock


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
    # The self-fence: by this instance's monotonic clock, the instant after which the lease may
    # have lapsed (the last renewal's send time + lease - margin). Past it nothing new is handed
    # to a provider until a renewal succeeds.
    fence_at_m: float = math.inf
    fenced_logged: bool = False
    # A shard's run: sends only the shard's slice, fenced by the shard's own lease and epoch
    # (`epoch` is then the shard's). None: the campaign's own run.
    shard: Shard | None = None

    @property
    def slot(self) -> str:
        """This run's name in the registry: the campaign's key, or key/shard."""
        return self.key if self.shard is None else f"{self.key}/{self.shard.index}"

    @property
    def shard_index(self) -> int | None:
        return None if self.shard is None else self.shard.index

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stopped.set()

    def may_send(self, now_m: float) -> bool:
        return now_m < self.fence_at_m


async def until_lease_holds(run: Run, clock: Clock, poll_s: float = 0.05) -> bool:
    """True at once while the lease holds; while the run is fenced, wait for a renewal (True)
    or for the run to stop (False)."""

    async def wait() -> None:
        while not run.may_send(clock.monotonic()):
            await clock.sleep(poll_s)

    if run.may_send(clock.monotonic()):
        return True
    return await unless_stopped(run, wait)


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
