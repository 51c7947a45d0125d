"""Tracked links and opens, end to end on a running reactor: what a sent message carries, what
a click and the pixel record (classed, counted once, in batches), and what bad requests get
(a 4xx, counted, nothing recorded)."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import re
from typing import Any

import aiohttp
from pymongo import AsyncMongoClient

from reactor.config import Settings
from reactor.domain.engagement import HONEYPOT_LINK, HitKind
from reactor.domain.models import Channel
from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.twilio_fake import TwilioFake
from reactor.engagement.tokens import TrackingSigner
from reactor.preview import run_preview

from .conftest import MongoTarget
from .helpers import campaign, eventually, holds, running, seed_customers, settings
from .test_consent import public

Client = AsyncMongoClient[dict[str, Any]]
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Safari/537.36"
)
HTML = (
    '<html><body><p>Hi {{name}}</p><a href="https://shop.example/spring">Spring</a> '
    '<a href="https://shop.example/summer?a=1&amp;b=2">Summer</a> '
    '<a data-notrack href="https://shop.example/account">Account</a> '
    '<a href="mailto:help@shop.example">Mail us</a></body></html>'
)
TEXT = "Hi {{name}}, see https://shop.example/spring. Help: notrack:https://shop.example/help"
_HREF = re.compile(r'href="([^"]+)"')
_SRC = re.compile(r'src="([^"]+/o/[^"]+)"')


def tracked(**extra: Any) -> dict[str, Any]:
    return public(tracking="opens_and_clicks", **extra)


async def send(client: Client, mongo: MongoTarget, n: int = 2, **overrides: Any) -> Any:
    ids = await seed_customers(client, mongo, n)
    doc = campaign(
        "spring",
        0.3,
        60,
        ids,
        channels=["email"],
        email={"subject": "Hi", "html": HTML, "text": TEXT},
        **overrides,
    )
    return (await client[mongo.campaigns_db].campaigns.insert_one(doc)).inserted_id


async def sent(client: Client, mongo: MongoTarget, cid: Any, n: int) -> bool:
    rows = await client[mongo.campaigns_db].deliveries.count_documents(
        {"campaign": str(cid), "state": "sent"}
    )
    return rows == n


async def delivered_an_hour_ago(client: Client, mongo: MongoTarget, cid: Any) -> None:
    """The messages reached their inboxes an hour ago: a click now is a person's, not the
    at-delivery scan of a gateway."""
    hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await client[mongo.campaigns_db].deliveries.update_many(
        {"campaign": str(cid)}, {"$set": {"updatedAt": hour_ago}}
    )


def links_of(sink: SmtpSink, to: str) -> tuple[list[str], str, str]:
    message = next(m for m in sink.messages if m.to == to)
    assert message.html is not None
    assert message.text is not None
    return _HREF.findall(message.html), message.html, message.text


async def events(client: Client, mongo: MongoTarget, **query: Any) -> list[dict[str, Any]]:
    return await client[mongo.campaigns_db].engagement.find(query).sort("at").to_list()


async def counters(client: Client, mongo: MongoTarget, cid: Any) -> dict[str, Any]:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
    assert doc is not None
    return dict(doc.get("performance", {}).get("engagement", {}))


def signer_of(cfg: Settings) -> TrackingSigner:
    signer = cfg.tracking_config().signer
    assert signer is not None
    return signer


async def test_a_sent_email_is_tracked_and_a_click_and_an_open_are_counted_once(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    cfg = settings(mongo, sink, **tracked())
    base = cfg.public_base_url
    async with running(cfg) as (reactor,):
        cid = await send(client, mongo)
        await eventually(lambda: sent(client, mongo, cid, 2), 15)
        hrefs, body, text = links_of(sink, "c1@example.com")
        clicks = [h for h in hrefs if h.startswith(f"{base}/c/")]
        # Two visible tracked links plus the hidden honeypot; the rest untouched.
        assert len(clicks) == 3
        assert "https://shop.example/account" in hrefs
        assert "data-notrack" not in body
        assert "mailto:help@shop.example" in hrefs
        assert any(h.startswith(f"{base}/u/") for h in hrefs)  # the unsubscribe link
        assert 'aria-hidden="true"' in body
        pixel = _SRC.findall(body)
        assert len(pixel) == 1
        assert f"{base}/c/" in text
        assert "https://shop.example/spring" not in text
        assert text.rstrip().splitlines()[0].endswith("Help: https://shop.example/help")
        doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
        assert doc is not None
        assert doc["trackedLinks"] == [
            "https://shop.example/spring",
            "https://shop.example/summer?a=1&b=2",
        ]
        await delivered_an_hour_ago(client, mongo, cid)

        async with aiohttp.ClientSession(headers={"User-Agent": CHROME}) as http:
            async with http.get(pixel[0]) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "image/gif"
                assert resp.headers["Cache-Control"] == "private, no-store"
                assert (await resp.read()).startswith(b"GIF89a")
            async with http.get(clicks[1], allow_redirects=False) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == "https://shop.example/summer?a=1&b=2"
                assert resp.headers["Cache-Control"] == "private, no-store"
            async with http.get(clicks[1], allow_redirects=False) as resp:  # again, later
                assert resp.status == 302

        await eventually(lambda: _count(client, mongo, 3), 5)
        found = await events(client, mongo)
        assert {(e["kind"], e["class"], e["link"]) for e in found} == {
            ("open", "human", None),
            ("click", "human", 1),
        }
        first = found[0]
        assert set(first) >= {
            "campaign",
            "channel",
            "customer",
            "kind",
            "link",
            "at",
            "class",
            "reasons",
            "agent",
            "ip",
        }
        assert first["campaign"] == str(cid)
        assert first["customer"] == "1"
        assert first["channel"] == "email"
        assert first["agent"] == "chrome"
        assert first["ip"] == "127.0.0.0"  # truncated to /24
        assert first["reasons"]
        perf = await counters(client, mongo, cid)
        assert perf["opens"] == 1
        assert perf["clicks"] == 1  # two clicks of one person on one link: one unique
        assert perf["links"] == {"1": 1}
        metric = reactor.metrics.engagement_events.labels("click", "human")._value.get()
        assert metric == 2


async def _count(client: Client, mongo: MongoTarget, n: int) -> bool:
    return await client[mongo.campaigns_db].engagement.count_documents({}) == n


async def test_scanners_are_scanners_and_a_human_click_makes_the_open_human(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    cfg = settings(mongo, sink, **tracked())
    base = cfg.public_base_url
    async with running(cfg):
        cid = await send(client, mongo, 1)
        await eventually(lambda: sent(client, mongo, cid, 1), 15)
        hrefs, body, _ = links_of(sink, "c0@example.com")
        clicks = [h for h in hrefs if h.startswith(f"{base}/c/")]
        pixel = _SRC.findall(body)[0]
        async with aiohttp.ClientSession(headers={"User-Agent": CHROME}) as http:
            # At delivery: a gateway fetches every link (the honeypot too) and the pixel.
            for url in [*clicks, pixel]:
                async with http.get(url, allow_redirects=False) as resp:
                    assert resp.status in (200, 302)
            await eventually(lambda: _count(client, mongo, 4), 5)
    # All that happened an hour ago; the reactor that serves what follows started since
    # (it remembers no delivery time of the one before).
    await delivered_an_hour_ago(client, mongo, cid)
    await client[mongo.campaigns_db].engagement.update_many(
        {}, [{"$set": {"at": {"$subtract": ["$at", 3600 * 1000]}}}]
    )
    async with running(cfg):
        async with aiohttp.ClientSession(headers={"User-Agent": CHROME}) as http:
            async with http.head(clicks[0], allow_redirects=False) as resp:
                assert resp.status == 302  # a HEAD: a scanner, however late
            async with http.get(clicks[0], allow_redirects=False) as resp:
                assert resp.status == 302  # the person, an hour later
        await eventually(lambda: _count(client, mongo, 7), 5)
        scans = await events(client, mongo, kind="click", **{"class": "scanner"})
        assert len(scans) == 4
        reasons = {r for e in scans for r in e["reasons"]}
        assert {"click_at_delivery", "honeypot", "head_request", "link_burst"} <= reasons
        assert any(e["link"] == HONEYPOT_LINK for e in scans)
        opens = await events(client, mongo, kind="open")
        assert [(e["class"], e["reasons"]) for e in opens] == [
            ("machine", ["open_at_delivery"]),
            ("human", ["implied_by_human_click"]),
        ]
        perf = await counters(client, mongo, cid)
        assert perf == {
            "scanner_clicks": 4,
            "machine_opens": 1,
            "opens": 1,
            "clicks": 1,
            "links": {"0": 1},
        }


async def test_bad_requests_get_a_4xx_are_counted_and_record_nothing(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    cfg = settings(mongo, sink, **tracked())
    base = cfg.public_base_url
    signer = signer_of(cfg)
    async with running(cfg) as (reactor,):
        cid = await send(client, mongo, 1)
        await eventually(lambda: sent(client, mongo, cid, 1), 15)
        hrefs, _, _ = links_of(sink, "c0@example.com")
        good = next(h for h in hrefs if h.startswith(f"{base}/c/"))
        token = good.rsplit("/", 1)[1]
        now = dt.datetime.now(dt.UTC)

        def make(**kw: Any) -> str:
            args: dict[str, Any] = {
                "campaign": str(cid),
                "channel": Channel.EMAIL,
                "customer": "0",
                "kind": HitKind.CLICK,
                "link": 0,
                "issued_at": now,
            }
            args.update(kw)
            return signer.sign(**args)

        tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
        long_ago = now - dt.timedelta(seconds=signer.ttl_s + 3600)
        cases = {
            f"{base}/c/{tampered}": ("bad_signature", 404),
            f"{base}/c/garbage": ("malformed", 404),
            f"{base}/c/{make(link=7)}": ("unknown_link", 404),
            f"{base}/c/{make(campaign='65f0c0ffee0000000000dead')}": ("gone_campaign", 404),
            f"{base}/o/{make(kind=HitKind.CLICK)}": ("wrong_kind", 404),
            f"{base}/c/{make(kind=HitKind.OPEN)}": ("wrong_kind", 404),
            f"{base}/s/short": ("unknown_short_link", 404),
            f"{base}/s/AAAAAAAAAAAA": ("unknown_short_link", 404),
            # Genuine tokens for a customer this campaign never sent to (a preview's, say).
            f"{base}/c/{make(customer='99')}": ("unknown_recipient", 404),
            f"{base}/o/{make(customer='99', kind=HitKind.OPEN)}": ("unknown_recipient", 404),
            # An expired token records nothing, the hidden link's as well (it answers as ever).
            f"{base}/c/{make(link=HONEYPOT_LINK, issued_at=long_ago)}": ("expired", 200),
        }
        async with aiohttp.ClientSession() as http:
            for url, (why, status) in cases.items():
                before = reactor.metrics.engagement_rejected.labels(why)._value.get()
                async with http.get(url, allow_redirects=False) as resp:
                    assert resp.status == status, url
                    assert "Location" not in resp.headers
                    assert "Traceback" not in await resp.text()
                after = reactor.metrics.engagement_rejected.labels(why)._value.get()
                assert after == before + 1, why
            async with http.get(good, headers={"User-Agent": "x" * 20000}) as resp:
                assert 400 <= resp.status < 500  # an oversized header: refused by the guards
        # Anything accepted is written by the time nothing is pending.
        assert reactor.recorder is not None
        await eventually(
            lambda: holds(reactor.recorder is not None and reactor.recorder.pending == 0)
        )
        assert await client[mongo.campaigns_db].engagement.count_documents({}) == 0
        assert await counters(client, mongo, cid) == {}


async def test_do_not_track_and_a_narrower_campaign_get_less_tracking(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    cfg = settings(mongo, sink, **tracked())
    base = cfg.public_base_url
    async with running(cfg):
        await client[mongo.segmentation_db]["newdatabase"].insert_one(
            {"customer_id": 0, "doNotTrack": True}
        )
        cid = await send(client, mongo, 2)
        await eventually(lambda: sent(client, mongo, cid, 2), 15)
        hrefs, body, text = links_of(sink, "c0@example.com")
        assert not any(h.startswith((f"{base}/c/", f"{base}/o/")) for h in hrefs)
        assert "https://shop.example/spring" in hrefs
        assert "data-notrack" not in body
        assert not _SRC.findall(body)
        assert "notrack:" not in text
        hrefs, body, _ = links_of(sink, "c1@example.com")
        assert any(h.startswith(f"{base}/c/") for h in hrefs)

        sink.messages.clear()
        narrow = await client[mongo.campaigns_db].campaigns.insert_one(
            campaign(
                "clicks only",
                0.3,
                60,
                ["1"],
                channels=["email"],
                email={"subject": "Hi", "html": HTML, "text": TEXT},
                tracking="clicks",
            )
        )
        await eventually(lambda: sent(client, mongo, narrow.inserted_id, 1), 15)
        hrefs, body, _ = links_of(sink, "c1@example.com")
        assert any(h.startswith(f"{base}/c/") for h in hrefs)
        assert not _SRC.findall(body)  # no pixel


async def test_tracking_off_sends_links_as_written(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    async with running(settings(mongo, sink, **public())):
        cid = await send(client, mongo, 1)
        await eventually(lambda: sent(client, mongo, cid, 1), 15)
        hrefs, body, text = links_of(sink, "c0@example.com")
        assert "https://shop.example/spring" in hrefs
        assert not _SRC.findall(body)
        assert "data-notrack" not in body
        assert "notrack:" not in text
        doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
        assert doc is not None
        assert "trackedLinks" not in doc


async def test_sms_links_become_short_links_that_guessing_cannot_find(
    mongo: MongoTarget, client: Client, twilio: TwilioFake
) -> None:
    cfg = settings(mongo, None, twilio, **tracked(sms_send_hours="00:00-23:59"))
    base = cfg.public_base_url
    assert base is not None
    async with running(cfg) as (reactor,):
        ids = await seed_customers(client, mongo, 1)
        body = "Sale today: https://shop.example/sale/spring-2026?utm_source=sms"
        doc = campaign("sms", 0.3, 60, ids, channels=["sms"], sms={"body": body})
        cid = (await client[mongo.campaigns_db].campaigns.insert_one(doc)).inserted_id
        await eventually(lambda: sent(client, mongo, cid, 1), 15)
        text = twilio.messages[0].body
        short = re.findall(re.escape(base) + r"/s/[A-Za-z0-9_-]+", text)
        assert len(short) == 1
        assert len(short[0]) - len(base) <= 30
        assert "shop.example" not in text
        await delivered_an_hour_ago(client, mongo, cid)
        phone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Version/17.4 Safari/604.1"
        async with aiohttp.ClientSession(headers={"User-Agent": phone}) as http:
            async with http.get(short[0], allow_redirects=False) as resp:
                assert resp.status == 302
                assert (
                    resp.headers["Location"]
                    == "https://shop.example/sale/spring-2026?utm_source=sms"
                )
            statuses = []
            for i in range(25):
                async with http.get(f"{base}/s/{'Z' * 11}{i % 10}") as resp:
                    statuses.append(resp.status)
            # 20 misses a minute per network, refilled at that rate: the next are refused
            # (at most one more miss can have been refilled, however slow this machine is).
            assert statuses[:20] == [404] * 20
            assert statuses[-4:] == [429] * 4
            refused = statuses.count(429)
        await eventually(lambda: _count(client, mongo, 2), 5)  # the click and its open
        found = await events(client, mongo, kind="click")
        assert [(e["channel"], e["class"], e["agent"]) for e in found] == [
            ("sms", "human", "safari")
        ]
        assert reactor.metrics.engagement_rejected.labels("rate_limited")._value.get() == refused


async def test_forwarded_for_counts_only_behind_a_trusted_proxy_and_shutdown_flushes(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    cfg = settings(mongo, sink, **tracked(trusted_proxies="127.0.0.1"))
    base = cfg.public_base_url
    async with running(cfg):
        cid = await send(client, mongo, 1)
        await eventually(lambda: sent(client, mongo, cid, 1), 15)
        hrefs, _, _ = links_of(sink, "c0@example.com")
        click = next(h for h in hrefs if h.startswith(f"{base}/c/"))
        await delivered_an_hour_ago(client, mongo, cid)
        async with aiohttp.ClientSession(headers={"User-Agent": CHROME}) as http:
            headers = {"X-Forwarded-For": "6.6.6.6, 198.51.100.77"}
            async with http.get(click, headers=headers, allow_redirects=False) as resp:
                assert resp.status == 302
        # Leaving the block shuts the reactor down within the settle window: the hit was
        # accepted, not yet written; the shutdown writes it.
    found = await events(client, mongo, kind="click")
    assert [e["ip"] for e in found] == ["198.51.100.0"]
    indexes = await client[mongo.campaigns_db].engagement.index_information()
    assert indexes["at_ttl"]["expireAfterSeconds"] == 180 * 86400


async def test_preview_shows_tracked_links_and_a_test_emails_links_lead_there_recording_nothing(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    """`reactor preview` prints the links a run would send (the customer's own tokens, the
    table's numbers, read and not recorded); a test email's tracked links name the stand-in,
    and the listener sends them where they lead without recording anything (the test email
    records the campaign's link table, append-only, so that they lead somewhere)."""
    cfg = settings(mongo, sink, **tracked())
    base = cfg.public_base_url
    assert base is not None  # tracked() sets it
    ids = await seed_customers(client, mongo, 2)
    await client[mongo.segmentation_db]["newdatabase"].insert_one(
        {"customer_id": 1, "doNotTrack": "yes"}
    )
    doc = campaign(
        "preview",
        3600,
        7200,
        ids,
        channels=["email"],
        status="draft",
        email={"subject": "Hi", "html": HTML, "text": TEXT},
    )
    coll = client[mongo.campaigns_db].campaigns
    cid = (await coll.insert_one(doc)).inserted_id
    async with running(cfg):
        out = io.StringIO()
        assert await run_preview(cfg, str(cid), customer="0", send_to=None, out=out) == 0
        printed = out.getvalue()
        tokens = re.findall(rf"{re.escape(base)}/c/([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)", printed)
        assert len(tokens) >= 3  # both parts' links and the hidden one
        now = dt.datetime.now(dt.UTC)
        scopes = {signer_of(cfg).verify(t, now=now) for t in tokens}
        assert {(s.campaign, s.customer) for s in scopes} == {(str(cid), "0")}
        assert {s.link for s in scopes} >= {0, 1}  # the numbers a run would give them
        assert f"{base}/o/" in printed  # the pixel
        assert "trackedLinks" not in (await coll.find_one({"_id": cid}) or {})  # not recorded

        out = io.StringIO()
        assert await run_preview(cfg, str(cid), customer="1", send_to=None, out=out) == 0
        assert f"{base}/c/" not in out.getvalue()  # do-not-track: links as written

        out = io.StringIO()
        code = await run_preview(cfg, str(cid), customer="0", send_to="qa@example.com", out=out)
        assert code == 0, out.getvalue()
        hrefs, body, _ = links_of(sink, "qa@example.com")
        clicks = [h for h in hrefs if h.startswith(f"{base}/c/")]
        assert clicks
        token = clicks[0].rsplit("/", 1)[1]
        assert signer_of(cfg).verify(token, now=now).customer == "preview:0"
        async with aiohttp.ClientSession(headers={"User-Agent": CHROME}) as http:
            async with http.get(clicks[0], allow_redirects=False) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == "https://shop.example/spring"
            async with http.get(_SRC.findall(body)[0]) as resp:
                assert resp.status == 200
            hidden = signer_of(cfg).verify(clicks[-1].rsplit("/", 1)[1], now=now)
            assert hidden.link == HONEYPOT_LINK
            async with http.get(clicks[-1], allow_redirects=False) as resp:  # the hidden link
                assert resp.status == 200
        await asyncio.sleep(1.5)  # past the recorder's batching
        assert await events(client, mongo) == []
        recorded = await coll.find_one({"_id": cid})  # the one write: the table its links need
        assert recorded is not None
        assert recorded["trackedLinks"] == [
            "https://shop.example/spring",
            "https://shop.example/summer?a=1&b=2",
        ]
