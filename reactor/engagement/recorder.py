"""Recording hits: accepted on the request path without a round trip, classed and written in
batches off it.

A hit joins a group commit (`reactor.batching.GroupCommit`) whose window is SETTLE_S: the hits
that arrive together, a scanner's burst over every link of a message among them, are classed
together. One batch is five round trips whatever its size: the ledger rows of its messages
(is there such a delivery, and when was it sent), the clicks of those messages recorded just
before (a burst split across batches or replicas), the events, the firsts (which human opens
and clicks are a recipient's first: unique counts), the counters and implied opens. One
batch is written at a time: each reads the clicks its predecessor wrote, so a burst split
between two batches is judged whole (with two in flight, the second could read before the first
had written), and a batch's writes do not compete with the next one's for the database while
redirects wait on their ledger reads. The batch that collects meanwhile absorbs the traffic.

What can be lost: on SIGTERM the listener stops first, then `drain()` waits for every accepted
hit to be written. A SIGKILL loses the hits accepted in the last SETTLE_S plus one batch's
write (at most MAX_BATCH hits more, in practice under a second of traffic); the
redirects themselves were already answered. A crash between a batch's writes can leave its
events without their counters (counters are a summary; the events are the record).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..batching import GroupCommit
from ..domain.deliveries import delivery_id
from ..domain.engagement import (
    BURST_S,
    Class,
    Earlier,
    Hit,
    HitKind,
    Verdict,
    classify_message,
    truncate_ip,
)
from ..metrics import Metrics

log = logging.getLogger(__name__)

SETTLE_S = 0.5
MAX_BATCH = 500
MEMORY = 200_000  # ledger rows and firsts remembered (about 40 MB at most)
YIELD_EVERY = 64  # messages classed between two turns of the event loop
NOT_DELIVERED = frozenset({"failed", "skipped"})

MessageKey = tuple[str, str, str]


@dataclass(frozen=True)
class Accepted:
    """A hit whose token checked out, with the message it names."""

    campaign: str
    channel: str
    customer: str
    issued_at: dt.datetime  # when the message was made (from the token)
    hit: Hit

    @property
    def key(self) -> MessageKey:
        return (self.campaign, self.channel, self.customer)


class EngagementStore(Protocol):
    async def delivered(self, ids: Sequence[str]) -> dict[str, tuple[str, dt.datetime | None]]: ...

    async def earlier_clicks(
        self, keys: Sequence[MessageKey], since: dt.datetime
    ) -> dict[MessageKey, list[Earlier]]: ...

    async def insert_events(self, docs: Sequence[dict[str, Any]]) -> None: ...

    async def insert_firsts(self, ids: Sequence[str], at: dt.datetime) -> set[str]: ...

    async def add_counters(self, increments: dict[str, dict[str, int]]) -> None: ...


@dataclass(frozen=True)
class IpPolicy:
    v4_prefix: int = 24
    v6_prefix: int = 48


Row = tuple[str, dt.datetime | None]  # a ledger row's state and when it was last written


class Deliveries:
    """Whether a message was delivered, and when: a `sent` row is terminal, so it is
    remembered (a recipient's later hits need no read). Single lookups (the listener's, one per
    request) are grouped into one read every couple of milliseconds."""

    def __init__(self, store: EngagementStore) -> None:
        self._store = store
        self._sent: OrderedDict[str, Row] = OrderedDict()
        self._reads: GroupCommit[str, Row | None] = GroupCommit(
            self._read_many, window_s=0.002, max_batch=MAX_BATCH
        )

    async def one(self, delivery: str) -> Row | None:
        known = self._sent.get(delivery)
        if known is not None:
            return known
        return await self._reads.submit(delivery)

    async def many(self, ids: set[str]) -> dict[str, Row]:
        known = {i: self._sent[i] for i in ids if i in self._sent}
        missing = [i for i in ids if i not in known]
        if missing:
            known.update(await self._fetch(missing))
        return known

    async def _read_many(self, ids: Sequence[str]) -> list[Row | None]:
        found = await self._fetch(list(dict.fromkeys(ids)))
        return [found.get(i) for i in ids]

    async def _fetch(self, ids: Sequence[str]) -> dict[str, Row]:
        found = await self._store.delivered(ids)
        for i, row in found.items():
            if row[0] == "sent":
                self._sent[i] = row
                if len(self._sent) > MEMORY:
                    self._sent.popitem(last=False)
        return found

    async def aclose(self) -> None:
        await self._reads.aclose()


class Recorder:
    def __init__(
        self,
        store: EngagementStore,
        metrics: Metrics,
        *,
        ip: IpPolicy = IpPolicy(),
        settle_s: float = SETTLE_S,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._ip = ip
        self._commit: GroupCommit[Accepted, None] = GroupCommit(
            self.apply, window_s=settle_s, max_batch=MAX_BATCH, max_inflight=1
        )
        self._futures: set[asyncio.Future[None]] = set()
        self.deliveries = Deliveries(store)
        self._taken: OrderedDict[str, None] = OrderedDict()
        self._last_error: str | None = None

    def accept(self, accepted: Accepted) -> None:
        """Queue a hit; returns at once (the write happens within SETTLE_S plus a batch)."""
        future = self._commit.offer(accepted)
        self._futures.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future[None]) -> None:
        self._futures.discard(future)
        if future.cancelled():
            self._metrics.engagement_dropped.labels("shutdown").inc()
            return
        exc = future.exception()
        if exc is None:
            return
        if str(exc) == "shutting down":
            self._metrics.engagement_dropped.labels("shutdown").inc()
            return
        self._metrics.engagement_dropped.labels("write_failed").inc()
        if self._last_error != type(exc).__name__:  # once per kind of failure, not per hit
            self._last_error = type(exc).__name__
            log.warning("an engagement batch was not written: %s", type(exc).__name__)

    @property
    def pending(self) -> int:
        return len(self._futures)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Write what was accepted (SIGTERM), then stop; what is left after `timeout_s` is
        dropped and counted."""
        if self._futures:
            await asyncio.wait(list(self._futures), timeout=timeout_s)
        await self._commit.aclose()  # fails what is left: counted as dropped at shutdown
        await self.deliveries.aclose()

    async def apply(self, batch: Sequence[Accepted]) -> list[None]:
        """Class and write one batch (the group commit's apply; the bench replays through it)."""
        rows = await self.deliveries.many(
            {delivery_id(a.campaign, a.channel, a.customer) for a in batch}
        )
        groups: dict[MessageKey, list[Accepted]] = defaultdict(list)
        delivered_at: dict[MessageKey, dt.datetime] = {}
        for a in batch:
            row = rows.get(delivery_id(a.campaign, a.channel, a.customer))
            if row is None or row[0] in NOT_DELIVERED:
                # A token we signed for a message that never went (a preview, a failed send)
                # or whose ledger row is gone: nothing to count it against.
                self._metrics.engagement_rejected.labels("unknown_recipient").inc()
                continue
            groups[a.key].append(a)
            state, at = row
            delivered_at[a.key] = at if state == "sent" and at is not None else a.issued_at
        if not groups:
            return [None] * len(batch)
        # Only clicks are judged against their neighbours: a batch of opens reads nothing more.
        clicked = [k for k, g in groups.items() if any(a.hit.kind is HitKind.CLICK for a in g)]
        earlier: dict[MessageKey, list[Earlier]] = {}
        if clicked:
            first = min(a.hit.at for k in clicked for a in groups[k])
            since = first - dt.timedelta(seconds=BURST_S)
            earlier = await self._store.earlier_clicks(clicked, since)
        docs: list[dict[str, Any]] = []
        classed: list[tuple[Accepted, Verdict]] = []
        for n, (key, group) in enumerate(groups.items()):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # redirects are answered between pieces of a batch
            group.sort(key=lambda a: a.hit.at)
            verdicts = classify_message(
                [a.hit for a in group], delivered_at[key], earlier.get(key, [])
            )
            for a, verdict in zip(group, verdicts, strict=True):
                classed.append((a, verdict))
                docs.append(self._document(a, verdict))
        await self._store.insert_events(docs)
        await self._count(classed)
        return [None] * len(batch)

    async def _new_firsts(self, firsts: list[str], at: dt.datetime) -> set[str]:
        """Which firsts are new; one inserted (or found taken) before is remembered as taken,
        so a recipient's repeated hits cost no write."""
        unseen = [f for f in dict.fromkeys(firsts) if f not in self._taken]
        new = await self._store.insert_firsts(unseen, at) if unseen else set()
        for f in unseen:
            self._taken[f] = None
        while len(self._taken) > MEMORY:
            self._taken.popitem(last=False)
        return new

    def _document(self, a: Accepted, verdict: Verdict) -> dict[str, Any]:
        return {
            "campaign": a.campaign,
            "channel": a.channel,
            "customer": a.customer,
            "kind": a.hit.kind.value,
            "link": a.hit.link,
            "at": a.hit.at,
            "class": verdict.klass.value,
            "reasons": list(verdict.reasons),
            "agent": verdict.agent,
            "ip": truncate_ip(a.hit.ip, self._ip.v4_prefix, self._ip.v6_prefix),
        }

    async def _count(self, classed: Sequence[tuple[Accepted, Verdict]]) -> None:
        """Unique human opens and clicks through the firsts; a human click whose recipient had
        no human open yet adds one (a click implies an open)."""
        firsts: list[str] = []
        for a, v in classed:
            self._metrics.engagement_events.labels(a.hit.kind.value, v.klass.value).inc()
            if v.klass is not Class.HUMAN:
                continue
            base = ":".join(a.key)
            firsts.append(f"open:{base}")
            if a.hit.kind is HitKind.CLICK:
                firsts.append(f"click:{base}")
                if a.hit.link is not None:  # a provider's click names a URL, not our link
                    firsts.append(f"link:{base}:{a.hit.link}")
        now = max(a.hit.at for a, _ in classed)
        new = await self._new_firsts(firsts, now)
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        implied: list[dict[str, Any]] = []
        for a, v in classed:
            c = counts[a.campaign]
            base = ":".join(a.key)
            if v.klass is Class.HUMAN:
                if f"open:{base}" in new:
                    new.discard(f"open:{base}")
                    c["opens"] += 1
                    if a.hit.kind is HitKind.CLICK:
                        implied.append(self._implied_open(a, v))
                if a.hit.kind is HitKind.CLICK:
                    if f"click:{base}" in new:
                        new.discard(f"click:{base}")
                        c["clicks"] += 1
                    if a.hit.link is not None and f"link:{base}:{a.hit.link}" in new:
                        new.discard(f"link:{base}:{a.hit.link}")
                        c[f"links.{a.hit.link}"] += 1
            elif a.hit.kind is HitKind.OPEN:
                c[f"{v.klass.value}_opens"] += 1
            else:
                c[f"{v.klass.value}_clicks"] += 1
        if implied:
            await self._store.insert_events(implied)
            self._metrics.engagement_events.labels("open", "human").inc(len(implied))
        await self._store.add_counters({k: dict(v) for k, v in counts.items()})

    def _implied_open(self, a: Accepted, v: Verdict) -> dict[str, Any]:
        doc = self._document(a, v)
        doc.update(kind="open", link=None, reasons=["implied_by_human_click"])
        return doc
