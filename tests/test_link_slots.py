"""Link slots (reactor/engagement/slots.py): a tracked campaign's links found once in its
compiled templates must give, message for message, exactly what rewriting each rendered
message gives, tracked or not; and a template where that cannot be made sure of keeps the
rewriting path."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import re
from typing import Any

import pytest
from bson import ObjectId

from reactor.domain.consent import LinkKey, Links, LinkSigner
from reactor.domain.engagement import HONEYPOT_LINK, HitKind
from reactor.domain.messages import email_message, templates_of
from reactor.domain.models import Campaign, Channel, parse_campaign
from reactor.engagement import rewrite, slots
from reactor.engagement.tracker import Tracker, TrackingConfig
from reactor.ports import EmailMessage, Recipient

from .test_engagement import T0, MemoryTables, _Item, signer

BASE = "https://r.example"
NEWSLETTER = (
    "<html><body><h1>Spring, {{name}}</h1>"
    + "".join(
        f'<p><a href="https://shop.example/item/{i}?utm_source=mail&amp;n={i}">Item {i}</a></p>'
        for i in range(4)
    )
    + "</body></html>"
)
KITCHEN_SINK = (
    '<html><body><a href="https://shop.example/a?x=1&amp;y=2">A</a>'
    "<a href='https://shop.example/b'>B</a> <A HREF=https://shop.example/UP>up</A>"
    '<a data-notrack href="https://shop.example/private">P</a>'
    '<a href="mailto:hi@example.com">mail</a><a href="tel:+15551234">call</a>'
    '<map><area shape="rect" href="https://shop.example/area" alt="x"></map>'
    '<a href="https://shop.example/u/{{ customer.customer_id }}">mine</a>'
    '<a href="https://shop.example/b">B again</a>'
    '<a href="{{unsubscribe_url}}">Unsubscribe</a></body></html>'
)
TEXT = (
    "Hi {{ name }}, see (https://shop.example/b), https://shop.example/c. Or https://shop.example/a?x=1&y=2!\n"
    "Not this one: notrack:https://shop.example/q and https://shop.example/u/{{ customer.customer_id }} x\n"
    "{{ unsubscribe_url }}\n"
)
LOOPS = (
    '<html><body>{% for i in range(2) %}<p><a href="https://shop.example/loop">L{{ i }}</a></p>'
    '{% endfor %}{% if customer.vip %}<p><a href="https://shop.example/vip">VIP</a></p>'
    '{% else %}<p><a href="https://shop.example/join">Join</a></p>{% endif %}</body></html>'
)
LOOPS_TEXT = (
    "{% for i in range(2) %}Loop https://shop.example/loop {{ i }}\n{% endfor %}"
    "{% if customer.vip %}VIP https://shop.example/vip. {% else %}Join https://shop.example/join"
    " today{% endif %}\n"
)

SLOTTABLE: list[tuple[str | None, str | None]] = [
    (NEWSLETTER, None),  # HTML only: the text is derived from it
    (KITCHEN_SINK, TEXT),
    (LOOPS, LOOPS_TEXT),
    (None, TEXT),  # text only
    # A marker that only a customer's data holds (recipient 2's name) is removed as well
    ('<p>Hi {{ name }}</p><a href="https://shop.example/b">B</a>', None),
    (None, "Hi {{ name }} see https://shop.example/b now\n"),
]
# Each has something that makes slots unsure, so it keeps the rewriting path; the ones with an
# id here would send something else with slots (the last test shows it).
UNSURE: dict[str, tuple[str | None, str | None]] = {
    "a link written in an expression": (
        NEWSLETTER,
        "Go {{ 'https://shop.example/item/1?utm_source=mail&n=1' }} now\n",
    ),
    "a tag an expression completes": (
        '<a href="https://shop.example/ok">ok</a>'
        '<a href="https://shop.example/b" class="{{ customer.cls }}">B</a>',
        "ok\n",
    ),
    "markup rendered before a link": (
        '<p>{{ customer.bio | safe }}<a href="https://shop.example/b">B</a></p>',
        "https://shop.example/ok there\n",
    ),
    "a text link an expression lengthens": (
        '<a href="https://shop.example/b">B</a>',
        "see https://shop.example/b{{ customer.tail }} and more\n",
    ),
    "a text link an expression runs into": (
        '<a href="https://shop.example/c">C</a>',
        "see https://a.example/{{ customer.tail }}https://shop.example/c more\n",
    ),
    "a link a filter block changes": (
        '{% if customer.vip %}{% filter upper %}<a href="https://shop.example/b">B</a>'
        '{% endfilter %}{% endif %}<a href="https://shop.example/b">B</a>',
        "B\n",
    ),
    "a link a set block captures": (
        '<a href="https://shop.example/b">B</a>',
        "{% set x %}see https://shop.example/b now{% endset %}"
        "{% if customer.vip %}{{ x | truncate(25, true, '...', 0) }}{% endif %}\n",
    ),
    "data that autoescape lets open a tag": (
        "<p>{% autoescape false %}{{ customer.bio }}{% endautoescape %}"
        '<a href="https://shop.example/b">B</a></p>',
        "B https://shop.example/ok there\n",
    ),
    "a link completed from a constant": (
        '{% set base = "https://shop.example" %}<a href="https://shop.example/b">B</a>'
        '{% if customer.vip %}<a href="{{ base }}/b">VIP</a>{% endif %}',
        "B\n",
    ),
}
HARMLESS_UNSURE: list[tuple[str | None, str | None]] = [
    ('<a href="https://shop.example/b">B\x1a</a>', "B\n"),  # holds a slot character
    # HTML only, converted per message (a block: no text template can be derived)
    (
        '{% if name %}<table><tr><td><a href="https://shop.example/b">B</a></td></tr></table>'
        "{% endif %}",
        None,
    ),
]
CASES = (
    [(h, t, True) for h, t in SLOTTABLE]
    + [(h, t, False) for h, t in UNSURE.values()]
    + [(h, t, False) for h, t in HARMLESS_UNSURE]
)


def _campaign(html: str | None, text: str | None) -> Campaign:
    email: dict[str, Any] = {"subject": "Hi {{ name }}"}
    if html is not None:
        email["html"] = html
    if text is not None:
        email["text"] = text
    return parse_campaign(
        {
            "_id": ObjectId(),
            "name": "slots",
            "status": "approved",
            "startDate": T0,
            "endDate": T0 + dt.timedelta(days=1),
            "email": email,
            "targetedCustomerIds": ["1"],
        }
    )


ROW = {"cls": "c", "bio": "<i>bio</i>", "tail": "", "vip": False}
# Recipient 2's data is what makes the unsure cases differ: an unclosed tag, a longer URL.
RECIPIENTS = [
    Recipient("1", "Ana", "ana@example.com", None, row={**ROW, "customer_id": "1", "vip": True}),
    # Data that looks like a slot, or holds the slot characters, or a marker, or a link
    Recipient(
        "2",
        f"Bo notrack:https://x.example/y \x1a0\x1b {slots.OPEN_CHAR}1{slots.CLOSER}",
        "bo@example.com",
        None,
        row={
            "customer_id": "2",
            "cls": "x",
            "bio": '<a href="https://other.example/x" title="',
            "tail": "more",
            "vip": False,
        },
    ),
    Recipient("dnt", "Cy", "cy@example.com", None, row={**ROW, "customer_id": "dnt"}),
]


def _links() -> Links:
    return Links(
        base_url=BASE,
        signer=LinkSigner([LinkKey("k1", b"u" * 32)], ttl_s=1e7, rotation_grace_s=0),
        postal_address="1 Main St",
    )


async def _sent(tracker: Tracker, campaign: Campaign, with_slots: bool) -> list[EmailMessage]:
    templates = templates_of(campaign)
    if with_slots:
        templates = tracker.templates_for(campaign, templates)
    links = _links()
    items = [
        _Item(
            r.customer_id,
            email_message(
                campaign,
                r,
                r.email or "",
                message_domain="example.com",
                links=links,
                now=T0,
                templates=templates,
            ),
        )
        for r in RECIPIENTS
    ]
    await tracker.track(campaign, Channel.EMAIL, items, T0, do_not_track={"dnt"})
    out = []
    for item in items:
        assert isinstance(item.message, EmailMessage)
        assert item.message.slots is None
        out.append(item.message)
    return out


@pytest.mark.parametrize("mode", ["clicks", "opens_and_clicks"])
@pytest.mark.parametrize(("html", "text", "slottable"), CASES)
async def test_slots_give_what_rewriting_gives_or_are_not_used(
    html: str | None, text: str | None, slottable: bool, mode: str
) -> None:
    campaign = _campaign(html, text)
    tracker = Tracker(TrackingConfig(mode, BASE, signer()), MemoryTables())
    chosen = tracker.templates_for(campaign, templates_of(campaign))
    assert (chosen.slots is not None) is slottable
    rewritten = await _sent(tracker, campaign, with_slots=False)
    filled = await _sent(tracker, campaign, with_slots=True)
    for before, after in zip(rewritten, filled, strict=True):
        assert (after.subject, after.text, after.html) == (before.subject, before.text, before.html)
    if slottable:
        tracked, dnt = filled[0], filled[2]
        assert f"{BASE}/c/" in (tracked.html or "") + (tracked.text or "")
        assert "/c/" not in (dnt.html or "") + (dnt.text or "")
        for message in filled:
            assert slots.OPENER not in (message.html or "") + (message.text or "")
            assert "data-notrack" not in (message.html or "")
            assert "notrack:" not in (message.text or "")


def test_the_slots_of_a_newsletter_are_its_links_as_written() -> None:
    campaign = _campaign(KITCHEN_SINK, TEXT)
    tracker = Tracker(TrackingConfig("clicks", BASE, signer()), MemoryTables())
    found = tracker.templates_for(campaign, templates_of(campaign)).slots
    assert found is not None
    assert found.html == (
        ("https://shop.example/a?x=1&y=2", '"https://shop.example/a?x=1&amp;y=2"'),
        ("https://shop.example/b", "'https://shop.example/b'"),
        ("https://shop.example/UP", "https://shop.example/UP"),
        ("https://shop.example/area", '"https://shop.example/area"'),
        ("https://shop.example/b", '"https://shop.example/b"'),
    )
    assert [url for url, _ in found.text] == [
        "https://shop.example/b",
        "https://shop.example/c",
        "https://shop.example/a?x=1&y=2",
    ]


def test_tracking_off_or_a_campaign_that_opts_out_renders_without_slots() -> None:
    tracker = Tracker(TrackingConfig("off", BASE, signer()), MemoryTables())
    campaign = _campaign(NEWSLETTER, None)
    templates = templates_of(campaign)
    assert tracker.templates_for(campaign, templates) is templates
    on = Tracker(TrackingConfig("clicks", BASE, signer()), MemoryTables())
    opted_out = dataclasses.replace(campaign, tracking="off")
    assert on.templates_for(opted_out, templates) is templates


def test_fill_replaces_each_slot_and_nothing_else() -> None:
    body = f"a{slots.OPENER}1{slots.CLOSER}b{slots.OPENER}0{slots.CLOSER}{slots.OPEN_CHAR}9c"
    assert slots.fill(body, slots.OPENER, ["X", "Y"]) == f"aYbX{slots.OPEN_CHAR}9c"
    assert slots.fill("plain", slots.OPENER, []) == "plain"
    many = [f"v{n}" for n in range(1500)]  # past the table of small numbers too
    assert slots.fill(f"{slots.OPENER}1234{slots.CLOSER}.", slots.OPENER, many) == "v1234."
    # A number written otherwise than it renders, out of range, or a closer gone: not whole.
    for broken in ("01", "+1", " 1", "1_0", "٣", "", "2", "1500", "-1"):
        with pytest.raises(slots.SlotError):
            slots.fill(f"a{slots.OPENER}{broken}{slots.CLOSER}b", slots.OPENER, ["X", "Y"][:2])
    with pytest.raises(slots.SlotError):
        slots.fill(f"a{slots.OPENER}1b", slots.OPENER, ["X", "Y"])


@pytest.mark.parametrize("case", list(UNSURE))
async def test_each_check_is_needed_slots_forced_past_it_send_something_else(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Blind(slots._Slotter):
        unsafe = property(lambda self: False, lambda self, value: None)

    monkeypatch.setattr(slots, "_Slotter", Blind)
    monkeypatch.setattr(slots, "_SAFE", re.compile(r"(?!)"))
    monkeypatch.setattr(slots, "_same_on_probe", lambda *args: True)
    html, text = UNSURE[case]
    campaign = _campaign(html, text)
    tracker = Tracker(TrackingConfig("clicks", BASE, signer()), MemoryTables())
    assert tracker.templates_for(campaign, templates_of(campaign)).slots is not None
    rewritten = await _sent(tracker, campaign, with_slots=False)
    refused = ""
    try:
        filled = await _sent(tracker, campaign, with_slots=True)
    except slots.SlotError as exc:  # a slot a filter changed: refused, never sent as it is
        refused = str(exc)
    if refused:
        assert "link slot came out of rendering changed" in refused
    else:
        assert [(m.text, m.html) for m in filled] != [(m.text, m.html) for m in rewritten]


def test_a_personalised_text_url_is_not_in_the_link_table() -> None:
    """Its start (`https://shop.example/u/`) is no destination: the rendered URL never is."""
    text = "a https://shop.example/u/{{ id }} b https://shop.example/x {{ y }}"
    assert rewrite.link_table(None, text, None) == ["https://shop.example/x"]


@pytest.mark.parametrize(
    "body",
    [
        "<html><body>x</body></html>",
        "<html><body>x</BODY></html>",
        "<html><body>x</body ></html>",
        "<body>a</body><body>b</Body\n></html>",
        "<body>a</body>b</body>c",
        "no body at all",
        "</body>",
    ],
)
def test_the_pixel_goes_before_the_last_body_end_as_the_expression_finds_it(body: str) -> None:
    ends = list(rewrite._BODY_END.finditer(body))
    at = ends[-1].start() if ends else len(body)
    assert rewrite.append_to_body(body, "<P>") == body[:at] + "<P>" + body[at:]


@pytest.mark.parametrize("with_slots", [True, False])
async def test_the_hidden_link_and_pixel_are_what_rewrite_writes_under_an_escaped_base(
    with_slots: bool,
) -> None:
    """The tracker builds them from fragments made once; they must be exactly rewrite's
    `honeypot` and `pixel` of the message's own tokens, the base URL escaped once."""
    base = "https://r.example/t?a=1&b=<2>"
    campaign = _campaign(NEWSLETTER, None)
    tracker = Tracker(TrackingConfig("opens_and_clicks", base, signer()), MemoryTables())
    sent = (await _sent(tracker, campaign, with_slots=with_slots))[0]
    body = sent.html or ""
    escaped = html.escape(base)
    hidden = re.findall(rf'{re.escape(escaped)}/c/([\w.-]+)" style="display:none"', body)
    opened = re.findall(rf'{re.escape(escaped)}/o/([\w.-]+)"', body)
    assert len(hidden) == len(opened) == 1
    fragment = rewrite.honeypot(f"{base}/c/{hidden[0]}") + rewrite.pixel(f"{base}/o/{opened[0]}")
    assert body.endswith(fragment + "</body></html>")
    scope = signer().verify(hidden[0], now=T0)
    assert (scope.customer, scope.link) == ("1", HONEYPOT_LINK)
    assert signer().verify(opened[0], now=T0).kind is HitKind.OPEN
