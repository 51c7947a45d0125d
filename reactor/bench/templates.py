"""Template rendering benchmark: messages rendered per second on one core.

A realistic newsletter (nested layout tables, a hero button, a loop over the customer's
recommended products with prices formatted by filters, a conditional loyalty block, a footer
with the unsubscribe link), its text part and subject, rendered by `email_message` — the function
a run uses, with signed unsubscribe links and List-Unsubscribe headers — for a fixed audience of
distinct customers (their order rows as the orders collection holds them). Each message counts
only if its HTML and text carry that customer's own name and first product: the work is real.
CPU time of this process is the clock (the machine is shared; wall time would measure the
neighbours), so the figure is messages per CPU-second on one core.

Informational figures: the same campaign with HTML only, where the text part is converted from
each rendered HTML (`html_to_text`); and the same layout with merge tags only (no blocks), whose
text template is derived from the HTML source once (`templates.derive_text_part`).

Informational too: the same newsletter rendered and then tracked (opens and clicks), in batches
of 250 as a run prepares them, with its links found once as slots (reactor/engagement/slots.py)
and, beside it, with each rendered message rewritten by regular expressions: the tracker's step
per message is the CPU time over rendering alone. A tracked message counts only if its HTML
carries tracked links and the pixel.

Goal: >= 5,000 messages/s per core (issue 24).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..domain.consent import LinkKey, Links, LinkSigner
from ..domain.messages import email_message, templates_of
from ..domain.models import Campaign, Channel, parse_campaign
from ..domain.templates import CampaignTemplates
from ..engagement.tokens import TrackingSigner
from ..engagement.tracker import Tracker, TrackingConfig
from ..ports import EmailMessage, Recipient, SmsMessage
from .figures import Figure

GOAL_PER_S = 5_000
MESSAGES = 20_000  # sizes chosen before looking
QUICK_MESSAGES = 2_000

SUBJECT = "{{ first_name | default('Hello') }}, spring is here: up to 40% off"

NEWSLETTER_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Spring sale</title>
<style>.btn a{color:#fff;text-decoration:none}td{font-family:Arial,sans-serif}</style></head>
<body style="margin:0;padding:0;background:#f4f4f4">
<table width="100%" cellpadding="0" cellspacing="0" role="presentation"><tr><td align="center">
 <table width="600" cellpadding="0" cellspacing="0" role="presentation" style="background:#fff">
  <tr>
   <td style="padding:16px"><a href="https://shop.example.com/?utm_source=newsletter"><img
     src="https://cdn.example.com/logo.png" alt="Example Shop" width="120" height="40"></a></td>
   <td align="right" style="padding:16px;font-size:12px">
     <a href="https://shop.example.com/view/{{ campaign.id }}">View in your browser</a></td>
  </tr>
  <tr><td colspan="2" style="padding:0 16px">
   <h1 style="font-size:28px">Hello {{ first_name | default('there') }}, spring is here</h1>
   <p>Our <strong>spring sale</strong> starts today: up to <em>40% off</em> on garden
   furniture &amp; tools{% if customer.city %}, with free delivery in {{ customer.city }}{% endif %}.</p>
   <table role="presentation" cellpadding="0" cellspacing="0"><tr>
    <td class="btn" style="background:#e4002b;border-radius:4px;padding:12px 24px">
     <a href="https://shop.example.com/sale?c=spring&amp;u={{ customer.customer_id }}">Shop the sale</a>
    </td></tr></table>
  </td></tr>
  <tr><td colspan="2" style="padding:16px">
   <table width="100%" role="presentation"><tr>
   {% for product in customer.recommended[:3] %}
    <td width="33%" valign="top" style="padding:8px">
     <a href="https://shop.example.com/p/{{ product.sku }}"><img src="https://cdn.example.com/p/{{ product.sku }}.jpg"
       alt="{{ product.title }}" width="160"></a><br>
     <b>{{ product.title | title }}</b><br>
     {% if product.was %}<s>€{{ '%.2f' | format(product.was) }}</s> {% endif %}€{{ '%.2f' | format(product.price) }}<br>
     <a href="https://shop.example.com/p/{{ product.sku }}?utm_content=grid">View product</a>
    </td>
   {% endfor %}
   </tr></table>
  </td></tr>
  {% if customer.tier == 'gold' %}
  <tr><td colspan="2" style="padding:16px;background:#fff6d6">
   <p>As a <b>Gold member</b> you have {{ customer.points }} points: that is
   €{{ (customer.points / 100) | round(2) }} off your next order.</p>
  </td></tr>
  {% endif %}
  <tr><td colspan="2" style="padding:16px">
   <ul><li>Free delivery over €50</li><li>30-day returns</li><li>Pay in 3 instalments</li></ul>
  </td></tr>
  <tr><td colspan="2" style="padding:16px;font-size:12px;color:#666">
   You receive this because you ordered from Example Shop on
   {{ customer.last_order | date('%d %B %Y') }}. Example Shop, 1 Main St, Springfield &middot;
   <a href="{{ unsubscribe_url }}">Unsubscribe</a>
  </td></tr>
 </table>
</td></tr></table>
</body></html>
"""

