"""Tracking's pure parts, by tables: tokens, link tables and rewriting, the classifier, client
addresses."""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from reactor.config import Settings
from reactor.domain.consent import LinkKey, TokenError
from reactor.domain.deliveries import delivery_id
from reactor.domain.engagement import (
    HONEYPOT_LINK,
    Class,
    Earlier,
    Hit,
    HitKind,
    agent_family,
    classify_click,
    classify_message,
    classify_open,
    client_ip,
    parse_networks,
    truncate_ip,
)
from reactor.domain.models import Campaign, Channel, parse_campaign
from reactor.engagement import rewrite, tokens
from reactor.engagement.recorder import Accepted, Recorder
from reactor.engagement.tokens import SHORT_CODE_CHARS, TrackingSigner, is_short_code
from reactor.engagement.tracker import Tracker, TrackingConfig, effective_mode
from reactor.metrics import Metrics
from reactor.ports import EmailMessage, SmsMessage

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
KEY = LinkKey("k1", b"s" * 32)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Safari/537.36"
)
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)


def signer(*keys: LinkKey, ttl_s: float = 86400.0) -> TrackingSigner:
    return TrackingSigner(list(keys) or [KEY], ttl_s=ttl_s, rotation_grace_s=3600)


def sign(s: TrackingSigner, **kw: object) -> str:
    args: dict[str, object] = {
        "campaign": "65f0c0ffee0000000000abcd",
        "channel": Channel.EMAIL,
        "customer": "42",
        "kind": HitKind.CLICK,
        "link": 3,
        "issued_at": T0,
    }
    args.update(kw)
    return s.sign(**args)  # type: ignore[arg-type]


# ---- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("campaign", ["65f0c0ffee0000000000abcd", "spring-sale", "7"])
@pytest.mark.parametrize("kind", [HitKind.CLICK, HitKind.OPEN])
@pytest.mark.parametrize("channel", [Channel.EMAIL, Channel.SMS])
def test_a_token_names_what_it_was_signed_for(
    campaign: str, kind: HitKind, channel: Channel
) -> None:
    s = signer()
    token = sign(s, campaign=campaign, kind=kind, channel=channel, customer="cust é")
    scope = s.verify(token, now=T0 + dt.timedelta(hours=1))
    assert (scope.campaign, scope.channel, scope.customer, scope.kind, scope.link) == (
        campaign,
        channel,
        "cust é",
        kind,
        3,
    )
    assert scope.issued_at == T0


@pytest.mark.parametrize("size", [0, 1, 32, 64, 65, 200])
def test_the_precomputed_pads_give_hmac_sha256(size: int) -> None:
    """Tokens are signed and checked with HMAC's two hash states used directly: they must give
    what the standard library's HMAC gives, for every key length (shorter than, equal to and
    longer than SHA-256's block)."""
    key = bytes((7 * i + 3) % 256 for i in range(size))
    pads = tokens._pads(key, b"k1.")
    for message in (b"", b"x", bytes(range(256)) * 3):
        expected = hmac.digest(key, b"k1." + message, "sha256")[: tokens.MAC_BYTES]
        assert tokens._mac(pads, message) == expected


@pytest.mark.parametrize("campaign", ["65f0c0ffee0000000000abcd", "spring-sale", "x" * 255])
@pytest.mark.parametrize("kind", [HitKind.CLICK, HitKind.OPEN])
def test_a_batch_signer_gives_the_tokens_a_lone_signature_gives_and_they_check_out(
    campaign: str, kind: HitKind
) -> None:
    """The tracker signs a batch's tokens with what they share hashed once: the same bytes as
    signing each alone, and each names its own customer and link."""
    s = signer()
    batch = s.batch_signer(campaign=campaign, channel=Channel.EMAIL, kind=kind, issued_at=T0)
    # The longest ids the tracker tracks (255 bytes each; longer go out untracked) check out:
    # their tokens were once past the listener's length limit, and got a 404.
    for customer in ("42", "ünïcode", "c" * 255):
        per_customer = batch(customer)
        for link in (0, 7, 499, 1023, 1024, 40000, 0xFFFF):
            token = per_customer(link)
            alone = s.sign(
                campaign=campaign,
                channel=Channel.EMAIL,
                customer=customer,
                kind=kind,
                link=link,
                issued_at=T0,
            )
            assert token == alone
            scope = s.verify(token, now=T0)
            assert (scope.campaign, scope.customer, scope.link) == (campaign, customer, link)
            assert scope.kind is kind


