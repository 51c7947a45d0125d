"""The providers' webhooks through the real endpoints, each request signed the provider's way with
keys the tests make: Amazon SES through SNS (an RSA signing certificate served over HTTPS from a
trusted host), SendGrid's ECDSA-signed Event Webhook, Postmark's basic auth, a generic bearer
token, and Twilio's inbound messages and status callbacks (X-Twilio-Signature). Bounces and
complaints suppress, soft bounces after a count, replays change nothing, a complaint rate over
the threshold pauses the campaign, and a bad signature is 403 and counted."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pymongo import AsyncMongoClient

from reactor.domain.consent import callback_delivery, suppression_id
from reactor.embedded import tls
from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.tls import make_test_pki
from reactor.embedded.twilio_fake import TwilioFake
from reactor.public.sns import string_to_sign

from .conftest import MongoTarget
from .helpers import campaign, eventually, ledger, running, seed_customers, settings
from .test_consent import done, public, sent_campaign

Client = AsyncMongoClient[dict[str, Any]]
TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-feedback"
TOKEN = "generic-webhook-token-0123456789"


@contextlib.asynccontextmanager
async def sns_host(pki: tls.TestPki) -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTPS server standing in for sns.<region>.amazonaws.com: it serves the signing
    certificate and answers SubscribeURL (recording each confirmation)."""
    confirmed: list[str] = []
    cert = pki.impostor_cert.read_bytes()

    async def pem(request: web.Request) -> web.Response:
        return web.Response(body=cert, content_type="application/x-pem-file")

    async def confirm(request: web.Request) -> web.Response:
        confirmed.append(request.query.get("Token", ""))
        return web.Response(text="<ConfirmSubscriptionResponse/>")

    app = web.Application()
    app.router.add_get("/SimpleNotificationService-test.pem", pem)
    app.router.add_get("/confirm", confirm)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}", confirmed
    finally:
        await runner.cleanup()


def sns_sign(message: dict[str, Any], key_path: Path, version: str = "2") -> dict[str, Any]:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    digest = hashes.SHA256() if version == "2" else hashes.SHA1()
    signature = key.sign(string_to_sign(message), padding.PKCS1v15(), digest)
    return {
        **message,
        "SignatureVersion": version,
        "Signature": base64.b64encode(signature).decode(),
    }


