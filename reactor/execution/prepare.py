"""Preparing one batch of a run on one channel: resolve the recipients, read what the ledger
already holds (a resumed or taken-over run never re-sends `sent`, and treats a `pending` row an
earlier epoch left as `uncertain`; a row of another shard is that shard's), drop the suppressed,
validate addresses, render the messages, and hold texts for the recipient's hours."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from ..config import SendConfig
from ..domain.addresses import email_address, phone_address
from ..domain.consent import Links, skip_reason
from ..domain.deliveries import TERMINAL_STATES, DeliveryRecord, DeliveryState, LedgerOp
from ..domain.messages import email_message, sms_message
from ..domain.models import Campaign, Channel
from ..ports import Clock, EmailSender, Ledger, Recipient, Recipients, SmsSender
from ..suppression import SuppressionList
from .ledger import Item
from .smsgate import gate_sms
from .state import Run

T = TypeVar("T")

YIELD_EVERY = 50  # recipients prepared between two turns of the event loop


@dataclass
class Prepared:
    """One batch ready to send on one channel: the rows to record without sending (skipped,
    or uncertain), and the messages."""

    found: int
    unsent: list[DeliveryRecord] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    waiting: list[tuple[float, Item]] = field(default_factory=list)  # for the recipient's hours


class Ahead(Generic[T]):
    """A result computed in the background of a task group; `get()` waits for it (and raises
    what it raised)."""

    def __init__(
        self, tg: anyio.abc.TaskGroup, fn: Callable[..., Awaitable[T]], *args: Any
    ) -> None:
        self._done = anyio.Event()
        self._result: T | None = None
        self._error: Exception | None = None
        tg.start_soon(self._run, fn, args)

    async def _run(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> None:
        try:
            self._result = await fn(*args)
        except Exception as exc:
            self._error = exc
        finally:
            self._done.set()

    async def get(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class BatchPreparer:
    """Builds the `Prepared` batch for a run; holds nothing of any run."""

    def __init__(
        self,
        *,
        recipients: Recipients,
        ledger: Ledger,
        senders: dict[Channel, EmailSender | SmsSender | None],
        clock: Clock,
        config: SendConfig,
        suppressions: SuppressionList | None,
        links: Links | None,
        sender: str | None = None,
    ) -> None:
        self._sender = sender  # the campaign's own From (email.from), else the identity's
        self._recipients = recipients
        self._ledger_rows = ledger
        self._senders = senders
        self._clock = clock
        self._config = config
        self._suppressions = suppressions
        self._links = links

    async def prepare(
        self, run: Run, campaign: Campaign, channel: Channel, batch: Sequence[str]
    ) -> Prepared:
        """Resolve one batch, read what the ledger already holds for it on this channel, and
        build the messages still to send (validated, rendered) and the rows to record without
        sending."""
        recipients = await self._recipients.resolve(batch)
        states = await self._ledger_rows.states(run.key, channel, batch)
        prepared = Prepared(found=len(recipients))
        configured = self._senders[channel] is not None
        for n, customer in enumerate(batch):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                # Validating and rendering a batch is ~0.1 ms a recipient: let the heartbeats,
                # timers and webhooks this loop also serves run in between.
                await anyio.lowlevel.checkpoint()
            if customer in states:
                state, epoch, shard = states[customer]
                if shard != run.shard_index:
                    continue  # listed twice, in another shard too: that shard's row decides
                if state in TERMINAL_STATES or epoch >= run.epoch:
                    continue
                if state == DeliveryState.PENDING:
                    # An earlier owner marked it after this run settled its leftovers (it had
                    # not yet noticed the takeover): it may have gone out, so never re-send.
                    prepared.unsent.append(
                        DeliveryRecord(
                            customer,
                            channel,
                            DeliveryState.UNCERTAIN,
                            reason="previous_owner_lost",
                            op=LedgerOp.SETTLE,
                        )
                    )
                    continue
            recipient = recipients.get(customer)
            address: str | None = None
            if recipient is None:
                problem = "not_found"
            elif not configured:
                problem = "channel_not_configured"
            else:
                address, problem = self._address(channel, recipient)
            if recipient is None or address is None:
                prepared.unsent.append(
                    DeliveryRecord(customer, channel, DeliveryState.SKIPPED, reason=problem)
                )
                continue
            prepared.items.append(
                Item(
                    customer, channel, address, self._message(campaign, channel, recipient, address)
                )
            )
        if self._suppressions is not None and prepared.items:
            await self._drop_suppressed(channel, prepared)
        if channel is Channel.SMS and prepared.items:
            gated = gate_sms(
                prepared.items,
                campaign,
                now=self._clock.now(),
                now_m=self._clock.monotonic(),
                default_hours=self._config.sms_send_hours,
                fallback_zone=self._config.sms_fallback_timezone,
                max_segments=self._config.sms_max_segments,
            )
            prepared.items, prepared.waiting = gated.ready, gated.waiting
            prepared.unsent.extend(gated.refused)
        return prepared

    async def _drop_suppressed(self, channel: Channel, prepared: Prepared) -> None:
        """One lookup for the batch: whoever is suppressed is recorded skipped, not sent."""
        assert self._suppressions is not None
        checked_m = self._clock.monotonic()
        reasons = await self._suppressions.check(
            channel, [(item.customer, item.to) for item in prepared.items]
        )
        keep: list[Item] = []
        for item in prepared.items:
            item.checked_m = checked_m
            reason = reasons.get(item.customer)
            if reason is None:
                keep.append(item)
                continue
            prepared.unsent.append(
                DeliveryRecord(
                    item.customer,
                    channel,
                    DeliveryState.SKIPPED,
                    to=item.to,
                    reason=skip_reason(reason),
                )
            )
        prepared.items = keep

    def _address(self, channel: Channel, recipient: Recipient) -> tuple[str | None, str]:
        if channel is Channel.EMAIL:
            return email_address(recipient.email)
        return phone_address(recipient.phone, self._config.default_phone_region)

    def _message(
        self, campaign: Campaign, channel: Channel, recipient: Recipient, address: str
    ) -> Any:
        now = self._clock.now()
        if channel is Channel.SMS:
            return sms_message(
                campaign,
                recipient,
                address,
                links=self._links,
                now=now,
                opt_out_text=self._config.sms_opt_out_text,
            )
        return email_message(
            campaign,
            recipient,
            address,
            message_domain=self._config.message_domain,
            links=self._links,
            now=now,
            sender=self._sender,
        )


def chunks(values: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]
