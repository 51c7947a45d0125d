"""The send path's one call into tracking: a prepared batch's messages made tracked.

`Tracker.track(campaign, channel, items, now, do_not_track)` runs after the batch is rendered
and its suppressed recipients dropped, and before texts are gated (a short link changes a
text's length). Per batch it costs at most two round trips: the campaign's link table
(recorded on the first batch of a run, append-only after) and the SMS short links. Who is
do-not-track comes with the batch's recipients (the same read of the orders collection).

    TRACKING            off | clicks | opens_and_clicks (the most a campaign may use)
    campaign.tracking   the same values: narrows TRACKING, never widens it
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from ..domain.engagement import HONEYPOT_LINK, HitKind
from ..domain.models import Campaign, Channel
from ..domain.sms import segments
from ..domain.templates import CampaignTemplates, LinkSlots
from ..domain.variants import with_variant
from ..ports import EmailMessage, SmsMessage
from . import rewrite, slots
from .tokens import TrackingSigner

MODES = ("off", "clicks", "opens_and_clicks")
YIELD_EVERY = 50  # messages rewritten between two turns of the event loop
RECORDED_CAMPAIGNS = 256  # link tables remembered (the campaigns sending now, with room)
SLOTTED_TEMPLATES = 256  # campaigns' templates compiled with link slots, remembered
_CUT = "\x00"  # where a fragment's token goes (see Tracker.__init__)
_HIDDEN_TAIL = rewrite.honeypot(_CUT).split(_CUT)[1]
_PIXEL_TAIL = rewrite.pixel(_CUT).split(_CUT)[1]


def effective_mode(configured: str, campaign: str | None) -> str:
    """The narrower of the two; an unknown campaign value means off (never wider)."""
    if campaign is None:
        return configured
    if campaign not in MODES:
        return "off"
    return MODES[min(MODES.index(configured), MODES.index(campaign))]


@dataclass(frozen=True)
class TrackingConfig:
    mode: str  # off | clicks | opens_and_clicks
    base_url: str = ""  # PUBLIC_BASE_URL
    signer: TrackingSigner | None = None
    honeypot: bool = True


class LinkTables(Protocol):
    async def record_links(self, campaign_key: str, table: Sequence[str]) -> list[str] | None: ...

    async def save_short_links(self, rows: Sequence[dict[str, Any]]) -> None: ...


class _Item(Protocol):
    customer: str
    message: EmailMessage | SmsMessage


class Tracker:
    def __init__(self, config: TrackingConfig, tables: LinkTables | None) -> None:
        if config.mode != "off" and (config.signer is None or tables is None):
            raise ValueError("tracking needs PUBLIC_BASE_URL and LINK_SECRET")
        self.config = config
        self._escaped_base = escaped = html.escape(config.base_url)
        # What a tracked email's links, hidden link and pixel are made of, but their tokens
        # (which need no escaping: base64url and a dot).
        self._click = f"{config.base_url}/c/"
        self._quoted = f'"{escaped}/c/'
        self._hidden_head = rewrite.honeypot(f"{escaped}/c/{_CUT}", escaped=True).split(_CUT)[0]
        self._pixel_head = rewrite.pixel(f"{escaped}/o/{_CUT}", escaped=True).split(_CUT)[0]
        self._tables = tables
        # The link tables of the campaigns sent lately, least recently used first: a replica
        # that runs for months sends thousands of campaigns, and a forgotten one costs one read.
        self._recorded: OrderedDict[str, tuple[tuple[str, ...], dict[str, int]]] = OrderedDict()
        self._slotted: OrderedDict[tuple[str, CampaignTemplates], CampaignTemplates] = OrderedDict()

    def templates_for(self, campaign: Campaign, templates: CampaignTemplates) -> CampaignTemplates:
        """The templates a batch of `campaign` renders with: compiled with link slots when it
        is tracked and that can be done exactly (reactor/engagement/slots.py), so `track`
        fills each message's links instead of scanning for them."""
        if effective_mode(self.config.mode, getattr(campaign, "tracking", None)) == "off":
            return templates
        key = (campaign.key, templates)
        known = self._slotted.get(key)
        if known is None:
            table = {url: n for n, url in enumerate(_links_of(campaign))}
            known = self._slotted[key] = slots.slotted(templates, table, self.config.base_url + "/")
            while len(self._slotted) > SLOTTED_TEMPLATES:
                self._slotted.popitem(last=False)
        self._slotted.move_to_end(key)
        return known

    async def track(
        self,
        campaign: Campaign,
        channel: Channel,
        items: Sequence[_Item],
        now: dt.datetime,
        do_not_track: Collection[str] = (),
    ) -> None:
        """`do_not_track`: the batch's customers marked so (the send path reads them with the
        recipients): their messages go out untracked."""
        if not items:
            return
        mode = effective_mode(self.config.mode, getattr(campaign, "tracking", None))
        table = await self._table(campaign) if mode != "off" else None
        short_rows: list[dict[str, Any]] = []
        plans = _Plans()  # the batch's tags and URLs, planned once for all its messages
        for n, item in enumerate(items):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                # ~0.1 ms a message (a signature per link): let redirects be answered.
                await anyio.lowlevel.checkpoint()
            if (
                table is None
                or item.customer in do_not_track
                or not _fits(campaign.key, item.customer)
            ):
                item.message = _untracked(item.message)
                continue
            message = item.message
            if isinstance(message, SmsMessage):
                item.message = self._sms(
                    campaign, item.customer, message, table, now, short_rows, plans
                )
            else:
                item.message = self._email(
                    campaign, item.customer, message, table, mode, now, plans
                )
        if short_rows:
            assert self._tables is not None
            await self._tables.save_short_links(short_rows)

    async def _table(self, campaign: Campaign) -> dict[str, int] | None:
        wanted = _links_of(campaign)
        known = self._recorded.get(campaign.key)
        if known is not None and known[0] == wanted:
            self._recorded.move_to_end(campaign.key)
            return known[1]
        assert self._tables is not None
        stored = await self._tables.record_links(campaign.key, wanted)
        if stored is None:
            return None  # the campaign is gone: nothing to point links at
        numbers = {url: n for n, url in enumerate(stored)}
        self._recorded[campaign.key] = (wanted, numbers)
        self._recorded.move_to_end(campaign.key)
        while len(self._recorded) > RECORDED_CAMPAIGNS:
            self._recorded.popitem(last=False)
        return numbers

    def _signers(
        self, campaign: Campaign, now: dt.datetime, plans: _Plans
    ) -> tuple[Callable[[str], Callable[[int], str]], ...]:
        """The batch's email token signers (clicks, opens): what its tokens share is hashed
        once for all of them."""
        if plans.signers is None:
            signer = self.config.signer
            assert signer is not None
            plans.signers = tuple(
                signer.batch_signer(
                    campaign=campaign.key, channel=Channel.EMAIL, kind=kind, issued_at=now
                )
                for kind in (HitKind.CLICK, HitKind.OPEN)
            )
        return plans.signers

    def _email(
        self,
        campaign: Campaign,
        customer: str,
        message: EmailMessage,
        table: dict[str, int],
        mode: str,
        now: dt.datetime,
        plans: _Plans,
    ) -> EmailMessage:
        clicks, opens = self._signers(campaign, now, plans)
        sign = clicks(customer)
        found = message.slots
        if found is not None:  # the links are slots: filled, not searched for
            plan = plans.slots.get(id(found))
            if plan is None or plan.slots is not found:
                plan = plans.slots[id(found)] = _SlotPlan(found, table, self.config.honeypot)
            tokens = {n: sign(n) for n in plan.numbers}
            text, body = plan.fill(message.text, message.html, self._click, self._quoted, tokens)
            hidden = tokens.get(HONEYPOT_LINK)  # signed with the rest when there is one
        else:
            text, body = self._rewritten(message, table, sign, plans)
            hidden = sign(HONEYPOT_LINK) if self.config.honeypot and body is not None else None
        if body is not None:
            # Tokens need no escaping (base64url and a dot), only the base URL.
            extra = f"{self._hidden_head}{hidden}{_HIDDEN_TAIL}" if hidden is not None else ""
            if mode == "opens_and_clicks":
                extra += f"{self._pixel_head}{opens(customer)(0)}{_PIXEL_TAIL}"
            body = rewrite.append_to_body(body, extra) if extra else body
        return dataclasses.replace(message, text=text, html=body, slots=None)

    def _rewritten(
        self,
        message: EmailMessage,
        table: dict[str, int],
        sign: Callable[[int], str],
        plans: _Plans,
    ) -> tuple[str | None, str | None]:
        """The message's parts with each table link found by the regular expressions and
        rewritten (templates without slots)."""
        prefix = self._click
        tokens: dict[int, str] = {}  # a link in both parts is signed once (the same token)

        def token(n: int) -> str:
            got = tokens.get(n)
            if got is None:
                got = tokens[n] = sign(n)
            return got

        skip = self.config.base_url + "/"
        text = message.text
        if text:
            text = rewrite.rewrite_text(text, table, lambda n: prefix + token(n), skip, plans.text)
        body = message.html
        if body is not None:
            escaped = self._escaped_base + "/c/"
            body = rewrite.rewrite_html(
                body, table, lambda n: escaped + token(n), skip, plans.html, escaped=True
            )
        return text, body

    def _sms(
        self,
        campaign: Campaign,
        customer: str,
        message: SmsMessage,
        table: dict[str, int],
        now: dt.datetime,
        rows: list[dict[str, Any]],
        plans: _Plans,
    ) -> SmsMessage:
        assert self.config.signer is not None
        signer = self.config.signer

        def short(n: int) -> str:
            code = signer.short_code(campaign.key, customer, n)
            rows.append(
                {
                    "_id": code,
                    "campaign": campaign.key,
                    "channel": Channel.SMS.value,
                    "customer": customer,
                    "link": n,
                    "at": now,
                }
            )
            return f"{self.config.base_url}/s/{code}"

        skip = self.config.base_url + "/"
        body = rewrite.rewrite_text(message.body, table, short, skip, plans.sms)
        return dataclasses.replace(message, body=body, segments=segments(body).count)