# The same layout with merge tags only (no loops or conditions): what most existing documents
# are. Its text part is derived from the HTML once, when compiled (templates.derive_text_part).
MERGE_TAGS_HTML = re.sub(
    r"\{% for product.*?\{% endfor %\}|\{% if customer.tier.*?\{% endif %\}|\{% if.*?%\}|\{% endif %\}",
    "",
    NEWSLETTER_HTML,
    flags=re.S,
).replace("{{ customer.last_order | date('%d %B %Y') }}", "{{ customer.last_order }}")

NEWSLETTER_TEXT = """Hello {{ first_name | default('there') }}, spring is here

Our spring sale starts today: up to 40% off on garden furniture & tools{% if customer.city %}, with free delivery in {{ customer.city }}{% endif %}.
Shop the sale: https://shop.example.com/sale?c=spring&u={{ customer.customer_id }}
{% for product in customer.recommended[:3] %}
* {{ product.title | title }}: €{{ '%.2f' | format(product.price) }} https://shop.example.com/p/{{ product.sku }}
{%- endfor %}
{% if customer.tier == 'gold' %}
As a Gold member you have {{ customer.points }} points.
{% endif %}
Unsubscribe: {{ unsubscribe_url }}
"""

_PRODUCTS = [
    ("teak-chair", "teak garden chair", 129.0, 199.0),
    ("hose-25", "garden hose 25 m", 19.0, None),
    ("pruner", "bypass pruner", 24.5, 29.9),
    ("lantern", "solar lantern", 12.0, None),
    ("bench", "acacia bench", 249.0, 319.0),
]


def newsletter_campaign(*, with_text: bool = True, merge_tags_only: bool = False) -> dict[str, Any]:
    t0 = dt.datetime(2026, 3, 20, 9, tzinfo=dt.UTC)
    email = {"subject": SUBJECT, "html": MERGE_TAGS_HTML if merge_tags_only else NEWSLETTER_HTML}
    if with_text:
        email["text"] = NEWSLETTER_TEXT
    kind = "both" if with_text else "html"
    return {
        "_id": f"bench-newsletter-{kind}{'-tags' if merge_tags_only else ''}",
        "name": "Spring newsletter",
        "status": "approved",
        "startDate": t0,
        "endDate": t0 + dt.timedelta(hours=6),
        "channels": ["email"],
        "email": email,
        "targetedCustomerIds": [],
    }


def order_row(i: int) -> dict[str, Any]:
    """One customer's newest order row, as the orders collection holds it."""
    picks = [_PRODUCTS[(i + k) % len(_PRODUCTS)] for k in range(3)]
    return {
        "customer_id": i,
        "name": f"Customer{i} Example",
        "email": f"c{i}@example.com",
        "phone": f"+1415555{i % 10000:04d}",
        "city": ("Lyon", "Porto", "", "Leeds")[i % 4],
        "tier": "gold" if i % 3 == 0 else "standard",
        "points": 100 + i % 900,
        "last_order": dt.datetime(2026, 2, 1 + i % 28, tzinfo=dt.UTC),
        "recommended": [
            {"sku": sku, "title": title, "price": price, "was": was}
            for sku, title, price, was in picks
        ],
    }