def test_an_email_token_is_compact() -> None:
    assert len(sign(signer())) <= 60


def test_every_altered_character_is_refused() -> None:
    s = signer()
    token = sign(s)
    refused = 0
    for i in range(3, len(token)):  # past the key id
        for ch in "AQg_":
            if token[i] == ch:
                continue
            forged = token[:i] + ch + token[i + 1 :]
            try:
                s.verify(forged, now=T0)
            except TokenError:
                refused += 1
            else:
                raise AssertionError(f"accepted a token altered at {i}")
    assert refused > 0


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("", "malformed"),
        ("k1", "malformed"),
        ("k1." + "A" * 5000, "malformed"),
        ("k9." + "A" * 40, "unknown_key"),
        ("k1." + "A" * 40, "bad_signature"),
        ("k1.AAAA$AAAAAAAAAAAAAAAAAAA", "malformed"),
    ],
)
def test_garbage_tokens_are_refused_by_why(token: str, why: str) -> None:
    with pytest.raises(TokenError) as caught:
        signer().verify(token, now=T0)
    assert caught.value.why == why


def test_an_unsubscribe_key_signs_nothing_a_tracking_token_accepts() -> None:
    # Same secret, different derived key: a token from another purpose never verifies.
    other = TrackingSigner([LinkKey("k1", b"t" * 32)], ttl_s=86400, rotation_grace_s=0)
    with pytest.raises(TokenError) as caught:
        signer().verify(sign(other), now=T0)
    assert caught.value.why == "bad_signature"


def test_expired_tokens_are_known_expired_and_retired_keys_lapse() -> None:
    s = signer(ttl_s=60)
    scope, expired = s.check(sign(s), now=T0 + dt.timedelta(seconds=61))
    assert expired
    assert scope.link == 3
    with pytest.raises(TokenError):
        s.verify(sign(s), now=T0 + dt.timedelta(seconds=61))
    old = LinkKey("k0", b"o" * 32)
    retired = LinkKey("k0", b"o" * 32, retired_at=T0 + dt.timedelta(minutes=1))
    token = sign(signer(old))
    rotated = signer(LinkKey("k1", b"n" * 32), retired)
    assert rotated.verify(token, now=T0 + dt.timedelta(minutes=30)).customer == "42"
    with pytest.raises(TokenError) as caught:
        rotated.verify(token, now=T0 + dt.timedelta(hours=3))
    assert caught.value.why == "key_retired"


def test_short_codes_are_stable_distinct_and_short() -> None:
    s = signer()
    a = s.short_code("c1", "42", 0)
    assert a == s.short_code("c1", "42", 0)
    assert len({a, s.short_code("c1", "42", 1), s.short_code("c1", "43", 0)}) == 3
    assert len(a) == SHORT_CODE_CHARS
    assert is_short_code(a)
    assert not is_short_code(a + "x")


# ---- link tables and rewriting ----------------------------------------------------------------

HTML = (
    '<html><body><a href="https://shop.example/a?x=1&amp;y=2">A</a>'
    "<a href='https://shop.example/b'>B</a>"
    '<a data-notrack href="https://shop.example/private">P</a>'
    '<a href="mailto:hi@example.com">mail</a><a href="tel:+15551234">call</a>'
    '<a href="https://shop.example/u/{{ id }}">mine</a>'
    '<a href="{{unsubscribe_url}}">Unsubscribe</a></body></html>'
)
TEXT = "See https://shop.example/b. Or https://shop.example/c, and notrack:https://shop.example/q"


def test_the_link_table_holds_each_plain_destination_once_in_order() -> None:
    table = rewrite.link_table(HTML, TEXT, "Sale: https://shop.example/s")
    assert table == [
        "https://shop.example/a?x=1&y=2",
        "https://shop.example/b",
        "https://shop.example/c",
        "https://shop.example/s",
    ]


