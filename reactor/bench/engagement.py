"""Engagement benchmark: how well opens and clicks are classed, on labelled traffic.

Traffic is generated, seeded, from published behaviour (sources in docs/engagement.md): a
mailbox mix by client market share; Apple Mail Privacy Protection fetching every image through
Apple's proxies when the message reaches the device; Gmail's and Yahoo's caching image proxies
fetching once, when the person opens; people opening minutes to days later and clicking one
or two links; security gateways (Defender Safe Links, Mimecast, Proofpoint, Barracuda) fetching
every link of a message seconds to minutes after delivery, some with browser agents and a
JavaScript-running browser that also loads the pixel, some with HEAD; sandboxes in cloud
ranges with browser agents, half of them fetching a single link late (which no rule here can
tell from a person: the misses are in the figures). A few people are fast: they open and click
within seconds of delivery (the rules count them as machines: the human error is in the figures).

Each hit is replayed through the real recorder into the embedded MongoDB (one process of its
own), in batches of SETTLE_S of traffic, against ledger rows holding the delivery times; the
classes are read back from `engagement` and compared with the labels: a confusion matrix.
Sizes are fixed before looking: 3,000 messages (--quick) or 6,000.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient

from ..adapters.mongo.engagement import MongoEngagement
from ..domain.deliveries import delivery_id
from ..domain.engagement import HONEYPOT_LINK, Hit, HitKind
from ..engagement.recorder import SETTLE_S, Accepted, Recorder
from ..metrics import Metrics
from . import engagement_load
from .common import emulator_process
from .figures import Figure

SOURCES = [
    "reactor/bench/engagement.py",
    "reactor/bench/engagement_load.py",
    "reactor/bench/loadgen.py",
    "reactor/domain/engagement.py",
    "reactor/engagement",
    "reactor/embedded/smtp_sink.py",  # the sending ratio's receiver shares the two cores
]
CAMPAIGN = "65f0c0ffee00000000000024"
T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
EDGE = CHROME + " Edg/124.0.0.0"
FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0"
IOS_SAFARI = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
IOS_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)"
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
BROWSERS = (CHROME, EDGE, FIREFOX, IOS_SAFARI)

# Litmus's client market share (opens, 2024) rounded; the rest are other desktop clients.
MAILBOXES = (("apple", 0.50), ("gmail", 0.30), ("outlook", 0.10), ("yahoo", 0.05), ("other", 0.05))
GATEWAYS = (
    ("microsoft", 0.45),
    ("mimecast", 0.2),
    ("proofpoint", 0.2),
    ("barracuda", 0.1),
    ("sandbox", 0.05),
)
BEHIND_GATEWAY = 0.2  # recipients at a company whose mail passes a security gateway
MPP_ADOPTION = 0.9  # of Apple Mail users (SocketLabs' estimate: 90% or more)
OPEN_RATE = 0.3
CLICK_RATE = 0.2  # of openers
FAST_READERS = 0.002  # open and click within seconds of delivery


@dataclass
class Labelled:
    customer: str
    hit: Hit
    label: str  # human | machine | scanner


def _pick(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    x, acc = rng.random(), 0.0
    for name, p in table:
        acc += p
        if x < acc:
            return name
    return table[-1][0]


def _ip(rng: random.Random, kind: str) -> str:
    r = rng.randrange
    nets = {
        "apple": lambda: f"17.{r(256)}.{r(256)}.{r(1, 255)}",
        "google": lambda: f"66.249.{r(80, 96)}.{r(1, 255)}",
        "yahoo": lambda: f"98.{r(136, 140)}.{r(256)}.{r(1, 255)}",
        "microsoft": lambda: f"40.107.{r(256)}.{r(1, 255)}",
        "mimecast": lambda: f"205.139.110.{r(1, 255)}",
        "proofpoint": lambda: f"148.163.{r(128, 160)}.{r(1, 255)}",
        "barracuda": lambda: f"64.235.{r(144, 160)}.{r(1, 255)}",
        "cloud": lambda: f"3.{r(80, 95)}.{r(256)}.{r(1, 255)}",
        "home": lambda: f"{rng.choice((81, 86, 92, 176, 188))}.{r(256)}.{r(256)}.{r(1, 255)}",
    }
    return nets[kind]()


class Traffic:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.hits: list[Labelled] = []
        self.deliveries: dict[str, dt.datetime] = {}

    def add(self, customer: str, label: str, **hit: Any) -> None:
        self.hits.append(Labelled(customer, Hit(**hit), label))

    def message(self, n: int) -> None:
        rng = self.rng
        customer = str(n)
        delivered = T0 + dt.timedelta(seconds=n / 100)  # a campaign sending 100/s
        self.deliveries[customer] = delivered
        links = rng.randint(2, 6)
        mailbox = _pick(rng, MAILBOXES)
        if rng.random() < BEHIND_GATEWAY:
            self._gateway(customer, delivered, links, _pick(rng, GATEWAYS))
        mpp = mailbox == "apple" and rng.random() < MPP_ADOPTION
        if mpp:
            # MPP fetches every image when Mail downloads the message: seconds to hours
            # after delivery (the device must be on Wi-Fi and power).
            at = delivered + dt.timedelta(seconds=rng.lognormvariate(4, 2))
            self.add(
                customer,
                "machine",
                kind=HitKind.OPEN,
                link=None,
                at=at,
                ip=_ip(rng, "apple"),
                agent="Mozilla/5.0",
            )
        if rng.random() < OPEN_RATE:
            self._person(customer, delivered, links, mailbox, mpp)

    def _gateway(self, customer: str, delivered: dt.datetime, links: int, vendor: str) -> None:
        rng = self.rng
        start = {
            "microsoft": rng.uniform(0.5, 8),
            "mimecast": rng.uniform(1, 20),
            "proofpoint": rng.uniform(2, 120),
            "barracuda": rng.uniform(1, 30),
            "sandbox": rng.uniform(60, 900),
        }[vendor]
        at = delivered + dt.timedelta(seconds=start)
        if vendor == "sandbox" and rng.random() < 0.5:
            # One link, late, from a cloud range, with a browser: nothing tells it apart.
            self.add(
                customer,
                "scanner",
                kind=HitKind.CLICK,
                link=rng.randrange(links),
                at=at,
                ip=_ip(rng, "cloud"),
                agent=CHROME,
            )
            return
        browser = vendor == "microsoft" and rng.random() < 0.6  # detonation in a browser
        where = {"sandbox": "cloud"}.get(vendor, vendor)
        if vendor == "proofpoint" and rng.random() < 0.5:
            where = "cloud"
        agent = CHROME if browser or vendor in ("proofpoint", "sandbox", "mimecast") else ""
        if vendor == "barracuda":
            agent = "Mozilla/5.0 (compatible; Barracuda Sentinel)"
        method = "HEAD" if vendor == "barracuda" else "GET"
        for link in [*range(links), HONEYPOT_LINK]:
            t = at + dt.timedelta(seconds=rng.uniform(0, 0.8))
            self.add(
                customer,
                "scanner",
                kind=HitKind.CLICK,
                link=link,
                at=t,
                ip=_ip(rng, where),
                agent=agent,
                method=method,
            )
        browser = browser or vendor == "sandbox"  # sandboxes run a browser, JavaScript too
        if browser:  # a browser renders the page, images and all
            self.add(
                customer,
                "machine",
                kind=HitKind.OPEN,
                link=None,
                at=at + dt.timedelta(seconds=0.3),
                ip=_ip(rng, where),
                agent=CHROME,
            )

    def _person(
        self, customer: str, delivered: dt.datetime, links: int, mailbox: str, mpp: bool
    ) -> None:
        rng = self.rng
        fast = rng.random() < FAST_READERS
        after = rng.uniform(3, 15) if fast else max(20.0, rng.lognormvariate(8.2, 1.6))
        opened = delivered + dt.timedelta(seconds=after)
        agent, ip = {
            "gmail": (GMAIL_PROXY, _ip(rng, "google")),
            "yahoo": (YAHOO_PROXY, _ip(rng, "yahoo")),
            "outlook": (OUTLOOK, _ip(rng, "home")),
            "apple": (IOS_MAIL, _ip(rng, "home")),
            "other": (FIREFOX, _ip(rng, "home")),
        }[mailbox]
        images = not mpp and not (mailbox == "outlook" and rng.random() < 0.5)
        if images:  # Outlook blocks images by default for half of them; MPP served its copy
            self.add(customer, "human", kind=HitKind.OPEN, link=None, at=opened, ip=ip, agent=agent)
        if fast or rng.random() < CLICK_RATE:
            home = _ip(rng, "home")
            browser = IOS_SAFARI if mailbox == "apple" else rng.choice(BROWSERS)
            first = opened + dt.timedelta(
                seconds=rng.uniform(2, 10) if fast else rng.lognormvariate(3.7, 1.0)
            )
            chosen = rng.sample(range(links), 2 if rng.random() < 0.3 else 1)
            at = first
            for link in chosen:
                self.add(
                    customer, "human", kind=HitKind.CLICK, link=link, at=at, ip=home, agent=browser
                )
                at += dt.timedelta(seconds=rng.uniform(5, 300))


def traffic(messages: int, seed: int = 24) -> Traffic:
    t = Traffic(seed)
    for n in range(messages):
        t.message(n)
    # One hit per (message, kind, link, millisecond): the key the results are matched by.
    seen: set[tuple[str, str, int | None, int]] = set()
    for h in t.hits:
        while _key(h.customer, h.hit.kind.value, h.hit.link, h.hit.at) in seen:
            h.hit = Hit(**{**h.hit.__dict__, "at": h.hit.at + dt.timedelta(milliseconds=1)})
        seen.add(_key(h.customer, h.hit.kind.value, h.hit.link, h.hit.at))
    t.hits.sort(key=lambda h: h.hit.at)
    return t


def _key(
    customer: str, kind: str, link: int | None, at: dt.datetime
) -> tuple[str, str, int | None, int]:
    return (customer, kind, link, int(at.timestamp() * 1000))


async def replay(uri: str, t: Traffic) -> dict[str, Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        db = client.marketing
        await db.deliveries.insert_many(
            [
                {
                    "_id": delivery_id(CAMPAIGN, "email", c),
                    "campaign": CAMPAIGN,
                    "channel": "email",
                    "customer": c,
                    "state": "sent",
                    "updatedAt": at,
                }
                for c, at in t.deliveries.items()
            ]
        )
        store = MongoEngagement(db, "campaigns")
        await store.ensure_indexes(retention_days=3650, short_link_days=180)
        recorder = Recorder(store, Metrics())
        started = time.perf_counter()
        batch: list[Accepted] = []
        for h in t.hits:
            if (batch and (h.hit.at - batch[0].hit.at).total_seconds() > SETTLE_S) or len(
                batch
            ) >= 500:
                await recorder.apply(batch)
                batch = []
            batch.append(Accepted(CAMPAIGN, "email", h.customer, T0, h.hit))
        if batch:
            await recorder.apply(batch)
        elapsed = time.perf_counter() - started
        stored = await db.engagement.find(
            {"reasons": {"$ne": "implied_by_human_click"}},
            {"customer": 1, "kind": 1, "link": 1, "at": 1, "class": 1, "reasons": 1},
        ).to_list()
    finally:
        await client.close()
    return _matrix(t, stored, elapsed)


def _matrix(t: Traffic, stored: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    labels = {_key(h.customer, h.hit.kind.value, h.hit.link, h.hit.at): h.label for h in t.hits}
    matrix: Counter[tuple[str, str, str]] = Counter()
    misses: Counter[str] = Counter()
    for doc in stored:
        at = doc["at"].replace(tzinfo=dt.UTC)
        label = labels.get(_key(doc["customer"], doc["kind"], doc["link"], at))
        if label is None:
            misses["unmatched"] += 1
            continue
        matrix[(doc["kind"], label, doc["class"])] += 1
        if label != doc["class"]:
            misses[f"{label}->{doc['class']}:{','.join(doc['reasons'])}"] += 1

    def share(kind: str, label: str, good: str) -> float:
        total = sum(v for (k, lab, _), v in matrix.items() if k == kind and lab == label)
        return round(matrix[(kind, label, good)] / total, 4) if total else float("nan")

    humans = sum(v for (_, lab, _), v in matrix.items() if lab == "human")
    human_wrong = sum(v for (_, lab, c), v in matrix.items() if lab == "human" and c != "human")
    return {
        "hits_sent": len(t.hits),
        "events_stored": len(stored),
        "messages": len(t.deliveries),
        "confusion": {
            f"{kind} {label}": {
                c: matrix[(kind, label, c)] for c in ("human", "machine", "scanner", "unknown")
            }
            for kind, label in (
                ("open", "human"),
                ("open", "machine"),
                ("click", "human"),
                ("click", "scanner"),
            )
        },
        "scanner_clicks_recognised": share("click", "scanner", "scanner"),
        "machine_opens_recognised": share("open", "machine", "machine"),
        "human_misclassed": round(human_wrong / humans, 4) if humans else float("nan"),
        "top_errors": dict(misses.most_common(8)),
        "replay_hits_per_s": round(len(t.hits) / elapsed, 1),
    }


def print_matrix(result: dict[str, Any]) -> str:
    rows = ["label \\ class      human  machine  scanner  unknown"]
    for name, row in result["confusion"].items():
        rows.append(f"{name:<17}" + "".join(f"{row[c]:>9}" for c in row))
    return "\n".join(rows)


async def run(quick: bool = False) -> dict[str, Any]:
    t = traffic(3000 if quick else 6000)
    async with emulator_process() as uri:
        result = await replay(uri, t)
    print(print_matrix(result), flush=True)
    result["load"] = await engagement_load.run(quick)
    result["load_first_hits"] = await engagement_load.run(quick, first_hits=True)
    result["sending"] = await engagement_load.send_ratio(quick)
    return result


def figures(result: dict[str, Any]) -> list[Figure]:
    load = result["load"]
    return [
        Figure(
            "scanner clicks recognised", result["scanner_clicks_recognised"], "share", 0.95, ">="
        ),
        Figure("machine opens recognised", result["machine_opens_recognised"], "share", 0.95, ">="),
        Figure("human events misclassed", result["human_misclassed"], "share", 0.01, "<="),
        Figure(
            "classed events stored / hits replayed",
            round(result["events_stored"] / result["hits_sent"], 4),
            "ratio",
            1.0,
            "==",
        ),
        Figure("tracking hits absorbed, one replica", load["absorbed_per_s"], "hits/s", 2000, ">="),
        Figure("redirect p99 under that load", load["p99_ms"], "ms", 25, "<="),
        Figure(
            "redirect p99, every hit a recipient's first",
            result["load_first_hits"]["p99_ms"],
            "ms",
            25,
            "<=",
        ),
        Figure(
            "sending with tracking on / off",
            result["sending"]["on_over_off"],
            "ratio",
            0.95,
            ">=",
        ),
        Figure(
            "sending with tracking on / off, 95 % interval",
            " to ".join(f"{x:.3f}" for x in result["sending"]["interval_95"]),
            "ratio",
            note="from its rounds' ratios (Student's t on their logarithms)",
        ),
        Figure(
            "events stored / hits sent under load",
            round(load["events_stored"] / load["hits_sent"], 4),
            "ratio",
            1.0,
            "==",
        ),
        Figure(
            "events stored / hits sent, every hit a first",
            round(
                result["load_first_hits"]["events_stored"] / result["load_first_hits"]["hits_sent"],
                4,
            ),
            "ratio",
            1.0,
            "==",
        ),
    ]
