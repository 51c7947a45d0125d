"""Review findings on tracking, each pinned by a test that failed before its fix: the short-code
miss limiter counted after an awaited lookup, a non-list `trackedLinks` crashed the send, a
resent short link kept its first expiry, and the tracker's link-table cache had no bound."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from bson import ObjectId
from pymongo import AsyncMongoClient

from reactor.adapters.mongo.engagement import MongoEngagement
from reactor.domain import engagement
from reactor.domain.engagement import HitKind
from reactor.domain.models import Channel
from reactor.engagement import rewrite
from reactor.engagement import tracker as tracker_module
from reactor.engagement.recorder import Recorder
from reactor.engagement.tracker import Tracker, TrackingConfig
from reactor.metrics import Metrics
from reactor.ports import EmailMessage
from reactor.public.tracking import TrackingRoutes

from .conftest import MongoTarget
from .fakes import FakeClock
from .test_engagement import HTML, T0, TEXT, MemoryTables, _campaign, _Item, signer

Client = AsyncMongoClient[dict[str, Any]]


class SlowShortLinks:
    """Every lookup waits until the test opens the gate: concurrent guesses are all in flight
    at once, as they are when a guesser sends them together."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.lookups = 0

    async def link_table(self, campaign_key: str) -> list[str] | None:
        return None

    async def short_link(self, code: str) -> dict[str, Any] | None:
        self.lookups += 1
        await self.gate.wait()
        return None


class NoStore:
    """The recorder's store: a miss never reaches it."""


async def test_concurrent_short_code_guesses_are_counted_before_the_lookup() -> None:
    store = SlowShortLinks()
    metrics = Metrics()
    routes = TrackingRoutes(
        signer=signer(),
        store=store,
        recorder=Recorder(NoStore(), metrics),  # type: ignore[arg-type]
        clock=FakeClock(T0),
        metrics=metrics,
        misses_per_minute=20,
    )
    code = "Z" * 12

    async def guess() -> int:
        request = make_mocked_request("GET", f"/s/{code}", match_info={"code": code})
        return (await routes.short(request)).status

    guesses = [asyncio.ensure_future(guess()) for _ in range(40)]
    for _ in range(5):
        await asyncio.sleep(0)
    store.gate.set()
    statuses = await asyncio.gather(*guesses)
    assert sorted(statuses) == [404] * 20 + [429] * 20
    assert store.lookups == 20  # a refused guess costs the database nothing
    assert metrics.engagement_rejected.labels("rate_limited")._value.get() == 20
    assert metrics.engagement_rejected.labels("unknown_short_link")._value.get() == 20


async def test_a_non_list_link_table_is_a_malformed_campaign_not_a_crash(
    mongo: MongoTarget, client: Client
) -> None:
    db = client[mongo.campaigns_db]
    cid = ObjectId()
    await db.campaigns.insert_one({"_id": cid, "name": "bad", "trackedLinks": "https://a.example"})
    store = MongoEngagement(db, "campaigns")
    assert await store.record_links(str(cid), ["https://shop.example/a"]) is None
    assert await store.record_links(str(cid), ["https://shop.example/a"]) is None
    doc = await db.campaigns.find_one({"_id": cid})
    assert doc is not None
    error = doc["execution"]["lastError"]
    assert error["reason"] == "malformed_link_table"
    assert "trackedLinks must be a list" in error["detail"]
    assert doc["trackedLinks"] == "https://a.example"  # nothing overwritten


async def test_a_resent_short_link_lives_from_its_latest_send(
    mongo: MongoTarget, client: Client
) -> None:
    db = client[mongo.campaigns_db]
    store = MongoEngagement(db, "campaigns")
    row = {"_id": "A" * 12, "campaign": "c", "channel": "sms", "customer": "1", "link": 0}
    later = T0 + dt.timedelta(days=3)
    await store.save_short_links([{**row, "at": T0}])
    await store.save_short_links([{**row, "at": later}])
    await store.save_short_links([{**row, "at": T0 + dt.timedelta(days=1)}])  # a late batch
    saved = await store.short_link("A" * 12)
    assert saved is not None
    assert saved["at"] == later
    assert (saved["campaign"], saved["customer"], saved["link"]) == ("c", "1", 0)


class CountingTables(MemoryTables):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    async def record_links(self, campaign_key: str, table: Sequence[str]) -> list[str] | None:
        self.reads.append(campaign_key)
        return await super().record_links(campaign_key, table)


