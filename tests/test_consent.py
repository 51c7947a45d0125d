"""The recipient's side, part 1, end to end: campaign emails carry working one-click links; the
one-click POST and the page's actions land in `suppressions`; a suppression added mid-campaign
stops sends on every replica; forged links change nothing; bad requests are refused without
harm; and operators manage the list with `reactor suppress`."""

from __future__ import annotations

import collections
import csv
import io
import socket
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import aiohttp
import anyio
from pymongo import AsyncMongoClient

from reactor.adapters.mongo import MongoSuppressions
from reactor.cli import main as cli_main
from reactor.domain.consent import Kind, Reason, Suppression, suppression_id
from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.twilio_fake import TwilioFake

from .conftest import MongoTarget
from .helpers import campaign, eventually, holds, ledger, now, running, seed_customers, settings

Client = AsyncMongoClient[dict[str, Any]]
SECRET = "0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def public(**extra: Any) -> dict[str, Any]:
    port = free_port()
    return {
        "public_host": "127.0.0.1",
        "public_port": port,
        "public_base_url": f"http://127.0.0.1:{port}",
        "link_secret": SECRET,
        "postal_address": "1 Main St, Springfield",
        **extra,
    }


def unsubscribe_url(sink: SmtpSink, to: str) -> str:
    message = next(m for m in sink.messages if m.to == to)
    header = message.header("List-Unsubscribe")
    assert header is not None
    return header.split(",")[0].strip().strip("<>")


async def suppressions(client: Client, mongo: MongoTarget) -> list[dict[str, Any]]:
    return await client[mongo.campaigns_db].suppressions.find().sort("_id").to_list()


async def sent_campaign(client: Client, mongo: MongoTarget, n: int = 5, **overrides: Any) -> Any:
    ids = await seed_customers(client, mongo, n)
    coll = client[mongo.campaigns_db].campaigns
    res = await coll.insert_one(campaign("spring", 0.3, 60, ids, channels=["email"], **overrides))
    return res.inserted_id


async def done(client: Client, mongo: MongoTarget, campaign_id: Any) -> bool:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
    return bool(doc and doc.get("execution", {}).get("sendsDone"))


