"""Provider opens and clicks (issue 24): SendGrid's signed Event Webhook and SES events through
signed SNS, tied to their message by the Message-ID the reactor set, stored as engagement
events through the listener's recorder with the provider's bot flag as a named reason, and
counted; forged, unknown and replayed events record nothing."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
from pymongo import AsyncMongoClient

from reactor.domain.deliveries import delivery_id
from reactor.domain.engagement import HitKind
from reactor.domain.provider_events import ProviderEvent, sendgrid_engagement, ses_engagement
from reactor.embedded import tls
from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.tls import make_test_pki
from reactor.engagement.provider import ProviderSignals, SignalsConfig
from reactor.engagement.recorder import Recorder
from reactor.metrics import Metrics

from .conftest import MongoTarget
from .helpers import eventually, running
from .test_consent import done, sent_campaign
from .test_engagement import MemoryEngagement
from .test_webhooks import (
    TOPIC,
    sendgrid_headers,
    sendgrid_keys,
    sns_host,
    sns_sign,
    webhook_settings,
)

Client = AsyncMongoClient[dict[str, Any]]
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tls.TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def sg(event: str, event_id: str, smtp_id: str, at: float, **extra: Any) -> dict[str, Any]:
    return {
        "email": "x@example.com",
        "event": event,
        "sg_event_id": event_id,
        "smtp-id": smtp_id,
        "timestamp": int(at),
        "useragent": CHROME,
        "ip": "93.184.216.34",
        **extra,
    }


def ses_event(base: str, kind: str, message_id: str, at: dt.datetime, **detail: Any) -> Any:
    body = {
        "eventType": kind,
        "mail": {
            "messageId": "ses-" + uuid.uuid4().hex,
            "commonHeaders": {"messageId": message_id},
        },
        kind.lower(): {
            "timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "ipAddress": "93.184.216.34",
            "userAgent": CHROME,
            **detail,
        },
    }
    return {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": TOPIC,
        "Message": json.dumps(body),
        "Timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "SigningCertURL": f"{base}/SimpleNotificationService-test.pem",
    }


async def events_of(client: Client, mongo: MongoTarget, n: int) -> list[dict[str, Any]]:
    async def landed() -> bool:
        return await client[mongo.campaigns_db].engagement.count_documents({}) >= n

    await eventually(landed, 10)
    return await client[mongo.campaigns_db].engagement.find({}, {"_id": 0}).to_list()


def outcome(m: Metrics, provider: str, kind: str, what: str) -> float:
    value = m.registry.get_sample_value(
        "reactor_provider_engagement_total", {"provider": provider, "kind": kind, "outcome": what}
    )
    return value or 0.0


def classed(m: Metrics, kind: str, klass: str) -> float:
    value = m.registry.get_sample_value(
        "reactor_engagement_events_total", {"kind": kind, "class": klass}
    )
    return value or 0.0


async def test_sendgrid_opens_and_clicks_land_classed_with_the_flag_named(
    mongo: MongoTarget, client: Client, sink: SmtpSink, pki: tls.TestPki
) -> None:
    key, public_key = sendgrid_keys()
    cfg = webhook_settings(
        mongo, sink, None, pki, sendgrid_webhook_public_key=public_key, provider_engagement=True
    )
    url = f"{cfg.public_base_url}/webhooks/sendgrid"
    async with running(cfg) as (reactor,), aiohttp.ClientSession() as http:
        cid = await sent_campaign(client, mongo, 3)
        await eventually(lambda: done(client, mongo, cid), 15)
        ids = {m.to: m.message_id for m in sink.messages}
        later = time.time() + 3600  # an hour after delivery: the timing rules say person
        batch = json.dumps(
            [
                sg("open", "o1", ids["c1@example.com"], later, sg_machine_open=True),
                sg("open", "o2", ids["c2@example.com"], later, sg_machine_open=False),
                sg("click", "k1", ids["c2@example.com"], later + 5, url="https://shop.test/a"),
                sg("click", "k2", ids["c0@example.com"], later, useragent="curl/8.0"),
                sg("open", "o3", "<nobody@example.com>", later),
                {"event": "delivered", "sg_event_id": "d1", "email": "c1@example.com"},
            ]
        ).encode()
        async with http.post(url, data=batch, headers=sendgrid_headers(key, batch)) as r:
            assert r.status == 200
        docs = await events_of(client, mongo, 4)
        # Replayed (SendGrid retries) and forged: nothing more recorded.
        async with http.post(url, data=batch, headers=sendgrid_headers(key, batch)) as r:
            assert r.status == 200
        forged = batch.replace(b"o1", b"o9")
        async with http.post(url, data=forged, headers=sendgrid_headers(key, batch)) as r:
            assert r.status == 403
        m = reactor.metrics
        assert m.webhook_rejected.labels("sendgrid", "signature")._value.get() == 1
        assert outcome(m, "sendgrid", "open", "recorded") == 2
        assert outcome(m, "sendgrid", "click", "recorded") == 2
        assert outcome(m, "sendgrid", "open", "unknown_message") == 1
        assert outcome(m, "sendgrid", "open", "replay") == 3
        assert outcome(m, "sendgrid", "click", "replay") == 2
        assert classed(m, "open", "machine") == 1
        assert classed(m, "click", "scanner") == 1
        assert classed(m, "click", "human") == 1
    docs = await client[mongo.campaigns_db].engagement.find({}, {"_id": 0}).to_list()
    by = {(d["customer"], d["kind"], d["reasons"][0]): d for d in docs}
    customers = sorted({d["customer"] for d in docs})
    assert len(customers) == 3
    flagged = [d for d in docs if "provider_bot_flag:sg_machine_open" in d["reasons"]]
    assert len(flagged) == 1
    assert (flagged[0]["kind"], flagged[0]["class"]) == ("open", "machine")
    human_open = [d for d in docs if d["kind"] == "open" and d["class"] == "human"]
    assert human_open
    assert human_open[0]["reasons"] == ["client_after_delivery"]
    scanner = [d for d in docs if d["class"] == "scanner"]
    assert len(scanner) == 1
    assert "bot_agent" in scanner[0]["reasons"]
    assert all(d["campaign"] == str(cid) and d["channel"] == "email" for d in docs)
    assert all(d["ip"] == "93.184.216.0" for d in docs)
    assert len(by) == len(docs)
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
    assert doc is not None
    engagement = doc["performance"]["engagement"]
    assert (engagement["opens"], engagement["clicks"], engagement["machine_opens"]) == (1, 1, 1)


async def test_ses_open_and_click_through_sns_with_is_bot_event(
    mongo: MongoTarget, client: Client, sink: SmtpSink, pki: tls.TestPki
) -> None:
    cfg = webhook_settings(mongo, sink, None, pki, provider_engagement=True)
    url = f"{cfg.public_base_url}/webhooks/ses"
    async with (
        sns_host(pki) as (base, _),
        running(cfg) as (reactor,),
        aiohttp.ClientSession() as http,
    ):
        cid = await sent_campaign(client, mongo, 3)
        await eventually(lambda: done(client, mongo, cid), 15)
        ids = {m.to: m.message_id for m in sink.messages}
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        calls = [
            ses_event(base, "Open", ids["c1@example.com"], later, isBotEvent=True),
            ses_event(
                base, "Click", ids["c1@example.com"], later, isBotEvent=True, link="https://s.test/"
            ),
            ses_event(base, "Open", ids["c2@example.com"], later, isBotEvent=False),
            ses_event(base, "Click", "<gone@example.com>", later),
        ]
        for call in calls:
            async with http.post(url, data=json.dumps(sns_sign(call, pki.impostor_key))) as r:
                assert r.status == 200
        altered = sns_sign(calls[2], pki.impostor_key)
        altered["Message"] = altered["Message"].replace("false", "true")
        async with http.post(url, data=json.dumps(altered)) as r:
            assert r.status == 403
        docs = await events_of(client, mongo, 3)
        m = reactor.metrics
        assert outcome(m, "ses", "click", "unknown_message") == 1
        assert m.webhook_rejected.labels("ses", "signature")._value.get() == 1
        assert classed(m, "open", "machine") == 1
        assert classed(m, "click", "scanner") == 1
        assert classed(m, "open", "human") == 1
    kinds = {(d["kind"], d["class"]): d["reasons"] for d in docs}
    assert set(kinds) == {("open", "machine"), ("click", "scanner"), ("open", "human")}
    assert kinds[("open", "machine")][0] == "provider_bot_flag:isBotEvent"
    assert kinds[("click", "scanner")][0] == "provider_bot_flag:isBotEvent"
    assert kinds[("open", "human")] == ["client_after_delivery"]


def test_parsing_keeps_only_opens_and_clicks_tied_to_a_message() -> None:
    body = json.dumps(
        [
            {"event": "open", "sg_event_id": "a", "smtp-id": "<m@x>", "timestamp": 1700000000},
            {"event": "open", "sg_event_id": "b", "timestamp": 1700000000},  # no Message-ID
            {"event": "click", "sg_event_id": "c", "smtp-id": "<m@x>", "timestamp": "soon"},
            {"event": "bounce", "sg_event_id": "d", "smtp-id": "<m@x>", "timestamp": 1},
            "junk",
        ]
    ).encode()
    found = sendgrid_engagement(json.loads(body))
    assert [(e.event_id, e.kind, e.flag) for e in found] == [("a", HitKind.OPEN, None)]
    assert found[0].at == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="not a SendGrid event list"):
        sendgrid_engagement({"event": "open"})
    # A click flagged sg_machine_open is not a flagged click: SendGrid sets it on opens only.
    click = json.dumps(
        [
            {
                "event": "click",
                "sg_event_id": "e",
                "smtp-id": "<m@x>",
                "timestamp": 1,
                "sg_machine_open": True,
            }
        ]
    ).encode()
    assert sendgrid_engagement(json.loads(click))[0].flag is None
    bounce = json.dumps({"eventType": "Bounce", "mail": {}})
    assert ses_engagement("sns-1", json.loads(bounce)) == []
    naive = json.dumps(
        {
            "eventType": "Open",
            "mail": {"commonHeaders": {"messageId": "<m@x>"}},
            "open": {"timestamp": "2026-01-01T00:00:00"},
        }
    )
    assert (
        ses_engagement("sns-2", json.loads(naive)) == []
    )  # a time without its zone is not guessed


# ---- deduplication and failures, on stores in memory --------------------------------------------

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
BASE = "https://r.example.com"


class MemoryFeedback:
    """Replay keys and the ledger's Message-IDs; `fail` makes every read raise."""

    def __init__(self, by_message_id: dict[str, tuple[str, str]]) -> None:
        self.by_message_id = by_message_id
        self.seen: set[str] = set()
        self.fail = False

    async def first_times(self, keys: Sequence[str], now: dt.datetime) -> list[bool]:
        if self.fail:
            raise ConnectionError("the database went away")
        out = [k not in self.seen for k in keys]
        self.seen |= set(keys)
        return out

    async def attribute_many(
        self, channel: str, wanted: Sequence[tuple[str | None, str | None]]
    ) -> list[tuple[str, str] | None]:
        return [self.by_message_id.get(p or "") for p, _ in wanted]