def _numbers() -> dict[str, int]:
    return {u: n for n, u in enumerate(rewrite.link_table(HTML, TEXT, None))}


def test_html_links_in_the_table_are_rewritten_and_the_rest_left_alone() -> None:
    rendered = HTML.replace("{{ id }}", "42").replace(
        "{{unsubscribe_url}}", "https://r.example/u/TOKEN"
    )
    out = rewrite.rewrite_html(
        rendered, _numbers(), lambda n: f"https://r.example/c/T{n}", "https://r.example/"
    )
    assert 'href="https://r.example/c/T0"' in out
    assert "href='https://r.example/c/T1'" not in out  # rewritten with double quotes
    assert 'href="https://r.example/c/T1"' in out
    assert 'href="https://shop.example/private"' in out  # marked: kept ...
    assert "data-notrack" not in out  # ... and the marker removed
    assert 'href="mailto:hi@example.com"' in out
    assert 'href="tel:+15551234"' in out
    assert 'href="https://shop.example/u/42"' in out  # personalised: not in the table
    assert 'href="https://r.example/u/TOKEN"' in out  # the unsubscribe link


def test_text_links_keep_their_punctuation_and_lose_their_markers() -> None:
    out = rewrite.rewrite_text(
        TEXT, _numbers(), lambda n: f"https://r.example/c/T{n}", "https://r.example/"
    )
    assert out == (
        "See https://r.example/c/T1. Or https://r.example/c/T2, and https://shop.example/q"
    )
    assert rewrite.strip_markers(TEXT).endswith("and https://shop.example/q")


@pytest.mark.parametrize(
    ("marker", "attribute"),
    [
        ("notrack:", "data-notrack"),
        ("NoTrack:", "Data-NoTrack"),
        ("NOTRAC\u212a:", "DATA-NOTRAC\u212a"),  # the Kelvin sign: the pattern reads it as "k"
    ],
)
def test_untracked_content_loses_markers_in_any_case_and_is_otherwise_unchanged(
    marker: str, attribute: str
) -> None:
    """The quick check for a marker must see every spelling the pattern accepts (the pattern
    ignores case); content with none is returned as is."""
    text = f"Go to {marker}https://shop.example/a now, or https://shop.example/b."
    assert rewrite.strip_markers(text) == (
        "Go to https://shop.example/a now, or https://shop.example/b."
    )
    body = f'<p><a {attribute} href="https://shop.example/a">a</a></p>'
    assert rewrite.strip_html_markers(body) == '<p><a href="https://shop.example/a">a</a></p>'
    plain = "Go to https://shop.example/a, <a href='https://shop.example/b'>b</a>"
    assert rewrite.strip_markers(plain) is plain
    assert rewrite.strip_html_markers(plain) is plain


def test_pixel_and_honeypot_go_at_the_end_of_the_body() -> None:
    out = rewrite.append_to_body("<html><body><p>x</p></body></html>", "<i>END</i>")
    assert out == "<html><body><p>x</p><i>END</i></body></html>"
    assert 'aria-hidden="true"' in rewrite.honeypot("https://r/c/t")
    assert 'width="1" height="1"' in rewrite.pixel("https://r/o/t")


@pytest.mark.parametrize(
    ("configured", "campaign", "mode"),
    [
        ("off", "opens_and_clicks", "off"),
        ("clicks", "opens_and_clicks", "clicks"),
        ("opens_and_clicks", "clicks", "clicks"),
        ("opens_and_clicks", None, "opens_and_clicks"),
        ("opens_and_clicks", "everything!", "off"),
    ],
)
def test_a_campaign_may_only_narrow_tracking(
    configured: str, campaign: str | None, mode: str
) -> None:
    assert effective_mode(configured, campaign) == mode


# ---- the classifier -----------------------------------------------------------------------------


def hit(kind: HitKind, after_s: float, agent: str = CHROME, **kw: object) -> Hit:
    args: dict[str, object] = {
        "kind": kind,
        "link": 0 if kind is HitKind.CLICK else None,
        "at": T0 + dt.timedelta(seconds=after_s),
        "ip": "203.0.113.9",
        "agent": agent,
    }
    args.update(kw)
    return Hit(**args)  # type: ignore[arg-type]


