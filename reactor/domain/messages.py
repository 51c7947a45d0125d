"""One campaign's content rendered for one recipient: the email or SMS as a provider gets it.

The content is the campaign's compiled templates (`templates.compile_campaign`) rendered with
the recipient's context; an HTML-only email gets its text part from the rendered HTML
(`html_text.html_to_text`). What comes out holds the final subject, HTML, text and SMS strings:
anything that rewrites them (tracked links) works on the returned message. A part that cannot be
rendered for this recipient raises `TemplateRenderError`.

With links configured, every email carries List-Unsubscribe and List-Unsubscribe-Post (RFC 2369,
RFC 8058) and its body an unsubscribe link: where the content has no `{{unsubscribe_url}}`, a
footer with the link and the sender's postal address is added to the text and the HTML part.
"""

from __future__ import annotations

import datetime as dt
import html
import re
import unicodedata
import uuid

from ..ports import EmailMessage, Recipient, SmsMessage
from .consent import Links
from .deliveries import delivery_id
from .html_text import html_to_text, tidy
from .models import Campaign, Channel
from .sms import segments, with_opt_out
from .templates import (
    CampaignTemplates,
    TemplateRenderError,
    campaign_parts,
    compile_campaign,
    render_context,
)

_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


def templates_of(campaign: Campaign) -> CampaignTemplates:
    """The campaign's compiled templates (compiled once, then cached)."""
    return compile_campaign(campaign.key, campaign_parts(campaign.email, campaign.sms))


def context_of(
    campaign: Campaign, recipient: Recipient, channel: Channel, unsubscribe_url: str = ""
) -> dict[str, object]:
    return render_context(
        name=recipient.name or "",
        email=recipient.email or "",
        phone=recipient.phone or "",
        unsubscribe_url=unsubscribe_url,
        row=recipient.row,
        campaign_name=campaign.name,
        campaign_id=campaign.key,
        channel=str(channel),
    )


def sms_message(
    campaign: Campaign,
    recipient: Recipient,
    to: str,
    *,
    links: Links | None = None,
    now: dt.datetime | None = None,
    opt_out_text: str = "",
    templates: CampaignTemplates | None = None,
) -> SmsMessage:
    """The text as it goes: rendered, with opt-out wording when it has none, its segments
    counted, and (with links) the StatusCallback Twilio reports its delivery to."""
    assert campaign.sms is not None
    url = ""
    if links is not None and now is not None and "unsubscribe_url" in campaign.sms.body:
        token = links.unsubscribe_token(campaign.key, recipient.customer_id, Channel.SMS, now)
        url = links.unsubscribe_url(token)
    compiled = (templates or templates_of(campaign)).sms
    assert compiled is not None
    body = with_opt_out(
        compiled.render(context_of(campaign, recipient, Channel.SMS, url)), opt_out_text
    )
    return SmsMessage(
        to=to,
        body=body,
        status_callback=(
            links.twilio_status_url_for(
                delivery_id(campaign.key, Channel.SMS, recipient.customer_id)
            )
            if links is not None
            else None
        ),
        segments=segments(body).count,
    )


def email_message(
    campaign: Campaign,
    recipient: Recipient,
    to: str,
    *,
    message_domain: str,
    links: Links | None = None,
    now: dt.datetime | None = None,
    templates: CampaignTemplates | None = None,
    sender: str | None = None,
) -> EmailMessage:
    assert campaign.email is not None
    compiled = templates or templates_of(campaign)
    assert compiled.subject is not None
    url = ""
    headers: tuple[tuple[str, str], ...] = ()
    if links is not None and now is not None:
        token = links.unsubscribe_token(campaign.key, recipient.customer_id, Channel.EMAIL, now)
        url = links.unsubscribe_url(token)
        headers = links.list_unsubscribe(token)
    context = context_of(campaign, recipient, Channel.EMAIL, url)
    subject = header_text(compiled.subject.render(context))
    body_html = compiled.html.render(context) if compiled.html is not None else None
    if compiled.text is not None:
        text: str | None = compiled.text.render(context)
    elif compiled.derived_text is not None:
        text = tidy(compiled.derived_text.render(context))
    else:
        text = _text_from(body_html) if body_html is not None else None
    if url:
        postal = links.postal_address if links is not None else None
        if text is not None and url not in text:
            text = text_footer(text, url, postal)
        if body_html is not None and html.escape(url) not in body_html:
            body_html = html_footer(body_html, url, postal)
    return EmailMessage(
        to=to,
        subject=subject,
        text=text,
        html=body_html,
        message_id=message_id(message_domain),
        headers=headers,
        sender=sender,
        slots=compiled.slots,
    )


def _text_from(body_html: str) -> str:
    try:
        return html_to_text(body_html)
    except Exception as exc:  # one recipient's message: skipped as template_error, not the batch
        raise TemplateRenderError(
            "text", None, f"cannot generate text from the HTML: {exc}"
        ) from exc


def text_footer(text: str, url: str, postal_address: str | None) -> str:
    lines = ["", "", "--", f"Unsubscribe: {url}"]
    if postal_address:
        lines.append(postal_address)
    return text.rstrip("\n") + "\n".join(lines) + "\n"


def html_footer(body: str, url: str, postal_address: str | None) -> str:
    parts = [f'<a href="{html.escape(url)}">Unsubscribe</a>']
    if postal_address:
        parts.append(html.escape(postal_address))
    footer = (
        '<p style="font-size:12px;color:#666;margin-top:24px">' + " &middot; ".join(parts) + "</p>"
    )
    ends = list(_BODY_END.finditer(body))
    if not ends:
        return body + footer
    at = ends[-1].start()
    return body[:at] + footer + body[at:]


def header_text(value: str) -> str:
    """A customer's data made safe for a header: no line breaks or other control characters
    (whatever a name contains), runs of white space folded to one space."""
    cleaned = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in value)
    return " ".join(cleaned.split())


def message_id(domain: str) -> str:
    """A Message-ID that reveals nothing internal (no campaign id, host or process): a random
    token at the sender's own domain."""
    return f"<{uuid.uuid4().hex}@{domain}>"
