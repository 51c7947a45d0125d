"""The reactor's ports: what the scheduling and execution logic needs from the outside world.

Adapters (`reactor.adapters`) implement these against MongoDB, SMTP, Twilio and the system clock;
tests implement them with fakes. Nothing here knows a technology.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bson import Timestamp

if TYPE_CHECKING:
    from .domain.deliveries import DeliveryRecord, RowState
    from .domain.templates import LinkSlots


class Clock(Protocol):
    """Wall-clock time for schedules, and a way to wait that tests can drive."""

    def now(self) -> dt.datetime:
        """The current aware UTC time."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps: for durations, never for instants."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""
        ...


class _Event(Protocol):
    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


async def wait_for_event(clock: Clock, event: _Event, seconds: float) -> None:
    """Until `event` is set or `seconds` of `clock`'s time have passed, whichever comes first.

    Two plain tasks, the loser cancelled, not a task group cancelled: a send window waits like
    this a hundred times a second, and each task group left ~34 objects of cyclic garbage
    (tracebacks, cancel scopes), so young collections of ~45,000 objects held the event loop
    for ~20 ms (the tracking bench's redirect p99 rose with them). This costs a third as much
    and leaves none."""
    if event.is_set():
        return
    timer = asyncio.ensure_future(clock.sleep(seconds))
    woken = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((timer, woken), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        woken.cancel()


@dataclass(frozen=True)
class Recipient:
    customer_id: str
    name: str | None
    email: str | None
    phone: str | None
    # The customer's newest order row, every field (templates see it as `customer`).
    row: Mapping[str, Any] = field(default_factory=dict, compare=False)
    timezone: str | None = None  # an IANA name from CUSTOMER_TIMEZONE_FIELD (localTime sends)
    # Marked do-not-track on any of the customer's order rows (TRACKING_DO_NOT_TRACK_FIELD).
    do_not_track: bool = False


class Recipients(Protocol):
    """Where targeted customers' contact details come from (the segmentation database)."""

    async def resolve(self, customer_ids: Sequence[Any]) -> dict[str, Recipient]:
        """Contact details for one batch of ids, keyed by normalised customer id."""
        ...


@dataclass(frozen=True)
class EmailMessage:
    to: str
    subject: str
    text: str | None
    html: str | None
    message_id: str
    # Extra headers, e.g. List-Unsubscribe and List-Unsubscribe-Post (RFC 2369, RFC 8058).
    headers: tuple[tuple[str, str], ...] = ()
    sender: str | None = None  # the From header, when the campaign sets its own (email.from)
    # Set when the parts hold link slots (LinkSlots): the tracker fills them before anything
    # else reads the message; nothing sends one that still has them.
    slots: LinkSlots | None = None


@dataclass(frozen=True)
class SmsMessage:
    to: str
    body: str
    status_callback: str | None = None  # where Twilio posts this message's delivery status
    segments: int = 1  # the parts carriers bill and deliver it in


class EmailSender(Protocol):
    async def send(self, message: EmailMessage) -> str:
        """Send one email; returns the provider's id. Raises a DeliveryError subclass."""
        ...

    async def aclose(self) -> None: ...


class SmsSender(Protocol):
    async def send(self, message: SmsMessage) -> str:
        """Send one SMS; returns the provider's id (Twilio's message SID)."""
        ...

    async def find_sent(self, message: SmsMessage, since: dt.datetime) -> str | None:
        """The provider's id of `message` if the provider took it since `since` (how an
        uncertain send is resolved), else None."""
        ...

    async def aclose(self) -> None: ...


# ---- persistence -------------------------------------------------------------------------------
#
# Campaign documents travel as the mappings the backend stores (parsed by domain.models at the
# point of use), so that a store can hand back exactly what the database holds. Every method
# that changes state is a compare-and-set: it returns None/False when it did not apply.


class CampaignStore(Protocol):
    """Campaign documents: schedule reads, claims and leases (judged by the database's clock),
    counters, and errors recorded where an operator sees them."""

    async def ensure_indexes(self) -> None: ...
    async def list_active(self) -> list[dict[str, Any]]: ...
    async def get(
        self, campaign_id: Any, *, with_targets: bool = False
    ) -> dict[str, Any] | None: ...
    async def get_slice(self, campaign_id: Any, start: int, count: int) -> dict[str, Any] | None:
        """The campaign with only `targetedCustomerIds[start:start + count]`."""
        ...

    async def sending_state(self, campaign_id: Any) -> str:
        """By the database's clock: `running` (status running, window open), `window_closed`
        (running, end passed), `stopped` (any other status) or `gone`."""
        ...

    async def not_due_yet(self, campaign_id: Any) -> bool: ...
    async def target_problem(self, campaign_id: Any) -> str | None: ...
    async def record_invalid(self, campaign_id: Any, reason: str, detail: str) -> bool: ...
    async def claim_start(
        self, campaign_id: Any, *, owner: str, lease_s: float, grace_s: float
    ) -> dict[str, Any] | None: ...
    async def mark_missed(self, campaign_id: Any, *, grace_s: float, reason: str) -> bool: ...
    async def claim_takeover(
        self, campaign_id: Any, *, old_epoch: int, owner: str, lease_s: float
    ) -> dict[str, Any] | None: ...
    async def heartbeat(
        self, campaign_id: Any, *, epoch: int, owner: str, lease_s: float
    ) -> dict[str, Any] | None: ...
    async def release(
        self, campaign_id: Any, *, epoch: int, retry_after_s: float = 0.0
    ) -> bool: ...
    async def record_failure(
        self, campaign_id: Any, *, epoch: int, detail: str, max_failures: int, retry_after_s: float
    ) -> str | None: ...
    async def mark_sends_done(
        self, campaign_id: Any, *, epoch: int, performance: Mapping[str, int] | None = None
    ) -> bool: ...
    async def complete(self, campaign_id: Any, *, epoch: int | None = None) -> bool: ...
    async def add_performance(
        self, campaign_id: Any, *, epoch: int | None, counts: Mapping[str, int]
    ) -> bool: ...


class Ledger(Protocol):
    """The deliveries ledger: one row per (campaign, channel, customer); its invariants are kept
    by conditional writes (see domain.deliveries.LedgerOp)."""

    async def ensure_indexes(self) -> None: ...
    async def states(
        self, campaign: str, channel: str, customers: Sequence[str]
    ) -> dict[str, RowState]: ...
    async def write(
        self,
        campaign: str,
        *,
        epoch: int,
        records: Iterable[DeliveryRecord],
        now: dt.datetime,
        shard: int | None = None,
    ) -> set[str]:
        """Apply in order; returns the delivery ids that were refused. With `shard`, rows are
        that shard's: inserted with it, and settled only within it."""
        ...

    async def forget_pending(self, ids: Sequence[str], *, epoch: int) -> None: ...
    async def counts(self, campaign: str) -> dict[str, dict[str, int]]: ...
    async def pending_from_other_epochs(
        self, campaign: str, epoch: int, shard: int | None = None
    ) -> list[dict[str, Any]]: ...
    async def record_execution(
        self, campaign: str, *, epoch: int, owner: str, fields: dict[str, Any]
    ) -> None: ...


class ChangeStream(Protocol):
    """An open change stream (pymongo's AsyncChangeStream has this shape)."""

    @property
    def alive(self) -> bool: ...
    @property
    def resume_token(self) -> Mapping[str, Any] | None: ...
    async def try_next(self) -> Mapping[str, Any] | None: ...
    async def close(self) -> None: ...


class ChangeFeed(Protocol):
    """The campaigns database's change stream and what list-then-watch needs around it."""

    async def cluster_time(self) -> Timestamp: ...
    async def server_time(self) -> dt.datetime: ...
    async def open(
        self, *, token: Mapping[str, Any] | None, start_at: Timestamp, max_await_ms: int
    ) -> ChangeStream: ...
    def is_barrier(self, event: Mapping[str, Any]) -> bool: ...
    async def write_barrier(self, nonce: str) -> None: ...
    async def load_token(self) -> Mapping[str, Any] | None: ...
    async def save_token(self, token: Mapping[str, Any], now: dt.datetime) -> None: ...


__all__ = [
    "CampaignStore",
    "ChangeFeed",
    "ChangeStream",
    "Clock",
    "EmailMessage",
    "EmailSender",
    "Ledger",
    "Recipient",
    "Recipients",
    "SmsMessage",
    "SmsSender",
]