@dataclass
class _Plans:
    """One batch's rewriting plans, per part (see `rewrite.Plans`), and its slot plans."""

    html: rewrite.Plans = dataclasses.field(default_factory=dict)
    text: rewrite.Plans = dataclasses.field(default_factory=dict)
    sms: rewrite.Plans = dataclasses.field(default_factory=dict)
    slots: dict[int, _SlotPlan] = dataclasses.field(default_factory=dict)
    # The batch's email token signers (clicks, opens): see TrackingSigner.batch_signer.
    signers: tuple[Callable[[str], Callable[[int], str]], ...] | None = None


class _SlotPlan:
    """Each slot's link number in the recorded table (None: leave it as written), and the
    numbers a message signs (the honeypot's too): worked out once per batch."""

    def __init__(self, found: LinkSlots, table: dict[str, int], honeypot: bool) -> None:
        self.slots = found  # held: the plan is keyed by its id
        self.text = [(table.get(url), w) for url, w in found.text]
        self.html = [(table.get(url), w) for url, w in found.html]
        numbers = {n for n, _ in self.text + self.html if n is not None}
        self.numbers = [*sorted(numbers), *([HONEYPOT_LINK] if honeypot else [])]

    def fill(
        self,
        text: str | None,
        body: str | None,
        prefix: str,
        quoted: str,
        tokens: dict[int, str],
    ) -> tuple[str | None, str | None]:
        """The message's parts with each slot's tracked URL (`prefix` + token in the text,
        `quoted` + token + `"` in the HTML), or its link as written where the table has none."""
        if text is not None:
            values = [w if n is None else prefix + tokens[n] for n, w in self.text]
            text = slots.finish_text(text, self.slots, values)
        if body is not None:
            values = [w if n is None else quoted + tokens[n] + '"' for n, w in self.html]
            body = slots.finish_html(body, self.slots, values)
        return text, body


