"""Preparing one batch of a run on one channel: resolve the recipients, read what the ledger
already holds (a resumed or taken-over run never re-sends `sent`, and treats a `pending` row an
earlier epoch left as `uncertain`; a row of another shard is that shard's), drop the suppressed,
validate addresses, render the messages, and hold texts for the recipient's hours. A recipient
whose message cannot be rendered (a template error with their data) is `skipped` with reason
`template_error` and the error; the others go on."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from ..config import SendConfig
from ..domain.addresses import email_address, phone_address
from ..domain.consent import Links, skip_reason
from ..domain.deliveries import (
    TERMINAL_STATES,
    DeliveryRecord,
    DeliveryState,
    LedgerOp,
    RowState,
)
from ..domain.messages import email_message, sms_message, templates_of
from ..domain.models import Campaign, Channel
from ..domain.splits import assign
from ..domain.templates import CampaignTemplates, TemplateRenderError
from ..domain.variants import with_variant
from ..engagement.tracker import Tracker
from ..metrics import Metrics
from ..ports import Clock, EmailSender, Ledger, Recipient, Recipients, SmsSender
from ..suppression import SuppressionList
from .ledger import Item
from .smsgate import gate_sms
from .state import Run

T = TypeVar("T")
log = logging.getLogger(__name__)

YIELD_EVERY = 50  # recipients prepared between two turns of the event loop
YIELD_AFTER_S = 0.005  # ...or sooner, when rendering takes longer (large templates, HTML to text)


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
        metrics: Metrics | None = None,
        tracker: Tracker | None = None,
        sender: str | None = None,
    ) -> None:
        self._tracker = tracker
        self._sender = sender  # the campaign's own From (email.from), else the identity's
        self._recipients = recipients
        self._ledger_rows = ledger
        self._senders = senders
        self._clock = clock
        self._config = config
        self._suppressions = suppressions
        self._links = links
        self._metrics = metrics

    async def prepare(
        self, run: Run, campaign: Campaign, channel: Channel, batch: Sequence[str]
    ) -> Prepared:
        """Resolve one batch, read what the ledger already holds for it on this channel, and
        build the messages still to send (validated, rendered) and the rows to record without
        sending."""
        split = SplitBatch(self._config.split_key, campaign, batch, self._templates)
        batch = split.batch
        if not batch:
            return Prepared(found=0)
        recipients = await self._recipients.resolve(batch)
        states = await self._ledger_rows.states(run.key, channel, batch)
        prepared = Prepared(found=len(recipients))
        failed = await self._build(run, channel, split, recipients, states, prepared)
        if failed:
            self._report_template_errors(campaign, channel, failed)
        if self._suppressions is not None and prepared.items:
            await self._drop_suppressed(channel, prepared)
        if self._tracker is not None:  # links rewritten in the rendered messages (issue 24)
            marked = {key for key, r in recipients.items() if r.do_not_track}
            await self._tracker.track(
                campaign, channel, prepared.items, self._clock.now(), do_not_track=marked
            )
            if any(getattr(i.message, "slots", None) is not None for i in prepared.items):
                raise RuntimeError("bug: a message left the tracker with its link slots unfilled")
        if channel is Channel.SMS and prepared.items:
            self._gate_sms(campaign, prepared)
        return prepared

    async def _build(
        self,
        run: Run,
        channel: Channel,
        split: SplitBatch,
        recipients: Mapping[str, Recipient],
        states: Mapping[str, RowState],
        prepared: Prepared,
    ) -> list[TemplateRenderError]:
        """For each customer of the batch the ledger does not already decide, the message to
        send, or the row saying why there is none; the template errors met on the way."""
        configured = self._senders[channel] is not None
        failed: list[TemplateRenderError] = []
        turn_at = time.perf_counter()
        for n, customer in enumerate(split.batch):
            if n % YIELD_EVERY == YIELD_EVERY - 1 or time.perf_counter() - turn_at > YIELD_AFTER_S:
                # Validating and rendering a batch is ~0.1 ms a recipient (a large template or
                # a text part generated from HTML, a few ms): let the heartbeats, timers and
                # webhooks this loop also serves run in between. CPU slicing, not waiting: the
                # process's own counter, not the Clock port.
                await anyio.lowlevel.checkpoint()
                turn_at = time.perf_counter()
            variant = split.variants.get(customer)
            if customer in states and _recorded(run, channel, customer, states[customer], prepared):
                continue
            built = self._build_one(
                channel, customer, variant, recipients.get(customer), configured, split, failed
            )
            if isinstance(built, Item):
                prepared.items.append(built)
            else:
                prepared.unsent.append(built)
        return failed

    def _build_one(
        self,
        channel: Channel,
        customer: str,
        variant: str | None,
        recipient: Recipient | None,
        configured: bool,
        split: SplitBatch,
        failed: list[TemplateRenderError],
    ) -> Item | DeliveryRecord:
        """One customer's message, or the `skipped` row saying why there is none (not found,
        channel not configured, an invalid address, a template error: added to `failed`)."""
        address: str | None = None
        if recipient is None:
            problem = "not_found"
        elif not configured:
            problem = "channel_not_configured"
        else:
            address, problem = self._address(channel, recipient)
        if recipient is None or address is None:
            return DeliveryRecord(
                customer, channel, DeliveryState.SKIPPED, reason=problem, variant=variant
            )
        try:
            content, templates = split.content(variant)
            message = self._message(content, channel, recipient, address, templates)
        except TemplateRenderError as exc:
            failed.append(exc)
            return DeliveryRecord(
                customer,
                channel,
                DeliveryState.SKIPPED,
                to=address,
                reason="template_error",
                error=str(exc),
                variant=variant,
            )
        return Item(customer, channel, address, message, variant=variant)

    def _gate_sms(self, campaign: Campaign, prepared: Prepared) -> None:
        """Texts outside the recipient's hours wait; those too long are refused."""
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

    def _report_template_errors(
        self, campaign: Campaign, channel: Channel, failed: list[TemplateRenderError]
    ) -> None:
        """One log line per batch (not per recipient: a million could fail alike), counted by
        part."""
        if self._metrics is not None:
            for exc in failed:
                self._metrics.template_errors.labels(channel, exc.part).inc()
        log.warning(
            "%d recipients of %s skipped on %s (template_error), e.g. %s",
            len(failed),
            campaign.name,
            channel,
            failed[0],
            extra={"campaign_id": campaign.key, "channel": str(channel), "count": len(failed)},
        )

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
                    variant=item.variant,
                )
            )
        prepared.items = keep

    def _address(self, channel: Channel, recipient: Recipient) -> tuple[str | None, str]:
        if channel is Channel.EMAIL:
            return email_address(recipient.email)
        return phone_address(recipient.phone, self._config.default_phone_region)

    def _templates(self, content: Campaign) -> CampaignTemplates:
        """`content`'s compiled templates; with link slots when the tracker fills them."""
        templates = templates_of(content)
        if self._tracker is None:
            return templates
        return self._tracker.templates_for(content, templates)

    def _message(
        self,
        campaign: Campaign,
        channel: Channel,
        recipient: Recipient,
        address: str,
        templates: CampaignTemplates,
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
                templates=templates,
            )
        return email_message(
            campaign,
            recipient,
            address,
            message_domain=self._config.message_domain,
            links=self._links,
            now=now,
            templates=templates,
            sender=self._sender,
        )