def ses_notification(
    base: str, kind: str, address: str, message_id: str | None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "notificationType": kind,
        "mail": {
            "messageId": "ses-" + uuid.uuid4().hex,
            "commonHeaders": {"messageId": message_id},
        },
    }
    if kind == "Bounce":
        body["bounce"] = {
            "bounceType": extra.get("bounce_type", "Permanent"),
            "bouncedRecipients": [
                {"emailAddress": address, "diagnosticCode": "smtp; 550 5.1.1 user unknown"}
            ],
        }
    else:
        body["complaint"] = {"complainedRecipients": [{"emailAddress": address}]}
    return {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": extra.get("topic", TOPIC),
        "Message": json.dumps(body),
        "Timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "SigningCertURL": f"{base}/SimpleNotificationService-test.pem",
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tls.TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def webhook_settings(
    mongo: MongoTarget,
    sink: SmtpSink | None,
    twilio: TwilioFake | None,
    pki: tls.TestPki,
    **extra: Any,
) -> Any:
    return settings(
        mongo,
        sink,
        twilio,
        **public(
            ses_sns_topic_arns=TOPIC,
            ses_sns_cert_host=r"^127\.0\.0\.1:[0-9]+$",
            ses_sns_cert_subject=r"^localhost$",
            ses_sns_ca_file=str(pki.ca),
            webhook_token=TOKEN,
            postmark_webhook_username="postmark",
            postmark_webhook_password="postmark-password-0123",
            **extra,
        ),
    )


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def entries(client: Client, mongo: MongoTarget) -> dict[str, dict[str, Any]]:
    return {d["_id"]: d for d in await client[mongo.campaigns_db].suppressions.find().to_list()}


async def perf(client: Client, mongo: MongoTarget, cid: Any) -> dict[str, Any]:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
    assert doc is not None
    return dict(doc.get("performance") or {})


async def test_ses_bounces_and_complaints_through_signed_sns(
    mongo: MongoTarget, client: Client, sink: SmtpSink, pki: tls.TestPki
) -> None:
    cfg = webhook_settings(mongo, sink, None, pki)
    url = f"{cfg.public_base_url}/webhooks/ses"
    async with (
        sns_host(pki) as (base, confirmed),
        running(cfg) as (reactor,),
        aiohttp.ClientSession() as http,
    ):
        cid = await sent_campaign(client, mongo, 4)
        await eventually(lambda: done(client, mongo, cid), 15)
        sent_id = next(m for m in sink.messages if m.to == "c1@example.com").message_id
        # Subscription confirmation: signed, then the SubscribeURL is visited.
        sub = sns_sign(
            {
                "Type": "SubscriptionConfirmation",
                "MessageId": str(uuid.uuid4()),
                "Token": "tok-1",
                "TopicArn": TOPIC,
                "Message": "You have chosen to subscribe",
                "SubscribeURL": f"{base}/confirm?Token=tok-1",
                "Timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "SigningCertURL": f"{base}/SimpleNotificationService-test.pem",
            },
            pki.impostor_key,
        )
        async with http.post(url, data=json.dumps(sub)) as r:
            assert r.status == 200
        assert confirmed == ["tok-1"]
        bounce = sns_sign(
            ses_notification(base, "Bounce", "c1@example.com", sent_id), pki.impostor_key
        )
        for _ in range(2):  # SNS retries: the replay changes nothing
            async with http.post(url, data=json.dumps(bounce)) as r:
                assert r.status == 200
        complaint = sns_sign(
            ses_notification(base, "Complaint", "c2@example.com", None), pki.impostor_key, "1"
        )
        async with http.post(url, data=json.dumps(complaint)) as r:
            assert r.status == 200
        # Forged or untrusted: refused, nothing applied.
        altered = {**bounce, "Message": bounce["Message"].replace("c1@", "c3@")}
        other_topic = sns_sign(
            ses_notification(
                base, "Bounce", "c3@example.com", None, topic="arn:aws:sns:us-east-1:999:evil"
            ),
            pki.impostor_key,
        )
        elsewhere = sns_sign(
            {
                **ses_notification(base, "Bounce", "c3@example.com", None),
                "SigningCertURL": "https://evil.example/x.pem",
            },
            pki.impostor_key,
        )
        for bad in (altered, other_topic, elsewhere):
            async with http.post(url, data=json.dumps(bad)) as r:
                assert r.status == 403
        m = reactor.metrics
        assert m.webhook_rejected.labels("ses", "signature")._value.get() == 1
        assert m.webhook_rejected.labels("ses", "topic")._value.get() == 1
        assert m.webhook_rejected.labels("ses", "untrusted_url")._value.get() == 1
        assert m.webhook_replays.labels("ses")._value.get() == 1
    found = await entries(client, mongo)
    assert set(found) == {
        suppression_id("email", "c1@example.com", "email"),
        suppression_id("email", "c2@example.com", "email"),
    }
    assert found[suppression_id("email", "c1@example.com", "email")]["reason"] == "hard_bounce"
    assert found[suppression_id("email", "c2@example.com", "email")]["reason"] == "complaint"
    p = await perf(client, mongo, cid)
    assert (p["bounces"], p["complaints"]) == (1, 1)


def sendgrid_keys() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, base64.b64encode(public_der).decode()


def sendgrid_headers(
    key: ec.EllipticCurvePrivateKey, body: bytes, ts: int | None = None
) -> dict[str, str]:
    stamp = str(ts if ts is not None else int(time.time()))
    signature = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        "Content-Type": "application/json",
    }


