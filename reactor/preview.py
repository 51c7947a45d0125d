"""`reactor preview CAMPAIGN_ID [--customer ID] [--send-to ADDRESS_OR_PHONE]`.

Prints a campaign's messages exactly as they would go to one customer (the headers, the text part
— generated from the HTML when the campaign gives HTML only — the HTML part, and the SMS), built
by the same functions a run uses. With `--send-to`, one test message goes through the configured
provider to that address or number instead, marked "[TEST]" in its subject. It touches no ledger
row, counter, rate budget or campaign field: it reads the campaign and the customer and writes
nothing. A test message's links are signed for a stand-in customer id (`preview:<id>`), so a
click on the test copy's unsubscribe link cannot unsubscribe the real customer, and a test SMS
asks for no status callback.

With tracking on, links are rewritten as a run rewrites them (reactor/engagement/tracker.py),
with the link numbers the campaign's table gives them: the printed preview shows the customer's
own tracked links and pixel, and writes nothing. A test email's tracked links name the stand-in,
so the listener sends them where they lead and records nothing; for them to lead anywhere, the
test email records the campaign's link table (`trackedLinks`: append-only, the numbers the
run's first batch would give the same links), the one thing a preview writes. A test SMS keeps
its links as written (a short link is a row of its own).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import IO, Any

from .domain.addresses import email_address, phone_address
from .domain.engagement import PREVIEW_CUSTOMER_PREFIX
from .domain.errors import DeliveryError, InvalidCampaign
from .domain.ids import id_variants, normalise_id
from .domain.messages import email_message, sms_message, templates_of
from .domain.models import Campaign, Channel, parse_campaign
from .domain.templates import TemplateRenderError
from .engagement.tracker import Tracker
from .ports import EmailMessage, Recipient, SmsMessage

EXIT_PROBLEM = 1


class PreviewError(Exception):
    """Raised when the preview cannot be made: no such campaign or customer, bad content."""


async def run_preview(
    settings: Any,
    campaign_id: str,
    *,
    customer: str | None,
    send_to: str | None,
    out: IO[str],
) -> int:
    """Print the preview to `out` (and send one test message); 0, or 1 with the problem."""
    from .app import mongo_client

    client = mongo_client(settings.mongo_uri.get_secret_value(), "preview")
    seg_client = (
        mongo_client(settings.segmentation_uri().get_secret_value(), "preview")
        if settings.segmentation_mongo_uri is not None
        else client
    )
    try:
        campaign = await _campaign(
            client[settings.campaigns_db][settings.campaigns_collection], campaign_id
        )
        recipient = await _recipient(seg_client, settings, campaign, customer)
        tracker = _tracker(settings, client, record=False)
        messages = await build_messages(settings, campaign, recipient, tracker=tracker)
        print_preview(campaign, recipient, messages, out, sender=settings.email_from)
        if send_to is not None:
            test = await build_messages(
                settings,
                campaign,
                _stand_in(recipient),
                send_to=send_to,
                tracker=_tracker(settings, client, record=True),
            )
            await send_test(settings, test, out)
    except PreviewError as exc:
        print(f"reactor preview: {exc}", file=out)
        return EXIT_PROBLEM
    finally:
        if seg_client is not client:
            await seg_client.close()
        await client.close()
    return 0


async def _campaign(collection: Any, campaign_id: str) -> Campaign:
    doc = await collection.find_one({"_id": {"$in": id_variants(campaign_id)}})
    if doc is None:
        raise PreviewError(f"no campaign with _id {campaign_id}")
    try:
        campaign = parse_campaign(doc)
        templates_of(campaign)
    except InvalidCampaign as exc:
        raise PreviewError(f"campaign {campaign_id} cannot be sent: {exc}") from None
    return campaign


async def _recipient(
    seg_client: Any, settings: Any, campaign: Campaign, customer: str | None
) -> Recipient:
    from .adapters.mongo import MongoRecipients

    if customer is None:
        if not campaign.targets:
            raise PreviewError("the campaign lists no targeted customers: name one with --customer")
        customer = normalise_id(campaign.targets[0])
    rcfg = settings.recipients_config()
    recipients = MongoRecipients(seg_client[rcfg.db][rcfg.collection], rcfg)
    found = await recipients.resolve([customer])
    recipient = found.get(normalise_id(customer))
    if recipient is None:
        raise PreviewError(f"customer {customer} has no row in {rcfg.db}.{rcfg.collection}")
    return recipient


def _stand_in(recipient: Recipient) -> Recipient:
    return dataclasses.replace(
        recipient, customer_id=f"{PREVIEW_CUSTOMER_PREFIX}{recipient.customer_id}"
    )


class _PreviewTables:
    """The campaign's link table as the next batch would record it (what is stored, then the
    content's links it lacks, in order): read only, unless `record` (a test email, whose links
    must lead somewhere). Short links are never saved."""

    def __init__(self, store: Any, *, record: bool) -> None:
        self._store = store
        self._record = record

    async def record_links(self, campaign_key: str, table: Sequence[str]) -> list[str] | None:
        if self._record:
            recorded: list[str] | None = await self._store.record_links(campaign_key, table)
            return recorded
        stored: list[str] | None = await self._store.link_table(campaign_key)
        if stored is None:
            return None
        return stored + [u for u in table if u not in stored]

    async def save_short_links(self, rows: Sequence[dict[str, Any]]) -> None:
        return None


def _tracker(settings: Any, client: Any, *, record: bool) -> Tracker | None:
    config = settings.tracking_config()
    if config.mode == "off":
        return None
    from .adapters.mongo.engagement import MongoEngagement

    store = MongoEngagement(client[settings.campaigns_db], settings.campaigns_collection)
    return Tracker(config, _PreviewTables(store, record=record))


async def build_messages(
    settings: Any,
    campaign: Campaign,
    recipient: Recipient,
    *,
    send_to: str | None = None,
    tracker: Tracker | None = None,
) -> dict[Channel, EmailMessage | SmsMessage | str]:
    """Each channel's message for `recipient` as a run builds it (or why it cannot be built):
    to `send_to` instead, when given, on the channel that address belongs to. With `tracker`,
    links are rewritten as a run rewrites them (a test SMS keeps them as written)."""
    cfg = settings.send_config()
    links = settings.links()
    now = dt.datetime.now(dt.UTC)
    out: dict[Channel, EmailMessage | SmsMessage | str] = {}
    for channel in sorted(campaign.channels):
        if send_to is not None and channel is not _channel_of(send_to):
            continue
        if channel is Channel.EMAIL:
            to, problem = email_address(send_to or recipient.email)
        else:
            to, problem = phone_address(send_to or recipient.phone, cfg.default_phone_region)
        if to is None:
            out[channel] = f"skipped: {problem}"
            continue
        try:
            if channel is Channel.EMAIL:
                message: EmailMessage | SmsMessage = email_message(
                    campaign, recipient, to, message_domain=cfg.message_domain, links=links, now=now
                )
            else:
                message = sms_message(
                    campaign, recipient, to, links=links, now=now, opt_out_text=cfg.sms_opt_out_text
                )
        except TemplateRenderError as exc:
            out[channel] = f"skipped: template_error: {exc}"
            continue
        if tracker is not None and not (send_to is not None and channel is Channel.SMS):
            message = await _tracked(tracker, campaign, channel, recipient, message, now)
        if send_to is not None:
            message = _as_test(message)
        out[channel] = message
    if send_to is not None and not out:
        raise PreviewError(f"the campaign has no {_channel_of(send_to)} content for {send_to}")
    return out


async def _tracked(
    tracker: Tracker,
    campaign: Campaign,
    channel: Channel,
    recipient: Recipient,
    message: EmailMessage | SmsMessage,
    now: dt.datetime,
) -> EmailMessage | SmsMessage:
    item = _Item(recipient.customer_id, message)
    marked = {recipient.customer_id} if recipient.do_not_track else set()
    await tracker.track(campaign, channel, [item], now, do_not_track=marked)
    return item.message


@dataclasses.dataclass
class _Item:
    customer: str
    message: EmailMessage | SmsMessage


def _channel_of(address: str) -> Channel:
    return Channel.EMAIL if "@" in address else Channel.SMS


def _as_test(message: EmailMessage | SmsMessage) -> EmailMessage | SmsMessage:
    if isinstance(message, EmailMessage):
        return dataclasses.replace(message, subject=f"[TEST] {message.subject}")
    return dataclasses.replace(message, status_callback=None)


def print_preview(
    campaign: Campaign,
    recipient: Recipient,
    messages: dict[Channel, EmailMessage | SmsMessage | str],
    out: IO[str],
    *,
    sender: str | None = None,
) -> None:
    print(f"Campaign: {campaign.name} (ID: {campaign.key})", file=out)
    print(f"Customer: {recipient.customer_id}", file=out)
    for channel, message in messages.items():
        print(f"\n=== {channel} ===", file=out)
        if isinstance(message, str):
            print(message, file=out)
        elif isinstance(message, EmailMessage):
            _print_email(campaign, message, out, sender)
        else:
            print(f"To: {message.to}", file=out)
            print(f"Segments: {message.segments}", file=out)
            print(f"\n{message.body}", file=out)


def _print_email(
    campaign: Campaign, message: EmailMessage, out: IO[str], sender: str | None
) -> None:
    kind = "text/plain" if message.html is None else "text/html"
    if message.text is not None and message.html is not None:
        kind = "multipart/alternative"
    for name, value in (
        ("From", sender or "(EMAIL_FROM is not set)"),
        ("To", message.to),
        ("Subject", message.subject),
        ("Message-ID", message.message_id),
        *message.headers,
        ("Content-Type", kind),
    ):
        print(f"{name}: {value}", file=out)
    assert campaign.email is not None
    if message.text is not None:
        generated = " (generated from the HTML)" if campaign.email.text is None else ""
        print(f"\n--- text/plain{generated} ---\n{message.text}", file=out)
    if message.html is not None:
        print(f"\n--- text/html ---\n{message.html}", file=out)


async def send_test(
    settings: Any, messages: dict[Channel, EmailMessage | SmsMessage | str], out: IO[str]
) -> None:
    """Send the test message through the configured provider: no ledger, counter or budget."""
    from .adapters.smtp import SmtpEmailSender
    from .adapters.twilio_sms import TwilioSmsSender

    for channel, message in messages.items():
        if isinstance(message, str):
            raise PreviewError(f"no test {channel} sent: {message}")
        sender: Any
        if isinstance(message, EmailMessage):
            smtp = settings.smtp_config()
            if smtp is None:
                raise PreviewError("email is not configured (SMTP_HOST / EMAIL_FROM)")
            sender = SmtpEmailSender(smtp)
        else:
            twilio = settings.twilio_config()
            if twilio is None:
                raise PreviewError("SMS is not configured (TWILIO_* settings)")
            sender = TwilioSmsSender(twilio)
        try:
            provider_id = await sender.send(message)
        except DeliveryError as exc:
            raise PreviewError(f"the test {channel} was not sent: {exc}") from None
        finally:
            await sender.aclose()
        print(f"\nSent a test {channel} to {message.to} (provider id {provider_id})", file=out)