OPEN_CASES = [
    # (hit, class, a reason it must give)
    (hit(HitKind.OPEN, 3600), Class.HUMAN, "client_after_delivery"),
    (hit(HitKind.OPEN, 3600, IPHONE_MAIL), Class.HUMAN, "client_after_delivery"),
    (hit(HitKind.OPEN, 900, GMAIL, ip="66.249.84.1"), Class.HUMAN, "image_proxy_at_open"),
    (hit(HitKind.OPEN, 1, GMAIL, ip="66.249.84.1"), Class.MACHINE, "open_at_delivery"),
    (hit(HitKind.OPEN, 40, "Mozilla/5.0", ip="17.58.1.2"), Class.MACHINE, "apple_mpp_range"),
    (hit(HitKind.OPEN, 86400, "Mozilla/5.0", ip="198.51.100.2"), Class.MACHINE, "apple_mpp_agent"),
    (hit(HitKind.OPEN, 3600, provider_bot=True), Class.MACHINE, "provider_bot_flag"),
    (hit(HitKind.OPEN, 3600, ip="205.139.110.7"), Class.MACHINE, "vendor_range:mimecast"),
    (hit(HitKind.OPEN, 3600, ""), Class.MACHINE, "no_agent"),
    (hit(HitKind.OPEN, 3600, "SomeMailer/1.0"), Class.UNKNOWN, "no_rule_decided"),
]


@pytest.mark.parametrize(("h", "klass", "reason"), OPEN_CASES)
def test_opens(h: Hit, klass: Class, reason: str) -> None:
    verdict = classify_open(h, T0)
    assert verdict.klass is klass
    assert reason in verdict.reasons


CLICK_CASES = [
    (hit(HitKind.CLICK, 600), Class.HUMAN, "browser_after_delivery"),
    (hit(HitKind.CLICK, 3, CHROME), Class.SCANNER, "click_at_delivery"),
    (hit(HitKind.CLICK, 600, method="HEAD"), Class.SCANNER, "head_request"),
    (hit(HitKind.CLICK, 600, link=HONEYPOT_LINK), Class.SCANNER, "honeypot"),
    (hit(HitKind.CLICK, 600, ip="40.107.3.4"), Class.SCANNER, "vendor_range:microsoft"),
    (hit(HitKind.CLICK, 600, "Barracuda Sentinel (EE)"), Class.SCANNER, "vendor_agent:barracuda"),
    (hit(HitKind.CLICK, 600, "python-requests/2.31"), Class.SCANNER, "bot_agent"),
    (hit(HitKind.CLICK, 600, "Mozilla/5.0 HeadlessChrome/120"), Class.SCANNER, "bot_agent"),
    (hit(HitKind.CLICK, 600, ""), Class.SCANNER, "no_agent"),
]


@pytest.mark.parametrize(("h", "klass", "reason"), CLICK_CASES)
def test_clicks(h: Hit, klass: Class, reason: str) -> None:
    verdict = classify_click(h, T0)
    assert verdict.klass is klass
    assert reason in verdict.reasons


def test_a_burst_over_a_messages_links_is_a_scanner_even_late_and_with_a_browser_agent() -> None:
    burst = [hit(HitKind.CLICK, 600 + i * 0.2, link=i) for i in range(4)]
    verdicts = classify_message(burst, T0)
    assert all(v.klass is Class.SCANNER and "link_burst" in v.reasons for v in verdicts)
    # A person clicking two links a minute apart is two human clicks.
    two = [hit(HitKind.CLICK, 600, link=0), hit(HitKind.CLICK, 660, link=1)]
    assert [v.klass for v in classify_message(two, T0)] == [Class.HUMAN, Class.HUMAN]
    # The same link twice in a second (a double click) is not a burst.
    double = [hit(HitKind.CLICK, 600, link=0), hit(HitKind.CLICK, 600.3, link=0)]
    assert [v.klass for v in classify_message(double, T0)] == [Class.HUMAN, Class.HUMAN]
    # A click recorded in an earlier batch counts as a neighbour.
    late = classify_message(
        [hit(HitKind.CLICK, 600.5, link=1)], T0, [Earlier(0, T0 + dt.timedelta(seconds=600))]
    )
    assert late[0].klass is Class.SCANNER


