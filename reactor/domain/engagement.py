"""Engagement classes: is a tracked open or click a person, a machine or a scanner?

A pure function of the hits of one message (campaign, channel, customer), the time the message
was delivered and what came before: no I/O, no clock. Every verdict carries the rules that
decided it (`reasons`), so a reader can check a class by hand and a report can say why.

    open   machine  an Apple Mail Privacy Protection fetch (Apple's ranges, its agent), any
                    fetch within OPEN_AT_DELIVERY_S of delivery (a proxy's or a gateway's
                    prefetch), a provider's own bot flag (SendGrid `sg_machine_open`, SES
                    `isBotEvent`), a security vendor's range or agent, a bot's agent
           human    a browser or mail client later than that, including Gmail's and Yahoo's
                    caching image proxies (they fetch when the person opens; later opens are
                    served from their cache, so only the first reaches us)
    click  scanner  HEAD, the hidden honeypot link, within CLICK_AT_DELIVERY_S of delivery,
                    several links of one message within BURST_S of each other, a security
                    vendor's range or agent, a bot's agent, no user agent at all
           human    a browser after that
    either unknown  nothing points either way (an agent we cannot name, no delivery time)

The published behaviour these rules rest on is cited in docs/engagement.md; the bench
`python -m reactor.bench engagement` measures them on labelled traffic.
"""

from __future__ import annotations

import bisect
import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache


class Class(StrEnum):
    HUMAN = "human"
    MACHINE = "machine"
    SCANNER = "scanner"
    UNKNOWN = "unknown"


class HitKind(StrEnum):
    OPEN = "open"
    CLICK = "click"


HONEYPOT_LINK = 0xFFFF  # the link number of the hidden link no person can see
# A `reactor preview --send-to` test message names this stand-in, never the customer: its
# tracked links lead where they lead and record nothing.
PREVIEW_CUSTOMER_PREFIX = "preview:"

OPEN_AT_DELIVERY_S = 2.0  # a person needs longer to notice and open a message
CLICK_AT_DELIVERY_S = 10.0  # ... and longer still to read it and click
BURST_S = 1.0  # two different links of one message this close: nobody clicks that fast

# Published egress ranges (see docs/engagement.md for the sources). Apple's 17.0.0.0/8 is
# Apple's own block, from which Mail Privacy Protection's proxies fetch.
APPLE_RANGES = ("17.0.0.0/8",)
GOOGLE_PROXY_RANGES = ("66.102.0.0/20", "66.249.80.0/20", "64.233.160.0/19", "74.125.0.0/16")
YAHOO_PROXY_RANGES = ("98.136.0.0/14", "66.196.64.0/18", "74.6.0.0/16", "87.248.96.0/19")
SCANNER_RANGES: dict[str, tuple[str, ...]] = {
    # Exchange Online Protection / Defender for Office 365 (Safe Links detonation)
    "microsoft": ("40.92.0.0/15", "40.107.0.0/16", "52.100.0.0/14", "104.47.0.0/17"),
    "mimecast": ("205.139.110.0/24", "207.211.30.0/24", "207.211.31.0/25", "146.101.78.0/24"),
    "proofpoint": ("148.163.128.0/19", "67.231.144.0/20", "205.220.160.0/19"),
    "barracuda": ("64.235.144.0/20", "209.222.80.0/21"),
}
_SCANNER_AGENTS = (
    ("barracuda", "barracuda"),
    ("mimecast", "mimecast"),
    ("proofpoint", "proofpoint"),
    ("symantec", "symantec"),
    ("trendmicro", "trend micro"),
    ("microsoft", "safelinks"),
)
_BOT_AGENTS = (
    "headlesschrome",
    "phantomjs",
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "aiohttp",
    "go-http-client",
    "java/",
    "okhttp",
    "libwww",
    "bot",
    "spider",
    "crawler",
    "scanner",
    "preview",
)


@dataclass(frozen=True)
class Hit:
    """One request to a tracked link or the pixel, as the listener saw it."""

    kind: HitKind
    link: int | None  # the link number (clicks); None for an open
    at: dt.datetime
    ip: str | None  # the client's full address (before truncation)
    agent: str  # the User-Agent, "" when absent
    method: str = "GET"
    provider_bot: bool | None = None  # a provider's own verdict, when it gave one
    provider_flag: str | None = None  # that verdict's field (sg_machine_open, isBotEvent)


@dataclass(frozen=True)
class Verdict:
    klass: Class
    reasons: tuple[str, ...]
    agent: str  # the agent family


@dataclass(frozen=True)
class Earlier:
    """A click of the same message already recorded (on this replica or another)."""

    link: int | None
    at: dt.datetime


