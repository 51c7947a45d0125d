"""One campaign sent by many replicas: the campaign's owner cuts its audience into shards and
coordinates them; every replica (the owner too) claims shards with room to send them.

The owner of the campaign (the start claim's winner, or whoever took it over) creates the
shards, then watches them until every one is done, and only then completes the campaign with
the ledger's exact counts. It keeps its own campaign lease, so the window's end, pauses and
takeovers work as for an unsharded campaign:

- paused: open shards are held (nobody claims them); owners of claimed shards learn it from
  their next heartbeat and release theirs as held. Running again, the new owner reopens them.
- the window closed: open shards are held, each shard's owner records its rest as skipped,
  and the campaign's owner closes the held ones and those whose owner died itself.
- the campaign's owner dies or shuts down: the shards go on being sent; whoever takes the
  campaign over finds them (creating shards is idempotent) and carries on watching.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..domain.segments import Segment
from ..domain.shards import Shard, ShardState, parse_shard
from ..ports import Clock
from .state import Run, StopReason, unless_stopped

log = logging.getLogger(__name__)

WATCH_S = 0.25  # how often the campaign's owner looks at its shards


class ShardStore(Protocol):
    async def ensure_indexes(self) -> None: ...
    async def create(
        self,
        campaign: str,
        campaign_id: Any,
        ranges: list[tuple[int, int]],
        source: str = "list",
        name: str | None = None,
        rest: bool = False,
    ) -> list[tuple[int, int]]: ...
    async def claim_next(self, *, owner: str, lease_s: float) -> dict[str, Any] | None: ...
    async def claim_to_close(
        self, shard: str, *, owner: str, lease_s: float
    ) -> dict[str, Any] | None: ...
    async def heartbeat(self, shard: str, *, epoch: int, owner: str, lease_s: float) -> bool: ...
    async def release(
        self, shard: str, *, epoch: int, hold: bool = False, retry_after_s: float = 0.0
    ) -> bool: ...
    async def finish(self, shard: str, *, epoch: int) -> bool: ...
    async def hold(self, campaign: str) -> int: ...
    async def reopen(self, campaign: str) -> int: ...
    async def create_local(
        self,
        campaign: str,
        campaign_id: Any,
        *,
        index: int,
        due: dt.datetime,
        part: int,
        ids: list[str],
        not_before: dt.datetime,
        name: str | None = None,
    ) -> None: ...
    async def local_ids(self, shard: str) -> list[Any]: ...
    async def save_local_plan(self, campaign: str, instants: list[dict[str, Any]]) -> None: ...
    async def local_plan(self, campaign: str) -> list[dict[str, Any]] | None: ...
    async def unfinished(self, campaign: str) -> list[dict[str, Any]]: ...
    async def summary(self, campaign: str) -> dict[str, int]: ...
    async def announce(self, owner: str, *, slots: int, lease_s: float) -> None: ...
    async def withdraw(self, owner: str) -> None: ...
    async def live_slots(self) -> int: ...


class AudienceStore(Protocol):
    async def materialize(self, campaign: str, segment: Segment, chunk_size: int) -> int: ...
    async def total(self, campaign: str) -> int: ...
    async def chunk(self, campaign: str, index: int) -> list[Any]: ...


async def coordinate(
    run: Run,
    ranges: list[tuple[int, int]],
    *,
    size: int,
    source: str = "list",
    shards: ShardStore,
    clock: Clock,
    owner: str,
    lease_s: float,
    close: Callable[[Run], Awaitable[None]],
    created: Callable[[], None] | None = None,
    rest: bool = False,
) -> None:
    """Create the shards (`ranges` of the audience) and watch them until all are done, or
    until this run stops for a pause, a shutdown or a lost lease. When the window closes,
    close the shards nobody is closing (`close` runs a shard's run that records its rest as
    skipped); `created` is called once the shards exist. `rest`: the second pass of a split
    (one more shard per planned range, for the audience the test did not mark)."""
    ranges = await shards.create(run.key, run.campaign_id, ranges, source, run.name, rest=rest)
    if created is not None:
        created()  # this replica's claim loop takes its first shards now, not a poll later
    reopened = await shards.reopen(run.key)
    log.info(
        "🧩 Campaign %s sent in %d shards of up to %d%s",
        run.name,
        len(ranges),
        max((count for _, count in ranges), default=size) if source == "list" else size,
        f" ({reopened} held shards reopened)" if reopened else "",
        extra={"campaign_id": run.key, "count": len(ranges)},
    )
    await watch(run, shards=shards, clock=clock, owner=owner, lease_s=lease_s, close=close)


async def watch(
    run: Run,
    *,
    shards: ShardStore,
    clock: Clock,
    owner: str,
    lease_s: float,
    close: Callable[[Run], Awaitable[None]],
) -> None:
    """Watch the campaign's shards until all are done, or until this run stops for a pause,
    a shutdown or a lost lease; when the window closes, close those nobody is closing."""
    held = False
    while True:
        if run.stop_reason == StopReason.PAUSED:
            await shards.hold(run.key)
            return
        if run.stop_reason in (StopReason.SHUTDOWN, StopReason.LEASE_LOST):
            return  # the shards go on; whoever takes the campaign over watches them
        left = await shards.unfinished(run.key)
        if not left:
            return
        if run.stop_reason == StopReason.WINDOW_CLOSED:
            if not held:
                await shards.hold(run.key)
                held = True
                continue  # look again: a shard may have been claimed meanwhile
            for row in left:
                if row.get("state") == ShardState.HELD or row.get("expired"):
                    claimed = await shards.claim_to_close(
                        str(row["_id"]), owner=owner, lease_s=lease_s
                    )
                    if claimed is not None:
                        closing = shard_run(run, parse_shard(claimed))
                        closing.stop(StopReason.WINDOW_CLOSED)
                        await close(closing)
            await clock.sleep(WATCH_S)
        else:
            await unless_stopped(run, clock.sleep, WATCH_S)


def shard_run(campaign_run: Run, shard: Shard) -> Run:
    """The run of one shard of `campaign_run`'s campaign, fenced by the shard's epoch."""
    return Run(
        key=campaign_run.key,
        campaign_id=campaign_run.campaign_id,
        name=campaign_run.name,
        epoch=shard.epoch,
        execution={},
        shard=shard,
    )