async def test_sendgrid_signed_events_postmark_and_generic(
    mongo: MongoTarget, client: Client, sink: SmtpSink, pki: tls.TestPki
) -> None:
    key, public_key = sendgrid_keys()
    cfg = webhook_settings(
        mongo, sink, None, pki, sendgrid_webhook_public_key=public_key, soft_bounce_limit=2
    )
    base = cfg.public_base_url
    async with running(cfg) as (reactor,), aiohttp.ClientSession() as http:
        cid = await sent_campaign(client, mongo, 6)
        await eventually(lambda: done(client, mongo, cid), 15)
        smtp_id = next(m for m in sink.messages if m.to == "c1@example.com").message_id
        batch = json.dumps(
            [
                {
                    "email": "c1@example.com",
                    "event": "bounce",
                    "sg_event_id": "e1",
                    "smtp-id": smtp_id,
                    "reason": "550 5.1.1",
                },
                {"email": "c2@example.com", "event": "spamreport", "sg_event_id": "e2"},
                {"email": "c3@example.com", "event": "delivered", "sg_event_id": "e3"},
                {"email": "c3@example.com", "event": "open", "sg_event_id": "e4"},
            ]
        ).encode()
        async with http.post(
            f"{base}/webhooks/sendgrid", data=batch, headers=sendgrid_headers(key, batch)
        ) as r:
            assert r.status == 200
            assert await r.json() == {"received": 3, "applied": 3}
        tampered = batch.replace(b"c2@", b"c5@")
        stale = sendgrid_headers(key, batch, int(time.time()) - 3600)
        for body, headers in (
            (tampered, sendgrid_headers(key, batch)),
            (batch, stale),
            (batch, {}),
        ):
            async with http.post(f"{base}/webhooks/sendgrid", data=body, headers=headers) as r:
                assert r.status == 403
        # Postmark, basic auth.
        hard = json.dumps(
            {"RecordType": "Bounce", "ID": 42, "Type": "HardBounce", "Email": "c4@example.com"}
        )
        async with http.post(
            f"{base}/webhooks/postmark",
            data=hard,
            headers=basic("postmark", "postmark-password-0123"),
        ) as r:
            assert r.status == 200
        async with http.post(
            f"{base}/webhooks/postmark", data=hard, headers=basic("postmark", "wrong-password-000")
        ) as r:
            assert r.status == 401
        # Generic, bearer token: two soft bounces reach SOFT_BOUNCE_LIMIT=2.
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for i in range(2):
            soft = json.dumps(
                {"events": [{"id": f"g{i}", "type": "soft_bounce", "email": "c5@example.com"}]}
            )
            async with http.post(f"{base}/webhooks/generic", data=soft, headers=headers) as r:
                assert r.status == 200
            if i == 0:
                assert suppression_id("email", "c5@example.com", "email") not in await entries(
                    client, mongo
                )
        async with http.post(
            f"{base}/webhooks/generic", data="{}", headers={"Authorization": "Bearer nope"}
        ) as r:
            assert r.status == 401
        async with http.post(
            f"{base}/webhooks/generic", data='{"events": [{"type": "x"}]}', headers=headers
        ) as r:
            assert r.status == 400
        async with http.post(f"{base}/webhooks/generic", data=b"x" * 300_000, headers=headers) as r:
            assert r.status == 413
        assert reactor.metrics.webhook_rejected.labels("sendgrid", "signature")._value.get() == 2
        assert reactor.metrics.webhook_rejected.labels("sendgrid", "timestamp")._value.get() == 1
    found = await entries(client, mongo)
    reasons = {k: v["reason"] for k, v in found.items()}
    assert reasons == {
        suppression_id("email", "c1@example.com", "email"): "hard_bounce",
        suppression_id("email", "c2@example.com", "email"): "complaint",
        suppression_id("email", "c4@example.com", "email"): "hard_bounce",
        suppression_id("email", "c5@example.com", "email"): "hard_bounce",
    }
    assert found[suppression_id("email", "c5@example.com", "email")]["note"] == "2 soft bounces"
    p = await perf(client, mongo, cid)
    assert (p["bounces"], p["complaints"], p["softBounces"], p["emailsDelivered"]) == (2, 1, 2, 1)