Span = tuple[int, int, str]  # first and last address (as integers) of a range, its name


@lru_cache(maxsize=1)
def _spans() -> dict[int, tuple[list[int], list[Span]]]:
    """The published ranges as disjoint integer spans per IP version, sorted by start (for a
    bisect, not a scan). Where ranges overlap, the one listed first names the overlap."""
    table = {
        "apple": APPLE_RANGES,
        "google_proxy": GOOGLE_PROXY_RANGES,
        "yahoo_proxy": YAHOO_PROXY_RANGES,
        **{f"scanner:{k}": v for k, v in SCANNER_RANGES.items()},
    }
    ranked = [
        (net.version, int(net.network_address), int(net.broadcast_address), name)
        for name, texts in table.items()
        for net in (ipaddress.ip_network(t) for t in texts)
    ]
    out: dict[int, tuple[list[int], list[Span]]] = {}
    for version in (4, 6):
        spans: list[Span] = []
        for _, first, last, name in (r for r in ranked if r[0] == version):
            spans = _add_span(spans, first, last, name)
        spans.sort()
        out[version] = ([s[0] for s in spans], spans)
    return out


def _add_span(spans: list[Span], first: int, last: int, name: str) -> list[Span]:
    """`spans` plus the parts of [first, last] that no earlier (higher-ranked) span covers."""
    pieces = [(first, last)]
    for a, b, _ in spans:
        cut: list[tuple[int, int]] = []
        for lo, hi in pieces:
            if hi < a or b < lo:
                cut.append((lo, hi))
                continue
            if lo < a:
                cut.append((lo, a - 1))
            if b < hi:
                cut.append((b + 1, hi))
        pieces = cut
    return spans + [(lo, hi, name) for lo, hi in pieces]


@lru_cache(maxsize=8192)
def network_of(ip: str | None) -> str | None:
    """Which published range `ip` falls in (`apple`, `google_proxy`, `scanner:mimecast`...)."""
    if not ip:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    starts, spans = _spans()[address.version]
    value = int(address)
    at = bisect.bisect_right(starts, value) - 1
    if at >= 0 and value <= spans[at][1]:
        return spans[at][2]
    return None


@lru_cache(maxsize=4096)  # a campaign's traffic has a few hundred distinct agents
def agent_family(agent: str) -> str:
    """A user agent reduced to a family: what is stored and shown, never the full string."""
    a = agent.lower()
    if not a.strip():
        return "none"
    if "googleimageproxy" in a:
        return "google_image_proxy"
    if "yahoomailproxy" in a or "yahoo! slurp" in a:
        return "yahoo_proxy"
    for family, needle in _SCANNER_AGENTS:
        if needle in a:
            return f"scanner:{family}"
    if any(b in a for b in _BOT_AGENTS):
        return "bot"
    if a.strip() == "mozilla/5.0":
        return "apple_mpp"  # MPP's fetches carry this bare agent
    for family, needle in (
        ("edge", "edg/"),
        ("outlook", "outlook"),
        ("thunderbird", "thunderbird"),
        ("chrome", "chrome/"),
        ("firefox", "firefox/"),
        ("safari", "safari/"),
    ):
        if needle in a:
            return family
    if "applewebkit" in a and ("iphone" in a or "ipad" in a or "macintosh" in a):
        return "apple_mail"  # Mail's WebView: WebKit without Safari's token
    if "mozilla/" in a:
        return "browser_other"
    return "other"


_PEOPLE = {"edge", "outlook", "thunderbird", "chrome", "firefox", "safari", "apple_mail"}
_PROXIES = {"google_image_proxy", "yahoo_proxy"}


def _since(hit: Hit, delivered_at: dt.datetime | None) -> float | None:
    return None if delivered_at is None else (hit.at - delivered_at).total_seconds()


def _machine_signals(hit: Hit, family: str, net: str | None) -> list[str]:
    """Rules that name a machine whatever the kind of hit."""
    reasons = []
    if hit.provider_bot:
        named = f":{hit.provider_flag}" if hit.provider_flag else ""
        reasons.append(f"provider_bot_flag{named}")
    if net is not None and net.startswith("scanner:"):
        reasons.append(f"vendor_range:{net.removeprefix('scanner:')}")
    if family.startswith("scanner:"):
        reasons.append(f"vendor_agent:{family.removeprefix('scanner:')}")
    if family == "bot":
        reasons.append("bot_agent")
    return reasons