class MemoryListener:
    def __init__(self, opens: dict[tuple[str, str, str], list[dt.datetime]]) -> None:
        self.opens = opens

    async def opens_near(
        self, keys: Sequence[tuple[str, str, str]], since: dt.datetime, until: dt.datetime
    ) -> dict[tuple[str, str, str], list[dt.datetime]]:
        return {
            k: [at for at in self.opens.get(k, []) if since <= at <= until]
            for k in keys
            if k in self.opens
        }


def event(kind: HitKind, event_id: str, after_s: float, url: str | None = None) -> ProviderEvent:
    at = T0 + dt.timedelta(seconds=after_s)
    return ProviderEvent("sendgrid", event_id, kind, "<m7@x>", at, "93.184.216.34", CHROME, url)


def signals(listener_opens: bool) -> tuple[ProviderSignals, Recorder, MemoryEngagement, Metrics]:
    store = MemoryEngagement({delivery_id("c1", "email", "7"): ("sent", T0)})
    metrics = Metrics()
    recorder = Recorder(store, metrics, settle_s=0.01)
    made = ProviderSignals(
        MemoryFeedback({"<m7@x>": ("c1", "7")}),
        MemoryListener({("c1", "email", "7"): [T0 + dt.timedelta(seconds=3600)]}),
        recorder,
        metrics,
        SignalsConfig((f"{BASE}/c/", f"{BASE}/s/"), listener_opens=listener_opens),
    )
    return made, recorder, store, metrics