async def test_the_trackers_link_tables_are_a_bounded_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracker_module, "RECORDED_CAMPAIGNS", 3)
    tables = CountingTables()
    config = TrackingConfig(mode="clicks", base_url="https://r.example", signer=signer())
    tracker = Tracker(config, tables)
    email = EmailMessage("a@example.com", "Hi", TEXT, HTML, "<m@x>")

    async def send(key: str) -> None:
        await tracker.track(_campaign(_id=key), Channel.EMAIL, [_Item("1", email)], T0)

    for key in ("a", "b", "c"):
        await send(key)
    await send("a")  # used again: now the most recent
    await send("d")  # evicts b, the least recently used
    assert len(tracker._recorded) == 3
    assert tables.reads == ["a", "b", "c", "d"]
    await send("a")
    await send("b")
    assert tables.reads == ["a", "b", "c", "d", "b"]


def _scan(ip: str) -> str | None:
    """The published ranges read in order, one by one: what `network_of` must agree with."""
    address = ipaddress.ip_address(ip)
    table = {
        "apple": engagement.APPLE_RANGES,
        "google_proxy": engagement.GOOGLE_PROXY_RANGES,
        "yahoo_proxy": engagement.YAHOO_PROXY_RANGES,
        **{f"scanner:{k}": v for k, v in engagement.SCANNER_RANGES.items()},
    }
    for name, texts in table.items():
        for text in texts:
            net = ipaddress.ip_network(text)
            if net.version == address.version and address in net:
                return name
    return None


def test_the_range_lookup_by_bisect_agrees_with_a_scan_at_every_edge() -> None:
    probes = {"8.8.8.8", "2001:db8::1", "0.0.0.0", "255.255.255.255", "::"}
    for texts in [
        engagement.APPLE_RANGES,
        engagement.GOOGLE_PROXY_RANGES,
        engagement.YAHOO_PROXY_RANGES,
        *engagement.SCANNER_RANGES.values(),
    ]:
        for text in texts:
            net = ipaddress.ip_network(text)
            first, last = int(net.network_address), int(net.broadcast_address)
            top = 2**32 - 1 if net.version == 4 else 2**128 - 1
            for value in (first - 1, first, (first + last) // 2, last, last + 1):
                if 0 <= value <= top:
                    probes.add(
                        str(
                            ipaddress.ip_address(value)
                            if net.version == 6
                            else ipaddress.IPv4Address(value)
                        )
                    )
    named = 0
    for ip in sorted(probes):
        engagement.network_of.cache_clear()
        assert engagement.network_of(ip) == _scan(ip), ip
        named += _scan(ip) is not None
    assert named > len(probes) // 3  # the probes do land inside ranges


async def test_a_flood_of_forged_tokens_is_counted_each_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    routes = TrackingRoutes(
        signer=signer(),
        store=SlowShortLinks(),
        recorder=Recorder(NoStore(), metrics),  # type: ignore[arg-type]
        clock=FakeClock(T0),
        metrics=metrics,
    )
    token = signer().sign(
        campaign="c", channel=Channel.EMAIL, customer="1", kind=HitKind.CLICK, link=0, issued_at=T0
    )
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with caplog.at_level(logging.INFO, logger="reactor.public.tracking"):
        for _ in range(50):
            request = make_mocked_request("GET", f"/c/{forged}", match_info={"token": forged})
            assert (await routes.click(request)).status == 404
    assert metrics.engagement_rejected.labels("bad_signature")._value.get() == 50
    lines = [r for r in caplog.records if "refused a tracking token" in r.getMessage()]
    assert len(lines) == 1


def test_plans_shared_by_a_batch_rewrite_each_message_as_planning_it_alone() -> None:
    table = {url: n for n, url in enumerate(rewrite.link_table(HTML, TEXT, None))}
    assert table  # the content has tracked links
    html_plans: rewrite.Plans = {}
    text_plans: rewrite.Plans = {}
    skip = "https://r.example/"
    for who in ("1", "2", "3"):
        extra = f'<a href="https://shop.example/u/{who}">me</a><a href="{skip}u/{who}">unsub</a>'
        body, text = HTML + extra, TEXT + f" https://shop.example/u/{who}"

        def tracked(n: int, who: str = who) -> str:
            return f"{skip}c/{who}-{n}?a&b"

        alone_html = rewrite.rewrite_html(body, table, tracked, skip)
        alone_text = rewrite.rewrite_text(text, table, tracked, skip)
        assert rewrite.rewrite_html(body, table, tracked, skip, html_plans) == alone_html
        assert rewrite.rewrite_text(text, table, tracked, skip, text_plans) == alone_text
        assert f"{skip}c/{who}-0?a&amp;b" in alone_html  # the URL is escaped in HTML
        assert f"https://shop.example/u/{who}" in alone_html  # personalised: left as it is
    assert html_plans
    assert text_plans