def test_an_open_beside_a_scanners_burst_is_the_scanner_rendering_the_message() -> None:
    group = [
        hit(HitKind.CLICK, 600, link=0, ip="3.80.1.2"),
        hit(HitKind.OPEN, 600.3, ip="3.80.1.2"),
        hit(HitKind.CLICK, 600.5, link=1, ip="3.80.1.2"),
    ]
    verdicts = classify_message(sorted(group, key=lambda h: h.at), T0)
    assert [v.klass for v in verdicts] == [Class.SCANNER, Class.MACHINE, Class.SCANNER]
    assert verdicts[1].reasons == ("open_with_scanner",)
    # A person's open next to their own single click stays human.
    alone = [hit(HitKind.OPEN, 600), hit(HitKind.CLICK, 600.4, link=0)]
    assert [v.klass for v in classify_message(alone, T0)] == [Class.HUMAN, Class.HUMAN]


def test_without_a_delivery_time_a_browser_is_unknown() -> None:
    assert classify_click(hit(HitKind.CLICK, 600), None).klass is Class.UNKNOWN


@pytest.mark.parametrize(
    ("agent", "family"),
    [
        (CHROME, "chrome"),
        (GMAIL, "google_image_proxy"),
        ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", "yahoo_proxy"),
        ("Mozilla/5.0", "apple_mpp"),
        (IPHONE_MAIL, "apple_mail"),
        ("", "none"),
        ("curl/8.0", "bot"),
    ],
)
def test_agent_families(agent: str, family: str) -> None:
    assert agent_family(agent) == family


# ---- addresses ---------------------------------------------------------------------------------


def test_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    proxies = parse_networks("10.0.0.0/8, ::1")
    assert client_ip("203.0.113.5", "198.51.100.1", proxies) == "203.0.113.5"
    assert client_ip("10.1.2.3", "198.51.100.1", proxies) == "198.51.100.1"
    # A client's own X-Forwarded-For entry is to the left of what our proxy appended.
    assert client_ip("10.1.2.3", "6.6.6.6, 198.51.100.1, 10.9.9.9", proxies) == "198.51.100.1"
    assert client_ip("10.1.2.3", "not-an-ip", proxies) == "10.1.2.3"
    # A client that prepends 40 addresses of its own cannot push the real one out of view.
    padded = ", ".join([f"6.6.6.{i}" for i in range(40)] + ["198.51.100.1", "10.9.9.9"])
    assert client_ip("10.1.2.3", padded, proxies) == "198.51.100.1"
    assert client_ip("10.1.2.3", None, proxies) == "10.1.2.3"
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        parse_networks("10.0.0.0/33")


@pytest.mark.parametrize(
    ("ip", "v4", "v6", "stored"),
    [
        ("203.0.113.77", 24, 48, "203.0.113.0"),
        ("2001:db8:1234:5678::1", 24, 48, "2001:db8:1234::"),
        ("203.0.113.77", 32, 128, "203.0.113.77"),
        ("203.0.113.77", 0, 0, None),
        ("garbage", 24, 48, None),
    ],
)
def test_addresses_are_stored_truncated(ip: str, v4: int, v6: int, stored: str | None) -> None:
    assert truncate_ip(ip, v4, v6) == stored


# ---- the recorder, on a store in memory --------------------------------------------------------