def _fits(campaign: str, customer: str) -> bool:
    """A token holds ids of up to 255 bytes; a longer one goes out untracked, never cut."""
    return len(campaign.encode()) <= 255 and len(customer.encode()) <= 255


def _untracked(message: EmailMessage | SmsMessage) -> EmailMessage | SmsMessage:
    """What goes to a recipient who is not tracked: the author's markers removed, nothing else."""
    if isinstance(message, SmsMessage):
        body = rewrite.strip_markers(message.body)
        return dataclasses.replace(message, body=body, segments=segments(body).count)
    found = message.slots
    if found is not None:  # each link as the author wrote it
        return dataclasses.replace(
            message,
            text=(
                slots.finish_text(message.text, found, slots.written(found.text))
                if message.text is not None
                else None
            ),
            html=(
                slots.finish_html(message.html, found, slots.written(found.html))
                if message.html is not None
                else None
            ),
            slots=None,
        )
    return dataclasses.replace(
        message,
        text=rewrite.strip_markers(message.text) if message.text else message.text,
        html=rewrite.strip_html_markers(message.html) if message.html else message.html,
    )


def _links_of(campaign: Campaign) -> tuple[str, ...]:
    """Every link the campaign's content can send, its split's variants' too (in order, each
    once), so every variant's links are in one table and a link keeps its number."""
    contents = [campaign]
    if campaign.split is not None:
        contents += [with_variant(campaign, v.key) for v in campaign.split.variants]
    links: dict[str, None] = {}
    for c in contents:
        email = c.email
        for url in rewrite.link_table(
            email.html if email else None,
            email.text if email else None,
            c.sms.body if c.sms else None,
        ):
            links.setdefault(url, None)
    return tuple(links)