@pytest.mark.parametrize("listener_opens", [True, False])
async def test_what_the_listener_recorded_is_not_stored_twice(listener_opens: bool) -> None:
    made, recorder, store, metrics = signals(listener_opens)
    accepted = await made.receive(
        [
            event(HitKind.OPEN, "near", 3630),  # 30 s from the listener's open
            event(HitKind.OPEN, "far", 7200),  # an hour later: another open
            event(HitKind.CLICK, "ours", 3640, f"{BASE}/c/abc"),  # through our listener
            event(HitKind.CLICK, "theirs", 3650, "https://shop.test/a"),  # an untracked link
        ]
    )
    await recorder.drain(5)
    stored = sorted(
        (e["kind"], e["at"]) for e in store.events if e["reasons"] != ["implied_by_human_click"]
    )
    expected_opens = [7200] if listener_opens else [3630, 7200]
    assert stored == sorted(
        [("click", T0 + dt.timedelta(seconds=3650))]
        + [("open", T0 + dt.timedelta(seconds=s)) for s in expected_opens]
    )
    assert accepted == len(stored)
    assert outcome(metrics, "sendgrid", "click", "duplicate") == 1
    assert outcome(metrics, "sendgrid", "open", "duplicate") == (1 if listener_opens else 0)
    assert all(e["link"] is None for e in store.events)
    assert "links.None" not in store.counters["c1"]
    assert store.counters["c1"]["clicks"] == 1


async def test_a_database_failure_is_counted_and_never_raised() -> None:
    made, recorder, store, metrics = signals(False)
    feedback = made._feedback
    assert isinstance(feedback, MemoryFeedback)
    feedback.fail = True
    body = json.dumps(
        [{"event": "open", "sg_event_id": "x", "smtp-id": "<m7@x>", "timestamp": 1_800_000_000}]
    ).encode()
    assert await made.sendgrid(json.loads(body)) == 0
    await recorder.drain(5)
    assert store.events == []
    assert outcome(metrics, "sendgrid", "open", "failed") == 1
