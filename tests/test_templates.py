"""Campaign templates: rendering (tables), the sandbox's refusals (known escape payloads),
compilation when armed (bad_template, before any claim), per-recipient template_error skips,
the text part generated from HTML, and `reactor preview`."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import pytest

from reactor.bench.templates import newsletter_campaign, recipients
from reactor.cli import build_parser
from reactor.domain.errors import InvalidCampaign
from reactor.domain.html_text import html_to_text
from reactor.domain.messages import email_message, sms_message, templates_of
from reactor.domain.models import parse_campaign
from reactor.domain.templates import (
    LIMITS,
    TemplateRenderError,
    compile_campaign,
    compile_part,
    render_context,
)
from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.twilio_fake import TwilioFake
from reactor.ports import Recipient
from reactor.preview import run_preview

from .conftest import MongoTarget
from .helpers import Client, campaign, eventually, has_status, ledger, running, settings

ROW: dict[str, Any] = {
    "customer_id": 42,
    "name": "Ana Lima",
    "city": "Lyon",
    "tier": "gold",
    "total": 12.456,
    "blank": "",
    "none_field": None,
    "note": "<script>x</script>",
    "items": [{"sku": "a"}, {"sku": "b"}],
    "last_order": dt.datetime(2026, 2, 1, tzinfo=dt.UTC),
}


def _context(**row: Any) -> dict[str, Any]:
    return render_context(
        name="Ana Lima",
        email="ana@example.com",
        phone="+14155550100",
        unsubscribe_url="https://m.example.com/u/tok?a=1&b=2",
        row={**ROW, **row},
        campaign_name="Spring & Co",
        campaign_id="c1",
        channel="email",
    )


@pytest.mark.parametrize(
    ("part", "source", "expected"),
    [
        # The documents written for the old engine keep their meaning.
        ("text", "Hi {{name}}", "Hi Ana Lima"),
        ("text", "{{email}} {{ phone }}", "ana@example.com +14155550100"),
        ("text", "Stop: {{unsubscribe_url}}", "Stop: https://m.example.com/u/tok?a=1&b=2"),
        (
            "html",
            "<a href='{{unsubscribe_url}}'>x</a>",
            "<a href='https://m.example.com/u/tok?a=1&amp;b=2'>x</a>",
        ),
        ("text", "Hi {{ first_name }}", "Hi Ana"),
        # Every field of the order row, under `customer`.
        ("text", "{{ customer.city }} {{ customer.customer_id }}", "Lyon 42"),
        ("text", "{{ customer['items'] | length }}", "2"),
        ("text", "{{ customer.nickname | default('there') }}", "there"),
        ("text", "{{ customer.blank | default('there') }}", "there"),
        ("text", "[{{ customer.none_field }}]", "[]"),
        ("text", "{% if customer.tier == 'gold' %}Gold{% else %}Std{% endif %}", "Gold"),
        ("text", "{% if customer.nickname %}{{ customer.nickname }}{% else %}-{% endif %}", "-"),
        ("text", "{{ 'y' if customer.nickname is defined else 'n' }}", "n"),
        ("text", "{{ customer.total | round(1) }}", "12.5"),
        ("text", "{{ '%.2f' | format(customer.total) }}", "12.46"),
        ("text", "{{ customer.last_order | date('%d %b %Y') }}", "01 Feb 2026"),
        (
            "text",
            "{% for i in customer['items'] %}{{ loop.index }}{{ i.sku|upper }} {% endfor %}",
            "1A 2B ",
        ),
        ("text", "{{ campaign.name }} / {{ channel }}", "Spring & Co / email"),
        ("text", "{{ customer['items'] | tojson }}", '[{"sku": "a"}, {"sku": "b"}]'),
        ("text", "{{ ', '.join(['a', 'b']) }} {{ ['x', 'y'] | join('-') }}", "a, b x-y"),
        # Escaping: HTML only.
        ("html", "<p>{{ customer.note }}</p>", "<p>&lt;script&gt;x&lt;/script&gt;</p>"),
        ("html", "{{ campaign.name }}", "Spring &amp; Co"),
        ("html", "{{ name ~ ' <b>' }}", "Ana Lima &lt;b&gt;"),
        ("text", "{{ customer.note }}", "<script>x</script>"),
        ("sms", "{{ name }} & co", "Ana Lima & co"),
        ("subject", "{{ name | upper }}", "ANA LIMA"),
        ("text", "Use code {% raw %}{#SALE} {{x}}{% endraw %}", "Use code {#SALE} {{x}}"),
    ],
)
def test_rendering(part: str, source: str, expected: str) -> None:
    assert compile_part(part, source).render(_context()) == expected


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        (
            "{{ ''.__class__.__mro__ }}",
            "text line 1: access to attribute '__class__' of 'str' object is unsafe",
        ),
        ("{{ cycler.__init__.__globals__ }}", "text line 1: access to attribute '__init__'"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "access to attribute '__class__'"),
        ("{{ self._TemplateReference__context }}", "unsafe"),
        ("{{ joiner.__init__.__globals__.os }}", "access to attribute '__init__'"),
        ("{% set x = customer.update({'a': 1}) %}", "unsafe"),
        ("{{ range(100000) | list }}", "range() of 100000 items is past the limit of 10000"),
        (
            "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
            "loop iterations and calls",
        ),
        ("{% for i in range(9000) %}{{ 'x' * 100 }}{% endfor %}", "output past the text limit"),
        ("{{ 'x' * 100000000 }}", "past the limit"),
        ("{{ 'a'.center(1000000000) }}", "past the limit"),
        ("{{ 'ab' | center(1000000000) }}", "past the limit"),
        ("{{ 'a'.replace('a', 'x' * 500000).replace('x', 'yy') }}", "past the limit"),
        ("{{ '%0999999999d' % 1 }}", "%-format widths over 999 are refused"),
        ("{{ '%*d' | format(999999999, 1) }}", "%-format widths"),
        ("{{ '{:>999999999}'.format(1) }}", "str.format is not available"),
        ("{{ ('{0.__class__}' | attr('format'))(name) }}", "str.format is not available"),
        (
            "{% set f = '{0.__class__.__mro__}'.format %}{{ f(name) }}",
            "str.format is not available",
        ),
        ("{{ '{x.__class__}'.format_map({'x': name}) }}", "str.format is not available"),
        ("{{ 99999999 ** 99999999 }}", "a power that large is refused"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "text: recursion too deep"),
        (
            "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s | length }}"
            "{% endif %}{% endmacro %}{{ d('x', 64) }}",
            "past the limit",
        ),
        ("{{ 'a'.translate({97: 'x' * 500000}) }}", "str.translate is not available"),
        ("{{ customer | tojson(100000000) }}", "tojson indents of more than 16 are refused"),
        ("{% include '/etc/passwd' %}", "text line 1: extends, include and import are not"),
        ("x\n{% extends 'base.html' %}", "text line 2: extends, include and import are not"),
        ("{% from 'm' import f %}", "extends, include and import are not available"),
        ("{{ lipsum(1000000) }}", "unknown variable 'lipsum'"),
        ("{% set ns = namespace(s='x') %}", "unknown variable 'namespace'"),
    ],
)
def test_known_escape_and_exhaustion_payloads_are_refused_when_compiled(
    source: str, problem: str
) -> None:
    with pytest.raises(InvalidCampaign) as info:
        compile_part("text", source)
    assert info.value.reason == "bad_template"
    assert problem in info.value.detail


@pytest.mark.parametrize(
    ("part", "source", "detail"),
    [
        ("html", "<p>\n<b>\n{{ name | shout }}</b>", "html line 3: unknown filter 'shout'"),
        (
            "html",
            "{% if false %}\n{{ name | shout }}{% endif %}",
            "html line 2: unknown filter 'shout'",
        ),
        ("text", "Hi\n{{ name }", "text line 2: unexpected '}'"),
        ("text", "Use code {#SALE} now", "text line 1: Missing end of comment tag"),
        ("html", "<p>{{firstName}}</p>", "html line 1: unknown variable 'firstName'"),
        ("subject", "{% if name %}Hi", "subject line 1: Unexpected end of template"),
        ("sms", "a\nb\nc\n{{ voucher }}", "sms line 4: unknown variable 'voucher'"),
        ("text", "{% if name is shiny %}x{% endif %}", "text line 1: unknown test 'shiny'"),
        (
            "subject",
            "{% for i in range(200) %}{{ name }}{% endfor %}",
            "subject: output past the subject limit of 998",
        ),
    ],
)
def test_compile_errors_name_the_part_line_and_problem(part: str, source: str, detail: str) -> None:
    with pytest.raises(InvalidCampaign) as info:
        compile_part(part, source)
    assert info.value.detail.startswith(detail)


@pytest.mark.parametrize(
    ("source", "row", "problem"),
    [
        ("Hi\n{{ customer.city }}", {"city": None, "name": "x"}, ""),
        ("Hi\n{{ customer.voucher }}", {}, "text line 2: 'dict object' has no attribute 'voucher'"),
        ("{{ customer.note * customer.n }}", {"note": "ab", "n": 10**8}, "text line 1: a value of"),
        (
            "{% for x in customer.big %}{% endfor %}",
            {"big": list(range(300_000))},
            "text line 1: more than 200000 loop iterations and calls",
        ),
        ("{{ customer.total + 1 }}", {"total": "12"}, "text line 1:"),
    ],
)
def test_data_that_cannot_render_fails_that_recipient_only(
    source: str, row: dict[str, Any], problem: str
) -> None:
    template = compile_part("text", source)  # passes when armed: the probe row is empty
    if not problem:
        assert template.render(_context(**row)) == "Hi\n"
        return
    with pytest.raises(TemplateRenderError) as info:
        template.render(_context(**row))
    assert str(info.value).startswith(problem)


def test_output_limits_are_the_parts_limits() -> None:
    assert LIMITS == {"subject": 998, "html": 512 * 1024, "text": 512 * 1024, "sms": 1600}
    sms = compile_part("sms", "{{ customer.note * 20 }}")
    assert len(sms.render(_context(note="x" * 80))) == 1600
    with pytest.raises(TemplateRenderError, match="output past the sms limit of 1600"):
        sms.render(_context(note="x" * 81))


def test_compiled_once_per_campaign_and_content() -> None:
    parts = {"subject": "Hi {{ name }}", "text": "Hello"}
    first = compile_campaign("cache-test", parts)
    assert compile_campaign("cache-test", dict(parts)) is first
    changed = compile_campaign("cache-test", {**parts, "text": "Hello again"})
    assert changed is not first
    assert changed.text is not None
    assert changed.text.render(_context()) == "Hello again"


ANA = Recipient("42", "Ana\r\nBcc: x@evil.example", "ana@example.com", "+14155550100", row=ROW)


def _doc(**content: Any) -> dict[str, Any]:
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    doc = {
        "_id": "msg-test",
        "name": "Spring",
        "status": "approved",
        "startDate": t0,
        "endDate": t0 + dt.timedelta(hours=1),
        "targetedCustomerIds": ["42"],
    }
    doc.update(content)
    return doc


def test_a_subject_cannot_carry_a_line_break_from_customer_data() -> None:
    msg = email_message(
        parse_campaign(_doc(email={"subject": "Hi {{ name }}", "text": "x"})),
        ANA,
        "ana@example.com",
        message_domain="example.com",
    )
    assert msg.subject == "Hi Ana Bcc: x@evil.example"


def test_html_only_email_gets_a_text_part_from_the_rendered_html() -> None:
    html = "<p>Hi {{ first_name }}</p><p><a href='https://shop.example.com/p/1'>See it</a></p>"
    msg = email_message(
        parse_campaign(_doc(email={"subject": "s", "html": html})),
        ANA,
        "ana@example.com",
        message_domain="example.com",
    )
    assert msg.text == "Hi Ana\n\nSee it (https://shop.example.com/p/1)\n"
    sms = sms_message(parse_campaign(_doc(sms={"body": "{{ customer.city }} sale"})), ANA, "+1")
    assert sms.body == "Lyon sale"


def test_newsletter_html_becomes_readable_text() -> None:
    """The bench's newsletter (nested layout tables, a button, a product grid, images):
    links read "text (url)", images their alt text, no table columns padded with spaces."""
    doc = newsletter_campaign(with_text=False)
    r = recipients(1)[0]
    msg = email_message(parse_campaign(doc), r, "c0@example.com", message_domain="example.com")
    assert msg.html is not None
    assert msg.text == html_to_text(msg.html)
    text = msg.text
    for line in (
        "Example Shop (https://shop.example.com/?utm_source=newsletter)",
        "Hello Customer0, spring is here",
        "Shop the sale (https://shop.example.com/sale?c=spring&u=0)",
        "View product (https://shop.example.com/p/teak-chair?utm_content=grid)",
        "  * 30-day returns",
    ):
        assert line in text.splitlines()
    assert max(len(line) for line in text.splitlines()) < 200
    assert "  " not in text.replace("  * ", "")
    for leftover in ("<", "{{", "&amp;"):
        assert leftover not in text


@pytest.mark.parametrize("merge_tags_only", [True, False])
def test_a_text_part_derived_once_reads_as_converting_each_message(merge_tags_only: bool) -> None:
    """HTML made of merge tags only gets its text template derived from the source once; the
    text it renders is what converting each rendered message gives. HTML with blocks (loops,
    conditions, which the HTML parser would move out of tables) is converted per message."""
    doc = newsletter_campaign(with_text=False, merge_tags_only=merge_tags_only)
    campaign = parse_campaign(doc)
    templates = templates_of(campaign)
    assert (templates.derived_text is not None) is merge_tags_only
    for r in recipients(8):
        msg = email_message(campaign, r, "c@example.com", message_domain="example.com")
        assert msg.html is not None
        assert msg.text == html_to_text(msg.html)
        assert (r.row["city"] or "Hello") in msg.text


@pytest.mark.parametrize(
    "html",
    [
        "<p>{% if name %}Hi{% endif %}</p>",
        "<p>{{ customer.bio | safe }}</p>",
        "<p>{# note #}Hi {{ name }}</p>",
        "<p>Hi {{ name }}</p><p>Set {x}</p>",
        "<p>{{ customer.items[0].sku }}</p>",  # cannot be checked on the probe row
    ],
)
def test_html_that_cannot_be_derived_safely_is_converted_per_message(html: str) -> None:
    templates = compile_campaign(f"derive-{html}", {"subject": "s", "html": html})
    assert templates.derived_text is None


# ---- through the scheduler, on the embedded MongoDB ---------------------------------------


async def test_bad_template_is_not_armed_and_last_error_names_part_and_line(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    coll = client[mongo.campaigns_db].campaigns
    targets = await _seed(client, mongo, 3)
    async with running(settings(mongo, sink, reconcile_interval_seconds=0.3)) as (reactor,):
        broken = campaign("broken", 0.5, 60, targets, channels=["email"])
        broken["email"] = {"subject": "Hi {{ name }}", "html": "<p>\nHi {{ name | shout }}</p>"}
        broken_id = (await coll.insert_one(broken)).inserted_id
        good = await coll.insert_one(campaign("good", 0.5, 60, targets, channels=["email"]))
        await eventually(has_status(client, mongo, good.inserted_id, "running", "completed"))

        async def error_recorded() -> bool:
            doc = await coll.find_one({"_id": broken_id})
            return bool(doc and doc.get("execution", {}).get("lastError"))

        await eventually(error_recorded)
        doc = await coll.find_one({"_id": broken_id})
        assert doc is not None
        error = doc["execution"]["lastError"]
        assert error["reason"] == "bad_template"
        assert error["detail"] == "html line 2: unknown filter 'shout'"
        assert doc["status"] == "approved"
        assert "epoch" not in doc["execution"]  # never claimed
        assert await ledger(client, mongo, broken_id) == []
        labels = {"reason": "bad_template"}
        assert (
            reactor.metrics.registry.get_sample_value("reactor_campaign_errors_total", labels) == 1
        )
        # Fixed content arrives through the change stream: armed, claimed and sent.
        await coll.update_one(
            {"_id": broken_id}, {"$set": {"email.html": "<p>Hi {{ name | upper }}</p>"}}
        )
        await eventually(has_status(client, mongo, broken_id, "running", "completed"))

        async def all_sent() -> bool:
            rows = await ledger(client, mongo, broken_id)
            return len(rows) == 3 and all(r["state"] == "sent" for r in rows)

        await eventually(all_sent)
    assert any(m.html and "Hi CUST 1" in m.html for m in sink.messages)


async def test_one_recipient_that_cannot_render_is_skipped_and_the_others_are_sent(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    targets = await _seed(client, mongo, 6, without_city=(1, 4))
    doc = campaign("cities", 0.3, 60, targets, channels=["email"])
    doc["email"] = {"subject": "News for {{ customer.city }}", "html": "<p>{{ customer.city }}</p>"}
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink)) as (reactor,):
        cid = (await coll.insert_one(doc)).inserted_id

        async def settled() -> bool:
            rows = await ledger(client, mongo, cid)
            return len(rows) == 6 and all(r["state"] in ("sent", "skipped") for r in rows)

        await eventually(settled)
        sample = reactor.metrics.registry.get_sample_value
        assert sample("reactor_template_errors_total", {"channel": "email", "part": "subject"}) == 2
    rows = {r["customer"]: r for r in await ledger(client, mongo, cid)}
    for customer in ("1", "4"):
        assert rows[customer]["state"] == "skipped"
        assert rows[customer]["reason"] == "template_error"
        assert rows[customer]["error"] == "subject line 1: 'dict object' has no attribute 'city'"
    assert sorted(c for c, r in rows.items() if r["state"] == "sent") == ["0", "2", "3", "5"]
    by_to = {m.to: m for m in sink.messages}
    assert sorted(by_to) == [f"c{i}@example.com" for i in (0, 2, 3, 5)]
    # The newest order row is the one templates see: customer 0's older row said "Old".
    assert by_to["c0@example.com"].subject == "News for City0"
    text = by_to["c0@example.com"].text or ""
    assert text.replace("\r\n", "\n") == "City0\n"  # generated from the HTML


async def _seed(
    client: Client, mongo: MongoTarget, n: int, without_city: tuple[int, ...] = ()
) -> list[str]:
    rows: list[dict[str, Any]] = [
        {"customer_id": 0, "email": "c0@example.com", "name": "Cust 0", "city": "Old"}
    ]
    for i in range(n):
        row: dict[str, Any] = {
            "customer_id": i,
            "email": f"c{i}@example.com",
            "phone": f"+1415555{i:04d}",
            "name": f"Cust {i}",
        }
        if i not in without_city:
            row["city"] = f"City{i}"
        rows.append(row)
    await client[mongo.segmentation_db]["newdatabase"].insert_many(rows)
    return [str(i) for i in range(n)]


async def test_doctor_lists_an_approved_campaign_with_a_bad_template_as_invalid(
    mongo: MongoTarget, client: Client
) -> None:
    from reactor.doctor.checks import _list_campaigns
    from reactor.doctor.report import Report

    coll = client[mongo.campaigns_db].campaigns
    bad = campaign("bad", 3600, 7200, ["1"])
    bad["sms"] = {"body": "Hi\n{{ voucher }}"}
    await coll.insert_one(bad)
    await coll.insert_one(campaign("fine", 3600, 7200, ["1"]))
    report = Report()
    await _list_campaigns(report, client, settings(mongo), dt.datetime.now(dt.UTC))
    states = {row["name"]: (row["state"], row.get("note")) for row in report.waiting}
    assert states["bad"] == (
        "invalid",
        "sms line 2: unknown variable 'voucher' (known: "
        "campaign, channel, customer, email, first_name, name, phone, "
        "unsubscribe_url)",
    )
    assert states["fine"][0] == "waiting"


# ---- reactor preview ----------------------------------------------------------------------


async def _snapshot(client: Client, mongo: MongoTarget) -> dict[str, list[dict[str, Any]]]:
    db = client[mongo.campaigns_db]
    names = sorted(await db.list_collection_names())
    return {name: await db[name].find({}).sort("_id", 1).to_list() for name in names}


async def test_preview_prints_and_sends_one_test_message_touching_nothing(
    mongo: MongoTarget, client: Client, sink: SmtpSink, twilio: TwilioFake
) -> None:
    targets = await _seed(client, mongo, 3)
    doc = campaign("preview me", 3600, 7200, targets, status="draft")
    doc["email"] = {"subject": "Hi {{ first_name }}", "html": "<p>{{ customer.city }}</p>"}
    doc["sms"] = {"body": "{{ name }}: sale in {{ customer.city }}"}
    coll = client[mongo.campaigns_db].campaigns
    cid = (await coll.insert_one(doc)).inserted_id
    cfg = settings(
        mongo,
        sink,
        twilio,
        public_base_url="https://m.example.com",
        link_secret="preview-test-secret-0123456789abcdef0123",
    )
    before = await _snapshot(client, mongo)

    out = io.StringIO()
    assert await run_preview(cfg, str(cid), customer="2", send_to=None, out=out) == 0
    text = out.getvalue()
    assert f"Campaign: preview me (ID: {cid})" in text
    assert f"From: {cfg.email_from}\nTo: c2@example.com\nSubject: Hi Cust\n" in text
    assert "Content-Type: multipart/alternative\n" in text
    assert "List-Unsubscribe: <https://m.example.com/u/v1." in text
    assert "--- text/plain (generated from the HTML) ---\nCity2\n" in text
    assert "--- text/html ---\n<p>City2</p>" in text
    assert "To: +14155550002\nSegments: 1\n\nCust 2: sale in City2 Reply STOP to opt out.\n" in text
    assert sink.messages == []
    assert twilio.messages == []

    out = io.StringIO()
    code = await run_preview(cfg, str(cid), customer="2", send_to="qa@example.com", out=out)
    assert code == 0, out.getvalue()
    assert [m.to for m in sink.messages] == ["qa@example.com"]
    assert sink.messages[0].subject == "[TEST] Hi Cust"
    assert "City2" in (sink.messages[0].html or "")
    assert "Sent a test email to qa@example.com" in out.getvalue()

    out = io.StringIO()
    assert await run_preview(cfg, str(cid), customer="2", send_to="+14155550199", out=out) == 0
    assert [(m.to, m.body) for m in twilio.messages] == [
        ("+14155550199", "Cust 2: sale in City2 Reply STOP to opt out.")
    ]
    assert twilio.messages[0].status_callback is None
    assert len(sink.messages) == 1

    # Nothing written: no ledger row, counter, budget, suppression or campaign field.
    assert await _snapshot(client, mongo) == before


async def test_preview_reports_a_customer_that_cannot_render_and_a_bad_campaign(
    mongo: MongoTarget, client: Client
) -> None:
    targets = await _seed(client, mongo, 2, without_city=(1,))
    coll = client[mongo.campaigns_db].campaigns
    doc = campaign("p", 3600, 7200, targets, channels=["email"], status="draft")
    doc["email"] = {"subject": "s", "text": "{{ customer.city }}"}
    cid = (await coll.insert_one(doc)).inserted_id
    out = io.StringIO()
    assert await run_preview(settings(mongo), str(cid), customer="1", send_to=None, out=out) == 0
    assert (
        "skipped: template_error: text line 1: 'dict object' has no attribute 'city'"
        in out.getvalue()
    )

    await coll.update_one({"_id": cid}, {"$set": {"email.text": "{{ ''.__class__ }}"}})
    out = io.StringIO()
    assert await run_preview(settings(mongo), str(cid), customer=None, send_to=None, out=out) == 1
    assert "bad_template: text line 1: access to attribute '__class__'" in out.getvalue()

    out = io.StringIO()
    assert await run_preview(settings(mongo), "0" * 24, customer=None, send_to=None, out=out) == 1
    assert "no campaign with _id" in out.getvalue()


def test_preview_command_line() -> None:
    args = build_parser().parse_args(["preview", "abc", "--customer", "7", "--send-to", "a@b.c"])
    assert (args.command, args.campaign_id, args.customer, args.send_to) == (
        "preview",
        "abc",
        "7",
        "a@b.c",
    )