async def test_a_complaint_rate_over_the_threshold_pauses_the_campaign(
    mongo: MongoTarget, client: Client, sink: SmtpSink, pki: tls.TestPki
) -> None:
    ids = await seed_customers(client, mongo, 200)
    cfg = webhook_settings(
        mongo,
        sink,
        None,
        pki,
        email_rate_per_second=20,
        complaint_min_emails=10,
        complaint_rate_threshold=0.05,
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    coll = client[mongo.campaigns_db].campaigns
    async with running(cfg), aiohttp.ClientSession() as http:
        res = await coll.insert_one(campaign("complained", 0.3, 60, ids, channels=["email"]))

        async def sent_enough() -> bool:
            return int((await perf(client, mongo, res.inserted_id)).get("emailsSent", 0)) >= 12

        await eventually(sent_enough, 15)
        events = [
            {"id": f"c{i}", "type": "complaint", "email": f"c{i}@example.com"} for i in range(1, 3)
        ]
        async with http.post(
            f"{cfg.public_base_url}/webhooks/generic",
            data=json.dumps({"events": events}),
            headers=headers,
        ) as r:
            assert r.status == 200

        async def paused() -> bool:
            doc = await coll.find_one({"_id": res.inserted_id})
            return bool(doc and doc.get("status") == "paused")

        await eventually(paused, 5)
        doc = await coll.find_one({"_id": res.inserted_id})
        assert doc is not None
        assert doc["execution"]["pausedReason"] == "complaint_rate"
        assert doc["execution"]["lastError"]["reason"] == "complaint_rate"
        assert "complaint rate" in doc["execution"]["lastError"]["detail"]
        # The doctor reads the pause as it reads every other recorded error.
        from reactor.doctor.checks import diagnose

        report = await diagnose(cfg)
        listed = [f for f in report.failures if f["id"] == str(res.inserted_id)]
        assert len(listed) == 1
        assert "complaint rate" in str(listed[0]["problem"])
        count = len(sink.messages)
        await anyio.sleep(1.5)
        assert len(sink.messages) <= count + 20  # sends stop within a second (in flight finish)
        frozen = len(sink.messages)
        await anyio.sleep(1.0)
        assert len(sink.messages) == frozen
    assert len(sink.messages) < 200


async def test_twilio_receipts_stop_and_start_replies(
    mongo: MongoTarget, client: Client, twilio: TwilioFake, pki: tls.TestPki
) -> None:
    ids = await seed_customers(client, mongo, 4)
    twilio.faults.undeliverable.add("+14155550003")
    cfg = webhook_settings(mongo, None, twilio, pki)
    base = cfg.public_base_url
    coll = client[mongo.campaigns_db].campaigns
    async with running(cfg) as (reactor,):
        res = await coll.insert_one(campaign("texts", 0.3, 60, ids, channels=["sms"]))
        await eventually(lambda: done(client, mongo, res.inserted_id), 15)

        async def receipts() -> bool:
            rows = await ledger(client, mongo, res.inserted_id)
            return all(r.get("deliveryStatus") in ("delivered", "undelivered") for r in rows)

        await eventually(receipts, 10)
        rows = {r["customer"]: r for r in await ledger(client, mongo, res.inserted_id)}
        assert rows["3"]["deliveryStatus"] == "undelivered"
        assert rows["3"]["deliveryError"] == "30003"
        assert rows["1"]["deliveryStatus"] == "delivered"
        # Each message's StatusCallback names its own ledger row (Twilio signs the query too).
        for m in twilio.messages:
            assert m.status_callback is not None
            url, _, query = m.status_callback.partition("?d=")
            assert url == f"{base}/webhooks/twilio/status"
            row = next(r for r in rows.values() if r["providerId"] == m.sid)
            assert callback_delivery(query) == row["_id"]
        p = await perf(client, mongo, res.inserted_id)
        assert (p["smsDelivered"], p["smsUndelivered"]) == (3, 1)
        # A late "sent" callback for a delivered message does not move it back.
        sid = rows["1"]["providerId"]
        status = await twilio.post_signed(
            f"{base}/webhooks/twilio/status", {"MessageSid": sid, "MessageStatus": "sent"}
        )
        assert status == 204
        late = await client[mongo.campaigns_db].deliveries.find_one({"providerId": sid})
        assert late is not None
        assert late["deliveryStatus"] == "delivered"
        # STOP, then START; a forged STOP is refused.
        inbound = f"{base}/webhooks/twilio/inbound"
        assert await twilio.send_inbound(inbound, "+14155550001", " stop ") == 200
        stop_id = suppression_id("phone", "+14155550001", "sms")
        assert (await entries(client, mongo))[stop_id]["reason"] == "sms_stop"
        assert (await perf(client, mongo, res.inserted_id))["smsStops"] == 1
        assert await twilio.send_inbound(inbound, "+14155550001", "Start") == 200
        assert stop_id not in await entries(client, mongo)
        async with aiohttp.ClientSession() as http:
            form = {"From": "+14155550002", "Body": "STOP", "MessageSid": "SMforged"}
            async with http.post(inbound, data=form, headers={"X-Twilio-Signature": "AAAA"}) as r:
                assert r.status == 403
            async with http.post(inbound, data=form) as r:
                assert r.status == 403
        assert suppression_id("phone", "+14155550002", "sms") not in await entries(client, mongo)
        assert reactor.metrics.webhook_rejected.labels("twilio", "signature")._value.get() == 2
        assert reactor.metrics.sms_status.labels("delivered")._value.get() == 3
        assert reactor.metrics.sms_status.labels("undelivered")._value.get() == 1


async def test_doctor_names_the_webhooks_and_their_last_event_without_secrets(
    mongo: MongoTarget, client: Client, sink: SmtpSink, pki: tls.TestPki
) -> None:
    from reactor.doctor.checks import diagnose

    cfg = webhook_settings(mongo, sink, None, pki)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    before = {c.name: c for c in (await diagnose(cfg)).checks}
    assert before["webhook generic"].detail.endswith("no event received yet")
    async with running(cfg), aiohttp.ClientSession() as http:
        body = json.dumps({"id": "d1", "type": "delivered", "email": "x@example.com"})
        async with http.post(
            f"{cfg.public_base_url}/webhooks/generic", data=body, headers=headers
        ) as r:
            assert r.status == 200
    report = await diagnose(cfg)
    checks = {c.name: c for c in report.checks}
    assert "last event" in checks["webhook generic"].detail
    assert "(1 in all)" in checks["webhook generic"].detail
    assert checks["webhook ses"].status == "ok"
    assert "sendgrid" in checks["webhooks off"].detail
    shown = repr(report.configuration) + repr(report.checks)
    assert TOKEN not in shown
    assert "postmark-password-0123" not in shown