async def test_one_click_post_unsubscribes_once_with_no_cookie_or_redirect(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    async with running(settings(mongo, sink, **public())) as (reactor,):
        cid = await sent_campaign(client, mongo)
        await eventually(lambda: done(client, mongo, cid), 15)
        message = next(m for m in sink.messages if m.to == "c1@example.com")
        assert message.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        assert message.text is not None
        assert "1 Main St, Springfield" in message.text
        url = unsubscribe_url(sink, "c1@example.com")
        assert url in (message.text or "")
        assert url in (message.html or "")
        async with aiohttp.ClientSession() as http:
            for _ in range(2):  # a provider may retry: the second changes nothing
                async with http.post(
                    url, data={"List-Unsubscribe": "One-Click"}, allow_redirects=False
                ) as resp:
                    assert resp.status == 200
                    assert "Set-Cookie" not in resp.headers
                    assert "Location" not in resp.headers
                    assert resp.headers["Cache-Control"] == "no-store"
                    assert "aiohttp" not in resp.headers.get("Server", "")
        entries = await suppressions(client, mongo)
        assert {(e["kind"], e["value"], e["channel"], e["reason"]) for e in entries} == {
            ("customer", "1", "email", "unsubscribed"),
            ("email", "c1@example.com", "email", "unsubscribed"),
        }
        assert all(e["source"] == f"link:{cid}" for e in entries)
        doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
        assert doc is not None
        assert doc["performance"]["unsubscribes"] == 1
        assert reactor.metrics.unsubscribes.labels("email", "one_click")._value.get() == 1


async def test_forged_altered_and_expired_links_change_nothing(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    async with running(settings(mongo, sink, **public(link_ttl_seconds=3600))) as (reactor,):
        cid = await sent_campaign(client, mongo, 2)
        await eventually(lambda: done(client, mongo, cid), 15)
        url = unsubscribe_url(sink, "c1@example.com")
        base, token = url.rsplit("/", 1)
        head, body, sig = token.rsplit(".", 2)
        # Another customer's id spliced into a valid signature; a garbage token; a signature cut.
        import base64
        import json

        payload = json.loads(base64.urlsafe_b64decode(body + "=="))
        payload["u"] = "0"
        forged_body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        bad = [f"{head}.{forged_body}.{sig}", "v1.k1.e30.AAAA", f"{head}.{body}.{sig[:-4]}"]
        async with aiohttp.ClientSession() as http:
            for token in bad:
                async with http.post(
                    f"{base}/{token}", data={"List-Unsubscribe": "One-Click"}
                ) as r:
                    assert r.status == 400
                async with http.get(f"{base}/{token}") as r:
                    assert r.status == 400
                    text = await r.text()
                    assert "This link is not valid" in text
                    assert "Nothing was changed" in text
        assert await suppressions(client, mongo) == []
        assert reactor.metrics.link_rejected.labels("bad_signature")._value.get() >= 4


async def test_a_valid_link_to_an_unknown_campaign_is_recorded_not_an_error(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    cfg = settings(mongo, sink, **public())
    links = cfg.links()
    assert links is not None
    token = links.unsubscribe_token("65f000000000000000000000", "777", "email", now())
    async with running(cfg) as (reactor,), aiohttp.ClientSession() as http:
        async with http.get(links.unsubscribe_url(token)) as r:
            assert r.status == 200
            assert "Unsubscribe" in await r.text()
        async with http.post(links.unsubscribe_url(token), data={"action": "unsubscribe"}) as r:
            assert r.status == 200
            assert "You are unsubscribed" in await r.text()
        assert reactor.metrics.public_unknown.labels("campaign")._value.get() == 1
    entries = await suppressions(client, mongo)
    assert [(e["kind"], e["value"]) for e in entries] == [("customer", "777")]


async def test_the_page_unsubscribes_from_everything_and_undo_lifts_only_its_own_entries(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    async with running(settings(mongo, sink, **public())) as (_reactor,):
        cid = await sent_campaign(client, mongo, 3)
        await eventually(lambda: done(client, mongo, cid), 15)
        url = unsubscribe_url(sink, "c2@example.com")
        # A hard bounce an operator recorded must survive the recipient's undo.
        store = MongoSuppressions(client[mongo.campaigns_db])
        bounce = Suppression(Kind.EMAIL, "c2@example.com", "email", Reason.HARD_BOUNCE, "cli")
        await store.add([bounce], now=now())
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                page = await r.text()
                assert "spring" in page
                assert 'name="action" value="unsubscribe_all"' in page
                assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert await suppressions(client, mongo) != []  # the bounce only: GET changes nothing
            assert len(await suppressions(client, mongo)) == 1
            async with http.post(url, data={"action": "unsubscribe_all"}) as r:
                assert "You are unsubscribed" in await r.text()
            ids = {e["_id"] for e in await suppressions(client, mongo)}
            assert suppression_id("customer", "2", "all") in ids
            assert suppression_id("email", "c2@example.com", "all") in ids
            async with http.post(url, data={"action": "undo"}) as r:
                # The bounce still stops email: the page must not say "subscribed again".
                assert "You are still unsubscribed" in await r.text()
        left = await suppressions(client, mongo)
        assert [(e["reason"], e["channel"]) for e in left] == [("hard_bounce", "email")]
        doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
        assert doc is not None
        assert doc["performance"]["unsubscribes"] == 0


async def test_bad_requests_are_refused_with_one_line_and_no_harm(
    mongo: MongoTarget, client: Client, sink: SmtpSink, caplog: Any
) -> None:
    cfg = settings(mongo, sink, **public())
    links = cfg.links()
    assert links is not None
    url = links.unsubscribe_url(links.unsubscribe_token("c", "1", "email", now()))
    async with running(cfg), aiohttp.ClientSession() as http:
        async with http.post(url, data={"action": "x" * 10_000}) as r:
            assert r.status == 413
        async with http.post(url, data=b"{}", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 415
        async with http.post(url, data={"action": "<script>"}) as r:
            assert r.status == 400
            assert "<script>" not in await r.text()
        # A malformed request line: one warning, no traceback, no echo of the bytes.
        port = cfg.public_port
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            await conn.send(b"GET /u/\x00\x01 HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = await conn.receive()
            assert reply.split(b" ", 2)[1] == b"400"
            assert b"\x00" not in reply
            assert b"aiohttp" not in reply
    assert await suppressions(client, mongo) == []
    for record in caplog.records:
        assert record.exc_info is None
        assert "\x00" not in record.getMessage()


async def test_a_suppression_added_mid_campaign_stops_sends_on_every_replica(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 60)
    slow: dict[str, Any] = {"email_rate_per_second": 15}
    a = settings(mongo, sink, reactor_instance_id="a", **slow)
    b = settings(mongo, sink, reactor_instance_id="b", **slow)
    store = MongoSuppressions(client[mongo.campaigns_db])
    async with running(a, b) as reactors:
        coll = client[mongo.campaigns_db].campaigns
        res = await coll.insert_one(campaign("mid", 0.3, 60, ids, channels=["email"]))
        await eventually(lambda: holds(len(sink.messages) >= 5), 15)
        late = [
            Suppression(Kind.CUSTOMER, str(i), "all", Reason.MANUAL, "test") for i in range(40, 60)
        ]
        await store.add(late, now=now())
        # Every replica learns of them through the stream (not only the one sending).
        for reactor in reactors:
            assert reactor.suppressions is not None
            live = reactor.suppressions.live

            async def learned(live: dict[str, str] = live) -> bool:
                return all(e.id in live for e in late)

            await eventually(learned, 5)
        await eventually(lambda: done(client, mongo, res.inserted_id), 30)
    rows = await ledger(client, mongo, res.inserted_id)
    states = collections.Counter((r["state"], r.get("reason")) for r in rows)
    received = set(sink.recipients())
    assert not received & {f"c{i}@example.com" for i in range(40, 60)}
    assert states[("skipped", "suppressed:manual")] == 20
    assert states[("sent", None)] == 40
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["performance"]["emailsSuppressed"] == 20


async def test_suppressions_made_before_the_run_skip_by_customer_address_or_number(
    mongo: MongoTarget, client: Client, sink: SmtpSink, twilio: TwilioFake
) -> None:
    ids = await seed_customers(client, mongo, 6)
    store = MongoSuppressions(client[mongo.campaigns_db])
    await store.add(
        [
            Suppression(Kind.CUSTOMER, "1", "all", Reason.MANUAL, "test"),
            Suppression(Kind.EMAIL, "C2@Example.com", "email", Reason.HARD_BOUNCE, "test"),
            Suppression(Kind.PHONE, "+14155550003", "sms", Reason.SMS_STOP, "test"),
            Suppression(Kind.EMAIL, "c4@example.com", "sms", Reason.COMPLAINT, "test"),  # no effect
        ],
        now=now(),
    )
    async with running(settings(mongo, sink, twilio)):
        coll = client[mongo.campaigns_db].campaigns
        res = await coll.insert_one(campaign("pre", 0.3, 60, ids))
        await eventually(lambda: done(client, mongo, res.inserted_id), 15)
    rows = {(r["channel"], r["customer"]): r for r in await ledger(client, mongo, res.inserted_id)}
    assert rows[("email", "1")]["reason"] == rows[("sms", "1")]["reason"] == "suppressed:manual"
    assert rows[("email", "2")]["reason"] == "suppressed:hard_bounce"
    assert rows[("sms", "2")]["state"] == "sent"
    assert rows[("sms", "3")]["reason"] == "suppressed:sms_stop"
    assert rows[("email", "3")]["state"] == "sent"
    assert rows[("email", "4")]["state"] == "sent"
    assert sorted(m.to for m in twilio.messages) == sorted(f"+1415555000{i}" for i in (0, 2, 4, 5))


def cli(mongo: MongoTarget, monkeypatch: Any, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("MONGO_URI", mongo.uri)
    monkeypatch.setenv("CAMPAIGNS_DB", mongo.campaigns_db)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_main(["suppress", *args])
    return code, out.getvalue(), err.getvalue()


async def test_operators_add_remove_list_import_and_export(
    mongo: MongoTarget, client: Client, monkeypatch: Any, tmp_path: Any
) -> None:
    def run(*args: str) -> tuple[int, str, str]:
        return cli(mongo, monkeypatch, *args)

    code, out, _ = await anyio.to_thread.run_sync(lambda: run("add", "--email", "Ana@Example.COM"))
    assert code == 0
    assert "added: email ana@example.com (all)" in out
    code, out, _ = await anyio.to_thread.run_sync(lambda: run("add", "--email", "ana@example.com"))
    assert "already suppressed" in out
    code, _, err = await anyio.to_thread.run_sync(lambda: run("add", "--phone", "12"))
    assert code == 2
    assert "invalid_phone" in err
    source = tmp_path / "in.csv"
    source.write_text(
        "kind,value,channel,reason,note\n"
        "phone,(415) 555-0100,sms,sms_stop,replied STOP\n"
        "customer,42.0,email,,\n"
        "email,not-an-address,all,manual,\n"
        "fax,123,all,manual,\n"
    )
    code, out, err = await anyio.to_thread.run_sync(lambda: run("import", str(source)))
    assert code == 1
    assert "imported 2 rows: 2 new" in out
    assert "2 rejected" in out
    assert "line 4" in err
    assert "line 5" in err
    ids = {e["_id"] for e in await suppressions(client, mongo)}
    assert ids == {
        suppression_id("email", "ana@example.com", "all"),
        suppression_id("phone", "+14155550100", "sms"),
        suppression_id("customer", "42", "email"),
    }
    code, out, _ = await anyio.to_thread.run_sync(lambda: run("list", "--reason", "sms_stop"))
    assert code == 0
    assert "+14155550100" in out
    assert "1 shown of 3" in out
    target = tmp_path / "out.csv"
    code, _, _ = await anyio.to_thread.run_sync(lambda: run("export", str(target)))
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert {(r["kind"], r["value"], r["reason"]) for r in rows} == {
        ("email", "ana@example.com", "manual"),
        ("phone", "+14155550100", "sms_stop"),
        ("customer", "42", "manual"),
    }
    assert all(r["createdAt"].endswith("+00:00") for r in rows)
    code, out, _ = await anyio.to_thread.run_sync(
        lambda: run("remove", "--phone", "+1 415 555 0100")
    )
    assert code == 0
    assert "removed 1 entry" in out
    code, _, _ = await anyio.to_thread.run_sync(lambda: run("remove", "--phone", "+1 415 555 0100"))
    assert code == 1
    assert len(await suppressions(client, mongo)) == 2


async def test_doctor_reports_links_and_the_suppression_list_without_the_secret(
    mongo: MongoTarget, client: Client
) -> None:
    from reactor.doctor.checks import diagnose

    store = MongoSuppressions(client[mongo.campaigns_db])
    await store.add([Suppression(Kind.CUSTOMER, "1", "all", Reason.COMPLAINT, "test")], now=now())
    configured = await diagnose(
        settings(mongo, **public(link_old_keys=f"k0={'z' * 32}@2026-01-01T00:00:00Z"))
    )
    checks = {c.name: c for c in configured.checks}
    assert checks["unsubscribe links"].status == "ok"
    assert "(+1 retired)" in checks["unsubscribe links"].detail
    assert checks["suppressions"].detail == "1 entries (complaint 1)"
    shown = repr(configured.configuration) + repr(configured.checks)
    assert SECRET not in shown
    assert "z" * 32 not in shown
    bare = await diagnose(settings(mongo))
    checks = {c.name: c for c in bare.checks}
    assert checks["unsubscribe links"].status == "warn"
    assert any("PUBLIC_BASE_URL" in r for r in bare.recommendations)
