"""The deliveries ledger's vocabulary: one row per (campaign, channel, customer), its states, and
the per-campaign counters those states feed.

    pending ──► sent | failed | uncertain          (a send under way, then its outcome)
    (none)  ──► skipped | uncertain                 (recorded without sending)

`sent`, `failed`, `skipped` and `uncertain` are terminal: no epoch ever overwrites them. The
invariants are kept by the database's conditional writes (`LedgerOp`), not by what a writer last
read: a `pending` mark or an unsent record is an insert that any existing row refuses, so only the
epoch that marked a row can send it; an outcome applies only to the writer's own `pending` row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from .models import Channel


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNCERTAIN = "uncertain"


TERMINAL_STATES = frozenset(
    {DeliveryState.SENT, DeliveryState.FAILED, DeliveryState.SKIPPED, DeliveryState.UNCERTAIN}
)


class LedgerOp(StrEnum):
    MARK = "mark"  # insert a `pending` row; refused when any row exists (another epoch has it)
    OUTCOME = "outcome"  # this epoch's `pending` row becomes terminal; refused otherwise
    RECORD = "record"  # insert a terminal row without sending; refused when any row exists
    SETTLE = "settle"  # an earlier epoch's `pending` row becomes `uncertain`
    # This epoch's `uncertain` row becomes `sent`: the provider's own list shows the message
    # (the one terminal change allowed: the same fact, learned later; nothing is re-sent).
    RESOLVE = "resolve"


def delivery_id(campaign: str, channel: str, customer: str) -> str:
    return f"{campaign}:{channel}:{customer}"


class RowState(NamedTuple):
    """What the ledger holds for one customer on one channel: its state, the epoch that wrote
    it, and the shard of the campaign it belongs to (None: the campaign was not sharded)."""

    state: str
    epoch: int
    shard: int | None = None


@dataclass(frozen=True)
class DeliveryRecord:
    customer: str
    channel: str
    state: str  # a DeliveryState
    to: str | None = None
    provider_id: str | None = None
    error: str | None = None
    reason: str | None = None
    attempts: int = 0
    op: LedgerOp | None = None  # default: MARK for `pending`, RECORD for anything else
    segments: int | None = None  # an SMS's billed parts
    variant: str | None = None  # an A/B split's variant key (written when the row is inserted)

    @property
    def operation(self) -> LedgerOp:
        if self.op is not None:
            return self.op
        return LedgerOp.MARK if self.state == DeliveryState.PENDING else LedgerOp.RECORD


# `performance.*` counter of each (channel, state); `uncertain` is one counter for both.
_COUNTER_NAMES = {
    (Channel.EMAIL, DeliveryState.SENT): "emailsSent",
    (Channel.EMAIL, DeliveryState.FAILED): "emailsFailed",
    (Channel.EMAIL, DeliveryState.SKIPPED): "emailsSkipped",
    (Channel.SMS, DeliveryState.SENT): "smsSent",
    (Channel.SMS, DeliveryState.FAILED): "smsFailed",
    (Channel.SMS, DeliveryState.SKIPPED): "smsSkipped",
}
UNCERTAIN_COUNTER = "uncertain"
# Skipped rows whose reason is `suppressed:<why>` also count here (a subset of *Skipped); in the
# ledger's counts they appear as the pseudo-state SUPPRESSED.
SUPPRESSED = "suppressed"
SUPPRESSED_PREFIX = "suppressed:"
_SUPPRESSED_COUNTERS = {Channel.EMAIL: "emailsSuppressed", Channel.SMS: "smsSuppressed"}


def suppressed_counter(channel: str, state: str, reason: str | None) -> str | None:
    """The extra counter a row counts toward when a suppression stopped its send."""
    if state == DeliveryState.SKIPPED and reason and reason.startswith(SUPPRESSED_PREFIX):
        return _SUPPRESSED_COUNTERS[Channel(channel)]
    return None


def counter_name(channel: str, state: str) -> str:
    """The `performance` counter a terminal row of this channel and state counts toward."""
    return _COUNTER_NAMES.get((Channel(channel), DeliveryState(state)), UNCERTAIN_COUNTER)


def performance(counts: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """`performance` counters from the ledger's {channel: {state: n}} counts."""
    out = {
        name: counts.get(str(ch), {}).get(str(st), 0) for (ch, st), name in _COUNTER_NAMES.items()
    }
    out[UNCERTAIN_COUNTER] = sum(c.get(DeliveryState.UNCERTAIN, 0) for c in counts.values())
    for ch, name in _SUPPRESSED_COUNTERS.items():
        out[name] = counts.get(str(ch), {}).get(SUPPRESSED, 0)
    return out