class MemoryEngagement:
    """The recorder's store, in memory; `fail` makes the next writes raise."""

    def __init__(self, deliveries: dict[str, tuple[str, dt.datetime | None]]) -> None:
        self.deliveries = deliveries
        self.events: list[dict[str, object]] = []
        self.firsts: set[str] = set()
        self.counters: dict[str, dict[str, int]] = {}
        self.fail = False

    async def delivered(self, ids: Sequence[str]) -> dict[str, tuple[str, dt.datetime | None]]:
        return {i: self.deliveries[i] for i in ids if i in self.deliveries}

    async def earlier_clicks(
        self, keys: Sequence[tuple[str, str, str]], since: dt.datetime
    ) -> dict[tuple[str, str, str], list[Earlier]]:
        return {}

    async def insert_events(self, docs: Sequence[dict[str, object]]) -> None:
        if self.fail:
            raise ConnectionError("the database went away")
        self.events.extend(docs)

    async def insert_firsts(self, ids: Sequence[str], at: dt.datetime) -> set[str]:
        new = set(ids) - self.firsts
        self.firsts |= new
        return new

    async def add_counters(self, increments: dict[str, dict[str, int]]) -> None:
        for campaign, counts in increments.items():
            mine = self.counters.setdefault(campaign, {})
            for k, v in counts.items():
                mine[k] = mine.get(k, 0) + v


def accepted(customer: str, kind: HitKind, link: int | None, after_s: float) -> Accepted:
    return Accepted("c1", "email", customer, T0, hit(kind, after_s, link=link))


async def test_the_recorder_writes_in_one_batch_and_drains_on_shutdown() -> None:
    store = MemoryEngagement({delivery_id("c1", "email", "7"): ("sent", T0)})
    metrics = Metrics()
    recorder = Recorder(store, metrics, settle_s=0.05)
    recorder.accept(accepted("7", HitKind.OPEN, None, 3600))
    recorder.accept(accepted("7", HitKind.CLICK, 2, 3700))
    recorder.accept(accepted("7", HitKind.CLICK, 2, 3800))  # the same link again
    recorder.accept(accepted("8", HitKind.CLICK, 0, 3700))  # no such delivery
    assert recorder.pending == 4
    assert store.events == []  # nothing written on the request path
    await recorder.drain(5)
    assert recorder.pending == 0
    assert [(e["kind"], e["class"]) for e in store.events] == [
        ("open", "human"),
        ("click", "human"),
        ("click", "human"),
    ]
    assert store.counters == {"c1": {"opens": 1, "clicks": 1, "links.2": 1}}
    assert metrics.engagement_rejected.labels("unknown_recipient")._value.get() == 1
    assert metrics.engagement_events.labels("click", "human")._value.get() == 2


async def test_a_failed_batch_is_counted_as_dropped_not_raised() -> None:
    store = MemoryEngagement({delivery_id("c1", "email", "7"): ("sent", T0)})
    store.fail = True
    metrics = Metrics()
    recorder = Recorder(store, metrics, settle_s=0.01)
    recorder.accept(accepted("7", HitKind.CLICK, 0, 3600))
    recorder.accept(accepted("7", HitKind.CLICK, 1, 3900))
    await recorder.drain(5)
    assert store.events == []
    assert metrics.engagement_dropped.labels("write_failed")._value.get() == 2


def test_tracking_needs_the_public_listener() -> None:
    with pytest.raises(ValueError, match="TRACKING needs PUBLIC_BASE_URL"):
        Settings(mongo_uri="mongodb://localhost", tracking="clicks")
    on = Settings(
        mongo_uri="mongodb://localhost",
        tracking="opens_and_clicks",
        public_base_url="https://r.example",
        link_secret="0123456789abcdef0123456789abcdef",
    )
    config = on.tracking_config()
    assert config.mode == "opens_and_clicks"
    assert config.signer is not None
    assert config.base_url == "https://r.example"
    off = Settings(mongo_uri="mongodb://localhost")
    assert off.tracking_config().mode == "off"


# ---- the tracker, on fakes ------------------------------------------------------------------


class MemoryTables:
    def __init__(self) -> None:
        self.tables: dict[str, list[str]] = {}
        self.short: list[dict[str, object]] = []

    async def record_links(self, campaign_key: str, table: Sequence[str]) -> list[str] | None:
        old = self.tables.setdefault(campaign_key, [])
        old.extend(u for u in table if u not in old)
        return list(old)

    async def save_short_links(self, rows: Sequence[dict[str, object]]) -> None:
        self.short.extend(rows)


