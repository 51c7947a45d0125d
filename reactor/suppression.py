"""What every send checks before it goes: the suppression list, as this replica knows it.

Two halves make the check both cheap and prompt:

* a batch being prepared is looked up in the database (one query by ids for the whole batch);
* entries added after that read arrive through the `suppressions` change stream into `live`,
  which the send window consults, in memory, right before it marks a row pending.

So an entry added mid-campaign stops the next sends to that recipient on every replica as soon
as the stream delivers it (well under a second), and no send pays a database round trip for it.
The stream resumes from its token, so a reconnect delays entries but never loses them. When
history is lost, or `live` outgrows its cap, `horizon_m` moves to now: sends whose batch was
read before it are looked up again before they go.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
from bson import Timestamp
from pymongo.errors import OperationFailure, PyMongoError

from .domain.consent import Kind, Reason, Suppression, candidate_ids, reasons_by_customer
from .domain.errors import HISTORY_LOST_CODES
from .domain.models import Channel
from .metrics import Metrics
from .ports import ChangeStream, Clock

log = logging.getLogger(__name__)

LIVE_CAP = 200_000  # entries held from the stream before falling back to database lookups


class SuppressionStore(Protocol):
    async def find(self, ids: Sequence[str]) -> dict[str, str]: ...
    async def add(self, entries: Sequence[Suppression], *, now: dt.datetime) -> list[str]: ...
    async def cluster_time(self) -> Timestamp: ...
    async def open(
        self, *, token: Mapping[str, Any] | None, start_at: Timestamp | None, max_await_ms: int
    ) -> ChangeStream: ...


class SuppressionList:
    def __init__(
        self,
        store: SuppressionStore,
        clock: Clock,
        metrics: Metrics,
        *,
        live_cap: int = LIVE_CAP,
        max_await_ms: int = 250,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._live_cap = live_cap
        self._max_await_ms = max_await_ms
        self.live: dict[str, str] = {}  # id -> reason, entries the stream brought
        self.horizon_m = float("-inf")  # batches read before this must be looked up again
        self.up = False
        self.opened = anyio.Event()
        self.on_entry: Callable[[str, str | None], None] | None = None  # (id, reason|None)

    async def check(self, channel: str, pairs: Sequence[tuple[str, str | None]]) -> dict[str, str]:
        """{customer: reason} for the (customer, address) pairs that must not be sent
        `channel`: one database read for the whole batch."""
        wanted = {c: candidate_ids(channel, c, a) for c, a in pairs}
        found = await self._store.find([i for ids in wanted.values() for i in ids])
        return reasons_by_customer(wanted, found)

    async def learn(self, channel: str, address: str, reason: str, *, source: str) -> None:
        """A provider refused `address` for good at send time (a 5.1.x hard bounce, Twilio's
        21610 for a number that replied STOP): suppress it on that channel. A failure here is
        logged, never raised: the send's own outcome is already known."""
        kind = Kind.EMAIL if channel == Channel.EMAIL else Kind.PHONE
        entry = Suppression(kind, address, channel, Reason(reason), source=source)
        self.live[entry.id] = entry.reason  # this replica stops at once, before the stream
        self._metrics.send_refusals.labels(channel, reason).inc()
        try:
            await self._store.add([entry], now=self._clock.now())
        except PyMongoError as exc:
            log.warning(
                "could not record %s suppression for a %s address: %s",
                reason,
                channel,
                type(exc).__name__,
            )

    def recent(self, channel: str, customer: str, address: str | None) -> str | None:
        """The reason of an entry the stream brought that stops this send, if any."""
        if not self.live:
            return None
        for i in candidate_ids(channel, customer, address):
            reason = self.live.get(i)
            if reason is not None:
                return reason
        return None

    async def follow(self) -> None:
        """Follow the change stream until cancelled (reconnecting with back-off)."""
        token: Mapping[str, Any] | None = None
        backoff_s = 0.5
        while True:
            try:
                start_at: Timestamp | None = None
                if token is None:
                    # Opened fresh: every entry after this cluster time will come; a batch read
                    # before this moment is looked up again before it sends.
                    start_m = self._clock.monotonic()
                    start_at = await self._store.cluster_time()
                    self.horizon_m = max(self.horizon_m, start_m)
                stream = await self._store.open(
                    token=token, start_at=start_at, max_await_ms=self._max_await_ms
                )
                try:
                    self._set_up(True)
                    while stream.alive:
                        event = await stream.try_next()
                        if event is not None:
                            self._apply(event)
                            backoff_s = 0.5
                        token = stream.resume_token or token
                finally:
                    with anyio.CancelScope(shield=True):
                        await stream.close()
                token = None  # invalidated (the collection was dropped): from now
                self._lost("invalidated")
            except OperationFailure as exc:
                if exc.code in HISTORY_LOST_CODES:
                    token = None
                    self._lost("history_lost")
                else:
                    log.warning("suppression stream failed: %s", _line(exc))
            except PyMongoError as exc:
                log.warning("suppression stream connection failed: %s", type(exc).__name__)
            self._set_up(False)
            await self._clock.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 10.0)

    def _apply(self, event: Mapping[str, Any]) -> None:
        op = event.get("operationType")
        key = str((event.get("documentKey") or {}).get("_id"))
        if op == "delete":
            self.live.pop(key, None)
            # A lifted entry must not linger as "suppressed" in a cache that outlives it.
            if self.on_entry is not None:
                self.on_entry(key, None)
            return
        # An insert, or an update looked up whole (None when the entry was removed since: it
        # stays suppressed here until its delete event, which comes next).
        doc = event.get("fullDocument") or {}
        reason = str(doc.get("reason") or "manual")
        if len(self.live) >= self._live_cap:
            self.live.clear()
            self._lost("overflow")
        self.live[key] = reason
        self._metrics.suppressions_seen.inc()
        if self.on_entry is not None:
            self.on_entry(key, reason)

    def _lost(self, why: str) -> None:
        """Entries may have been missed: every batch read before now is looked up again."""
        self.horizon_m = self._clock.monotonic()
        self._metrics.suppression_stream_restarts.labels(why).inc()
        log.warning("suppression stream restarted (%s): pending sends are checked again", why)

    def _set_up(self, value: bool) -> None:
        self.up = value
        self._metrics.suppression_stream_up.set(1 if value else 0)
        if value:
            self.opened.set()


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