def recipients(n: int) -> list[Recipient]:
    out = []
    for i in range(n):
        row = order_row(i)
        out.append(Recipient(str(i), row["name"], row["email"], row["phone"], row=row))
    return out


def _links() -> Links:
    signer = LinkSigner(
        [LinkKey("k1", b"bench-secret-0123456789abcdef")], ttl_s=86_400 * 60, rotation_grace_s=0
    )
    return Links(base_url="https://m.example.com", signer=signer, postal_address="1 Main St")


NOW = dt.datetime(2026, 3, 20, 9, 0, 1, tzinfo=dt.UTC)


def _email(
    campaign: Campaign, r: Recipient, templates: CampaignTemplates, links: Links
) -> EmailMessage:
    """The message a run builds for `r` (with signed unsubscribe links)."""
    return email_message(
        campaign,
        r,
        r.email or "",
        message_domain="example.com",
        links=links,
        now=NOW,
        templates=templates,
    )


class _Tables:
    """Link tables kept in memory: the tracker's writes are not what this measures."""

    async def record_links(self, campaign_key: str, table: Sequence[str]) -> list[str]:
        return list(table)

    async def save_short_links(self, rows: Sequence[dict[str, Any]]) -> None:
        return None


@dataclass
class _Item:
    customer: str
    message: EmailMessage | SmsMessage


TRACKED_BASE = "https://t.example.com"


async def _track_all(
    doc: dict[str, Any], audience: list[Recipient], *, slots: bool
) -> tuple[int, float, bool]:
    """(messages tracked correctly, CPU seconds, whether slots were used)."""
    campaign = parse_campaign(doc)
    signer = TrackingSigner(
        [LinkKey("t1", b"bench-track-secret-0123456789abcdef")],
        ttl_s=86_400 * 60,
        rotation_grace_s=0,
    )
    tracker = Tracker(TrackingConfig("opens_and_clicks", TRACKED_BASE, signer), _Tables())
    templates = templates_of(campaign)
    if slots:
        templates = tracker.templates_for(campaign, templates)
    links = _links()
    good = 0
    t0 = time.process_time()
    for at in range(0, len(audience), 250):
        items = [
            _Item(
                r.customer_id,
                _email(campaign, r, templates, links),
            )
            for r in audience[at : at + 250]
        ]
        await tracker.track(campaign, Channel.EMAIL, items, NOW)
        # (This newsletter's text part has personalised links only: they stay as rendered.)
        good += sum(
            isinstance(i.message, EmailMessage)
            and f'href="{TRACKED_BASE}/c/' in (i.message.html or "")
            and f'src="{TRACKED_BASE}/o/' in (i.message.html or "")
            for i in items
        )
    return good, time.process_time() - t0, templates.slots is not None


def _render_all(doc: dict[str, Any], audience: list[Recipient]) -> tuple[int, float]:
    campaign = parse_campaign(doc)
    html = doc["email"]["html"]
    templates = templates_of(campaign)
    links = _links()
    good = 0
    t0 = time.process_time()
    for r in audience:
        msg = _email(campaign, r, templates, links)
        own_name = (r.name or "?").split()[0]
        # Its own data: the first product (HTML and text), or its city where there is no loop.
        mark = r.row["recommended"][0]["title"].title() if "recommended" in html else r.row["city"]
        if msg.html and msg.text and own_name in msg.html and own_name in msg.text:
            good += mark in msg.text
    return good, time.process_time() - t0