def _campaign(**kw: object) -> Campaign:
    doc: dict[str, object] = {
        "_id": "spring",
        "name": "spring",
        "status": "approved",
        "startDate": T0,
        "endDate": T0 + dt.timedelta(days=1),
        "email": {"subject": "Hi", "html": HTML, "text": TEXT},
        "sms": {"body": "Sale https://shop.example/s today"},
        "targetedCustomerIds": ["1"],
    }
    doc.update(kw)
    return parse_campaign(doc)


@dataclass
class _Item:
    customer: str
    message: EmailMessage | SmsMessage


async def test_the_tracker_rewrites_a_batch_and_keeps_link_numbers_across_edits() -> None:
    tables = MemoryTables()
    config = TrackingConfig(mode="opens_and_clicks", base_url="https://r.example", signer=signer())
    tracker = Tracker(config, tables)
    long_id = "x" * 300
    email = EmailMessage("a@example.com", "Hi", TEXT, HTML, "<m@x>")
    items = [_Item("1", email), _Item(long_id, email)]
    await tracker.track(_campaign(), Channel.EMAIL, items, T0)
    tracked = items[0].message
    assert isinstance(tracked, EmailMessage)
    assert tracked.html is not None
    assert "https://r.example/c/" in tracked.html
    assert "https://r.example/o/" in tracked.html
    untracked = items[1].message  # an id too long for a token: sent untracked, not cut
    assert isinstance(untracked, EmailMessage)
    assert untracked.html is not None
    assert "https://r.example/" not in untracked.html
    assert "data-notrack" not in untracked.html
    # The content is edited mid-run: a new link is appended, the old ones keep their numbers.
    edited = _campaign(
        email={"subject": "Hi", "html": '<a href="https://new.example">n</a>' + HTML}
    )
    await tracker.track(edited, Channel.EMAIL, [_Item("1", email)], T0)
    assert tables.tables["spring"][:4] == rewrite.link_table(HTML, TEXT, "https://shop.example/s")
    assert tables.tables["spring"][-1] == "https://new.example"


async def test_sms_links_are_short_and_their_codes_are_saved_in_one_write() -> None:
    tables = MemoryTables()
    config = TrackingConfig(mode="clicks", base_url="https://r.ex.co", signer=signer())
    tracker = Tracker(config, tables)
    sms = SmsMessage("+14155550100", "Sale https://shop.example/s today", segments=1)
    items = [_Item("1", sms), _Item("2", sms)]
    await tracker.track(_campaign(), Channel.SMS, items, T0)
    bodies = [i.message.body for i in items if isinstance(i.message, SmsMessage)]
    assert len(bodies) == 2
    for body in bodies:
        short = body.split()[1]
        assert short.startswith("https://r.ex.co/s/")
        assert len(short) <= 30
    assert [r["customer"] for r in tables.short] == ["1", "2"]
    assert {r["link"] for r in tables.short} == {3}  # the SMS link's number in the table


async def test_the_recorder_writes_one_batch_at_a_time() -> None:
    # Each batch reads the clicks its predecessor wrote (a burst split between two batches is
    # judged whole): the next batch's apply may not start before the last one's writes end.
    class Slow(MemoryEngagement):
        active = 0
        most = 0

        async def earlier_clicks(
            self, keys: Sequence[tuple[str, str, str]], since: dt.datetime
        ) -> dict[tuple[str, str, str], list[Earlier]]:
            self.active += 1
            self.most = max(self.most, self.active)
            return {}

        async def add_counters(self, increments: dict[str, dict[str, int]]) -> None:
            await asyncio.sleep(0.02)
            await super().add_counters(increments)
            self.active -= 1

    customers = [str(i) for i in range(1200)]
    store = Slow({delivery_id("c1", "email", c): ("sent", T0) for c in customers})
    recorder = Recorder(store, Metrics(), settle_s=0.01)
    for c in customers:  # three batches' worth, offered at once
        recorder.accept(accepted(c, HitKind.CLICK, 0, 3600))
    await recorder.drain(5)
    assert sum(e["kind"] == "click" for e in store.events) == 1200  # (and their implied opens)
    assert store.most == 1