def chunks(values: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


def _recorded(
    run: Run,
    channel: Channel,
    customer: str,
    row: RowState,
    prepared: Prepared,
) -> bool:
    """Whether the ledger already decides this customer on this channel (so nothing is built
    for it): a row of another shard, a terminal row, or one of this epoch; a row an earlier
    owner left `pending` is recorded uncertain here, never re-sent."""
    state, epoch, shard = row
    if shard != run.shard_index:
        return True  # listed twice, in another shard too: that shard's row decides
    if state in TERMINAL_STATES or epoch >= run.epoch:
        return True
    if state == DeliveryState.PENDING:
        # An earlier owner marked it after this run settled its leftovers (it had not yet
        # noticed the takeover): it may have gone out, so never re-send.
        prepared.unsent.append(
            DeliveryRecord(
                customer,
                channel,
                DeliveryState.UNCERTAIN,
                reason="previous_owner_lost",
                op=LedgerOp.SETTLE,
            )
        )
        return True
    return False


class SplitBatch:
    """A batch as a split campaign sends it now: its test group, each customer with their own
    variant, and once the winner is chosen the rest with the winner's (until then the rest is
    left out: not marked in the ledger). Without a split: the whole batch, the campaign's own
    content."""

    def __init__(
        self,
        key: bytes,
        campaign: Campaign,
        batch: Sequence[str],
        compile: Callable[[Campaign], CampaignTemplates] = templates_of,
    ) -> None:
        self._compile = compile
        self.variants: dict[str, str] = {}
        self.batch: Sequence[str] = batch
        self._contents: dict[str | None, tuple[Campaign, CampaignTemplates]] = {}
        self._campaign = campaign
        split = campaign.split
        if split is None:
            return
        chosen = split.chosen
        for customer in batch:
            variant = assign(key, campaign.key, customer, split) or chosen
            if variant is not None:
                self.variants[customer] = variant
        self.batch = [c for c in batch if c in self.variants]

    def content(self, variant: str | None) -> tuple[Campaign, CampaignTemplates]:
        """The campaign as `variant` sends it (a variant only substitutes content fields), and
        its compiled templates (compiled when the campaign was armed: cached)."""
        if variant not in self._contents:
            content = self._campaign if variant is None else with_variant(self._campaign, variant)
            self._contents[variant] = (content, self._compile(content))
        return self._contents[variant]