async def run(quick: bool) -> dict[str, Any]:
    n = QUICK_MESSAGES if quick else MESSAGES
    audience = recipients(n)
    _render_all(newsletter_campaign(), audience[:50])  # warm: compiled once, as when armed
    good, cpu_s = _render_all(newsletter_campaign(), audience)
    html_n = max(n // 5, 200)
    html_good, html_cpu_s = _render_all(newsletter_campaign(with_text=False), audience[:html_n])
    tags = newsletter_campaign(with_text=False, merge_tags_only=True)
    tags_good, tags_cpu_s = _render_all(tags, audience)
    derived = templates_of(parse_campaign(tags)).derived_text is not None
    await _track_all(newsletter_campaign(), audience[:50], slots=True)  # warm, as when armed
    tracked_n = max(n // 4, 500)
    _, render_s = _render_all(newsletter_campaign(), audience[:tracked_n])
    slot_good, slot_s, slotted = await _track_all(
        newsletter_campaign(), audience[:tracked_n], slots=True
    )
    regex_good, regex_s, _ = await _track_all(
        newsletter_campaign(), audience[:tracked_n], slots=False
    )
    sample = email_message(
        parse_campaign(newsletter_campaign()),
        audience[0],
        "c0@example.com",
        message_domain="example.com",
    )
    return {
        "messages": n,
        "rendered": good,
        "cpu_s": cpu_s,
        "per_s": good / cpu_s if cpu_s else 0.0,
        "html_only_messages": html_n,
        "html_only_rendered": html_good,
        "html_only_per_s": html_good / html_cpu_s if html_cpu_s else 0.0,
        "merge_tags_rendered": tags_good,
        "merge_tags_per_s": tags_good / tags_cpu_s if tags_cpu_s else 0.0,
        "merge_tags_text_derived": derived,
        "html_bytes": len((sample.html or "").encode()),
        "tracked_messages": tracked_n,
        "tracked_with_slots": slot_good,
        "tracked_with_slots_per_s": slot_good / slot_s if slot_s else 0.0,
        "slots_used": slotted,
        "track_step_slots_us": 1e6 * (slot_s - render_s) / tracked_n,
        "tracked_by_rewriting": regex_good,
        "track_step_rewriting_us": 1e6 * (regex_s - render_s) / tracked_n,
    }


SOURCES = [
    "reactor/bench/templates.py",
    "reactor/domain/templates.py",
    "reactor/domain/html_text.py",
    "reactor/domain/messages.py",
    "reactor/engagement",
]


def figures(result: dict[str, Any]) -> list[Figure]:
    return [
        Figure(
            "templates: newsletter emails rendered per CPU-second (subject, HTML, text)",
            round(result["per_s"]),
            "messages/s",
            GOAL_PER_S,
            ">=",
            note=f"{result['rendered']}/{result['messages']} messages correct, "
            f"{result['html_bytes']} bytes of HTML each",
        ),
        Figure(
            "templates: rendered messages that carried the customer's own data",
            result["rendered"],
            "messages",
            result["messages"],
            "==",
        ),
        Figure(
            "templates: HTML-only emails per CPU-second (text part generated from the HTML)",
            round(result["html_only_per_s"]),
            "messages/s",
            note=f"{result['html_only_rendered']}/{result['html_only_messages']} correct",
        ),
        Figure(
            "templates: HTML-only emails with merge tags only per CPU-second (text derived once)",
            round(result["merge_tags_per_s"]),
            "messages/s",
            note=f"{result['merge_tags_rendered']}/{result['messages']} correct, text part "
            + (
                "derived from the HTML source" if result["merge_tags_text_derived"] else "converted"
            ),
        ),
        Figure(
            "templates: tracked newsletter emails per CPU-second (rendered, then opens and "
            "clicks tracked)",
            round(result["tracked_with_slots_per_s"]),
            "messages/s",
            note=f"{result['tracked_with_slots']}/{result['tracked_messages']} tracked, links "
            + ("as slots" if result["slots_used"] else "rewritten (no slots)"),
        ),
        Figure(
            "templates: the tracker's step per message, links as slots",
            round(result["track_step_slots_us"], 1),
            "µs",
        ),
        Figure(
            "templates: the tracker's step per message, each rendered message rewritten",
            round(result["track_step_rewriting_us"], 1),
            "µs",
            note=f"{result['tracked_by_rewriting']}/{result['tracked_messages']} tracked",
        ),
    ]


def report(result: dict[str, Any]) -> str:
    return "\n".join(
        f"{f.name}: {f.value} {f.unit}" + (f" (goal {f.op} {f.goal})" if f.goal else "")
        for f in figures(result)
    )


__all__ = ["figures", "newsletter_campaign", "order_row", "recipients", "run"]