def classify_open(hit: Hit, delivered_at: dt.datetime | None) -> Verdict:
    family = agent_family(hit.agent)
    net = network_of(hit.ip)
    reasons = _machine_signals(hit, family, net)
    if net == "apple" or family == "apple_mpp":
        reasons.append("apple_mpp_range" if net == "apple" else "apple_mpp_agent")
    since = _since(hit, delivered_at)
    if since is not None and since < OPEN_AT_DELIVERY_S:
        reasons.append("open_at_delivery")
    if family == "none":
        reasons.append("no_agent")
    if reasons:
        return Verdict(Class.MACHINE, tuple(reasons), family)
    if family in _PROXIES:
        return Verdict(Class.HUMAN, ("image_proxy_at_open",), family)
    if family in _PEOPLE and since is not None:
        return Verdict(Class.HUMAN, ("client_after_delivery",), family)
    return Verdict(Class.UNKNOWN, ("no_rule_decided",), family)


def classify_click(
    hit: Hit, delivered_at: dt.datetime | None, neighbours: Iterable[Earlier] = ()
) -> Verdict:
    """`neighbours`: the other clicks of the same message (before or after this one)."""
    family = agent_family(hit.agent)
    net = network_of(hit.ip)
    reasons = _machine_signals(hit, family, net)
    if hit.method.upper() == "HEAD":
        reasons.append("head_request")
    if hit.link == HONEYPOT_LINK:
        reasons.append("honeypot")
    since = _since(hit, delivered_at)
    if since is not None and since < CLICK_AT_DELIVERY_S:
        reasons.append("click_at_delivery")
    if any(
        n.link != hit.link and abs((n.at - hit.at).total_seconds()) <= BURST_S for n in neighbours
    ):
        reasons.append("link_burst")
    if family == "none":
        reasons.append("no_agent")
    if family in _PROXIES:
        reasons.append("image_proxy_click")
    if reasons:
        return Verdict(Class.SCANNER, tuple(reasons), family)
    if family in _PEOPLE and since is not None:
        return Verdict(Class.HUMAN, ("browser_after_delivery",), family)
    return Verdict(Class.UNKNOWN, ("no_rule_decided",), family)


def classify_message(
    hits: Sequence[Hit],
    delivered_at: dt.datetime | None,
    earlier: Sequence[Earlier] = (),
) -> list[Verdict]:
    """Verdicts for a settled group of one message's hits, in order: each click is judged
    against the message's other clicks, these and those recorded before; an open within
    BURST_S of a scanner's burst or honeypot fetch is that scanner rendering the message."""
    clicks = [Earlier(h.link, h.at) for h in hits if h.kind is HitKind.CLICK]
    out: list[Verdict] = []
    for hit in hits:
        if hit.kind is HitKind.OPEN:
            out.append(classify_open(hit, delivered_at))
            continue
        others = [c for c in clicks if c.at != hit.at or c.link != hit.link]
        out.append(classify_click(hit, delivered_at, [*others, *earlier]))
    scans = [
        h.at
        for h, v in zip(hits, out, strict=True)
        if h.kind is HitKind.CLICK and {"link_burst", "honeypot"} & set(v.reasons)
    ]
    for i, (hit, verdict) in enumerate(zip(hits, out, strict=True)):
        if hit.kind is HitKind.OPEN and verdict.klass is not Class.MACHINE:
            if any(abs((at - hit.at).total_seconds()) <= BURST_S for at in scans):
                out[i] = Verdict(Class.MACHINE, ("open_with_scanner",), verdict.agent)
    return out


# ---- addresses --------------------------------------------------------------------------------


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`TRUSTED_PROXIES`: comma-separated addresses or CIDR ranges."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            out.append(ipaddress.ip_network(part, strict=False))
    return tuple(out)


def _trusted(ip: str, proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address.version == n.version and address in n for n in proxies)


def client_ip(
    remote: str | None,
    forwarded_for: str | None,
    proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the last address
    in X-Forwarded-For that is not one of ours (a client can prepend anything it likes, so
    entries are read from the right and only trusted hops are skipped)."""
    if remote is None or not forwarded_for or not _trusted(remote, proxies):
        return remote
    # The last 32 entries: the proxies append on the right, so those are the ones to read.
    for entry in reversed([e.strip() for e in forwarded_for.split(",")][-32:]):
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            return remote  # a garbled header: trust only what we saw
        if not _trusted(entry, proxies):
            return entry
    return remote


@lru_cache(maxsize=8192)  # a hit's address is often a recent one's (the same person, a proxy)
def truncate_ip(ip: str | None, v4_prefix: int = 24, v6_prefix: int = 48) -> str | None:
    """The address as stored: its network at the configured prefix (0 keeps nothing)."""
    if not ip:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    prefix = v4_prefix if address.version == 4 else v6_prefix
    if prefix <= 0:
        return None
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)
