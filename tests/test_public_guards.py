"""The public listener against floods and hostile input: connections capped (503 beyond the
cap, served again once they close), the soft file limit raised, accept errors one sampled line,
refused tokens and webhook calls counted every time but logged as a sample, nested JSON a 400
before authentication, slow bodies let go within the documented 10 s, token signatures in one
spelling only, old link keys checked at start; SNS messages refused when stale, certificate
URLs pinned to SNS hosts, certificates checked for their subject and fetched sparingly; provider
event ids kept as long as links live."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import errno
import json
import logging
import resource
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pymongo import AsyncMongoClient

from reactor import http as reactor_http
from reactor.adapters.mongo.feedback import MongoFeedback
from reactor.config import Settings
from reactor.domain.consent import LinkKey, LinkSigner, Purpose, TokenError
from reactor.embedded import tls
from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.tls import make_test_pki
from reactor.metrics import Metrics
from reactor.public import forms
from reactor.public.logsample import SampledLog
from reactor.public.sns import SnsError, SnsVerifier

from .conftest import MongoTarget
from .helpers import now, running, settings
from .test_consent import public
from .test_webhooks import TOPIC, ses_notification, sns_host, sns_sign, webhook_settings

Client = AsyncMongoClient[dict[str, Any]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tls.TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


# ---- connections ---------------------------------------------------------------------------


async def test_connections_beyond_the_cap_are_refused_and_served_again_once_closed(
    mongo: MongoTarget, sink: SmtpSink
) -> None:
    cfg = settings(mongo, sink, **public(public_max_connections=5))
    async with running(cfg) as (reactor,):
        held = []
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", cfg.public_port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            await writer.drain()
            held.append((reader, writer))
        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.public_port)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503")
        assert reactor.metrics.public_connections_refused._value.get() == 1
        assert reactor.metrics.public_connections._value.get() == 5
        for _, w in held:
            w.close()
        async with aiohttp.ClientSession() as http:

            async def served() -> bool:
                async with http.get(f"{cfg.public_base_url}/healthz") as r:
                    return r.status == 200

            for _ in range(50):
                if await served():
                    break
                await asyncio.sleep(0.05)
            assert await served()


def test_the_soft_file_limit_is_raised_towards_its_target() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        target = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        assert reactor_http.raise_nofile_limit(4096) == (target, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == target
        # Never lowered.
        assert reactor_http.raise_nofile_limit(10)[0] == target
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


async def test_accept_errors_are_counted_and_logged_as_one_sampled_line(
    mongo: MongoTarget, sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = settings(mongo, sink, **public())
    async with running(cfg) as (reactor,):
        loop = asyncio.get_running_loop()
        with caplog.at_level(logging.DEBUG):
            for _ in range(100):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
        assert reactor.metrics.accept_errors.labels("EMFILE")._value.get() == 100
        lines = [r for r in caplog.records if "could not accept" in r.getMessage()]
        assert len(lines) == 1
        assert all(r.exc_info is None for r in caplog.records)


def test_a_sampled_log_writes_one_line_per_reason_per_interval_and_says_what_it_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = [0.0]
    sampled = SampledLog(logging.getLogger("t"), interval_s=10, monotonic=lambda: t[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        written = [sampled.warning("a", "refused %s", "a") for _ in range(5)]
        sampled.warning("b", "refused %s", "b")
        t[0] = 11.0
        sampled.warning("a", "refused %s", "a")
    assert written == [True, False, False, False, False]
    assert [r.getMessage() for r in caplog.records] == [
        "refused a",
        "refused b",
        "refused a (and 4 more like it since the last line)",
    ]


async def test_refused_tokens_are_all_counted_but_logged_as_a_sample(
    mongo: MongoTarget, sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = settings(mongo, sink, **public())
    async with running(cfg) as (reactor,), aiohttp.ClientSession() as http:
        with caplog.at_level(logging.WARNING):
            for i in range(30):
                async with http.get(f"{cfg.public_base_url}/u/v1.k1.e30.AAAA{i}") as r:
                    assert r.status == 400
        refused = reactor.metrics.link_rejected
        assert sum(refused.labels(w)._value.get() for w in ("bad_signature", "malformed")) == 30
    lines = [r for r in caplog.records if "refused a link token" in r.getMessage()]
    assert 1 <= len(lines) <= 2  # one per reason in the interval


async def test_a_slow_body_is_let_go_within_the_documented_deadline(
    mongo: MongoTarget, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forms, "BODY_TIMEOUT_S", 0.2)
    cfg = settings(mongo, sink, **public())
    links = cfg.links()
    assert links is not None
    path = "/u/" + links.unsubscribe_token("c", "1", "email", now())
    async with running(cfg):
        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.public_port)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
            "\r\nContent-Length: 1000\r\n\r\nList".encode()
        )
        await writer.drain()
        # 408 after the body deadline, then the connection closed after at most LINGER_S of
        # draining (aiohttp's default lingering would hold it 10 s more).
        answer = await asyncio.wait_for(reader.read(), reactor_http.LINGER_S + 3)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert forms.BODY_TIMEOUT_S + reactor_http.LINGER_S <= 10


# ---- hostile input -------------------------------------------------------------------------


async def test_nested_json_is_refused_as_malformed_before_authentication(
    mongo: MongoTarget, sink: SmtpSink, pki: tls.TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = webhook_settings(mongo, sink, None, pki)
    async with running(cfg) as (reactor,), aiohttp.ClientSession() as http:
        with caplog.at_level(logging.WARNING):
            async with http.post(f"{cfg.public_base_url}/webhooks/ses", data=b"[" * 200_000) as r:
                assert r.status == 400
        assert reactor.metrics.webhook_rejected.labels("ses", "malformed")._value.get() == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_token_signature_verifies_in_one_spelling_only() -> None:
    s = LinkSigner([LinkKey("k1", b"s" * 32)], ttl_s=86400, rotation_grace_s=0)
    t = s.sign(campaign="c", customer="1", channel="email", purpose=Purpose.UNSUBSCRIBE, now=now())
    head, sig = t.rsplit(".", 1)
    raw = base64.urlsafe_b64decode(sig + "=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spellings = []
    for ch in alphabet:  # the same 32 bytes, other trailing bits
        other = sig[:-1] + ch
        if other != sig and base64.urlsafe_b64decode(other + "=") == raw:
            spellings.append(other)
    assert len(spellings) == 3
    s.verify(t, purpose=Purpose.UNSUBSCRIBE, now=now())
    for other in spellings:
        with pytest.raises(TokenError) as err:
            s.verify(f"{head}.{other}", purpose=Purpose.UNSUBSCRIBE, now=now())
        assert err.value.why == "malformed"
    for other in (sig + "A", sig[:-1]):
        with pytest.raises(TokenError):
            s.verify(f"{head}.{other}", purpose=Purpose.UNSUBSCRIBE, now=now())


def test_old_link_keys_may_not_reuse_the_current_key_id_or_be_short() -> None:
    base: dict[str, Any] = {
        "mongo_uri": "mongodb://x",
        "public_base_url": "https://m.example.com",
        "link_secret": "s" * 32,
        "link_key_id": "k2",
    }
    with pytest.raises(ValueError, match="reuses LINK_KEY_ID") as err:
        Settings(**base, link_old_keys=f"k2={'o' * 32}@2026-01-01T00:00:00Z")
    assert "o" * 32 not in str(err.value)
    with pytest.raises(ValueError, match="at least 32 bytes") as err:
        Settings(**base, link_old_keys="k1=short-old-secret@2026-01-01T00:00:00Z")
    assert "short-old-secret" not in str(err.value)
    ok = Settings(**base, link_old_keys=f"k1={'o' * 32}@2026-01-01T00:00:00Z")
    assert ok.links() is not None


# ---- SNS -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.eu-central-2.amazonaws.com/SimpleNotificationService-x.pem",
        "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-x.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-x.pem",
    ],
)
def test_sns_certificates_come_from_regional_sns_hosts(url: str) -> None:
    assert SnsVerifier(frozenset({TOPIC})).trusted_url(url, certificate=True) == url


@pytest.mark.parametrize(
    "url",
    [
        "https://sns.s3.amazonaws.com/x.pem",  # an S3 bucket named sns
        "https://sns.us-east-1.amazonaws.com.evil.example/x.pem",
        "https://user@sns.us-east-1.amazonaws.com/x.pem",
        "https://sns.us-east-1.amazonaws.com@evil.example/x.pem",
        "https://sns.us-east-1.amazonaws.com:8443/x.pem",
        "https://sns.us-east-1.amazonaws.com/x.pem?nonce=1",
        "https://sns.us-east-1.amazonaws.com/x.pem#f",
        "https://sns.us-east-1.amazonaws.com/a/../x.pem",
        "https://sns.us-east-1.amazonaws.com/x.txt",
        "http://sns.us-east-1.amazonaws.com/x.pem",
        "https://sqs.us-east-1.amazonaws.com/x.pem",
    ],
)
def test_other_certificate_urls_are_refused(url: str) -> None:
    with pytest.raises(SnsError) as err:
        SnsVerifier(frozenset({TOPIC})).trusted_url(url, certificate=True)
    assert err.value.why == "untrusted_url"


def verifier(pki: tls.TestPki, **extra: Any) -> SnsVerifier:
    return SnsVerifier(
        frozenset({TOPIC}),
        cert_host=r"^127\.0\.0\.1:[0-9]+$",
        ca_file=str(pki.ca),
        **{"cert_subject": r"^localhost$", **extra},
    )


async def test_a_stale_or_future_sns_message_is_refused_before_any_fetch(
    pki: tls.TestPki,
) -> None:
    v = verifier(pki)
    try:
        async with sns_host(pki) as (base, _):
            for shift in (dt.timedelta(hours=-2), dt.timedelta(minutes=10)):
                message = ses_notification(base, "Bounce", "a@example.com", None)
                message["Timestamp"] = (dt.datetime.now(dt.UTC) + shift).strftime(
                    "%Y-%m-%dT%H:%M:%S.000Z"
                )
                with pytest.raises(SnsError) as err:
                    await v.verify(sns_sign(message, pki.impostor_key))
                assert err.value.why == "stale"
            assert v.fetches == 0
            fresh = sns_sign(
                ses_notification(base, "Bounce", "a@example.com", None), pki.impostor_key
            )
            await v.verify(fresh)
            assert v.fetches == 1
    finally:
        await v.aclose()


async def test_a_certificate_with_another_subject_is_refused(pki: tls.TestPki) -> None:
    v = verifier(pki, cert_subject=r"^sns\.amazonaws\.com$")
    try:
        async with sns_host(pki) as (base, _):
            message = sns_sign(
                ses_notification(base, "Bounce", "a@example.com", None), pki.impostor_key
            )
            with pytest.raises(SnsError) as err:
                await v.verify(message)
            assert err.value.why == "certificate"
            assert "not an SNS signing certificate" in str(err.value)
    finally:
        await v.aclose()


@contextlib.asynccontextmanager
async def gated_host(pki: tls.TestPki) -> AsyncIterator[tuple[str, asyncio.Event, list[str]]]:
    """An HTTPS host whose answers wait for a gate: 404 for every path, counted."""
    gate = asyncio.Event()
    asked: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        asked.append(request.path)
        await gate.wait()
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{name}", anything)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}", gate, asked
    finally:
        gate.set()
        await runner.cleanup()


async def test_certificate_fetches_are_few_at_once_and_failures_are_remembered(
    pki: tls.TestPki,
) -> None:
    v = verifier(pki, max_fetches=2)
    try:
        async with gated_host(pki) as (base, gate, asked):

            def message(name: str) -> dict[str, Any]:
                m = ses_notification(base, "Bounce", "a@example.com", None)
                m["SigningCertURL"] = f"{base}/{name}.pem"
                return sns_sign(m, pki.impostor_key)

            first = [asyncio.create_task(v.verify(message(n))) for n in ("a", "a", "b")]
            for _ in range(100):
                if len(asked) == 2:
                    break
                await asyncio.sleep(0.01)
            # Two fetches run ("a" once for both of its callers); a third URL is refused.
            with pytest.raises(SnsError) as err:
                await v.verify(message("c"))
            assert "too many certificate fetches" in str(err.value)
            gate.set()
            results = await asyncio.gather(*first, return_exceptions=True)
            assert all(isinstance(r, SnsError) and r.why == "certificate" for r in results)
            assert sorted(asked) == ["/a.pem", "/b.pem"]
            # A failed fetch is remembered: asking again fetches nothing.
            with pytest.raises(SnsError):
                await v.verify(message("a"))
            assert v.fetches == 2
    finally:
        await v.aclose()


async def test_a_stale_sns_replay_through_the_endpoint_changes_nothing(
    mongo: MongoTarget, client: Client, sink: SmtpSink, pki: tls.TestPki
) -> None:
    cfg = webhook_settings(mongo, sink, None, pki)
    async with (
        sns_host(pki) as (base, _),
        running(cfg) as (reactor,),
        aiohttp.ClientSession() as http,
    ):
        old = ses_notification(base, "Complaint", "c1@example.com", None)
        old["Timestamp"] = "2026-01-01T00:00:00.000Z"
        async with http.post(
            f"{cfg.public_base_url}/webhooks/ses", data=json.dumps(sns_sign(old, pki.impostor_key))
        ) as r:
            assert r.status == 403
        assert reactor.metrics.webhook_rejected.labels("ses", "stale")._value.get() == 1
    assert await client[mongo.campaigns_db].suppressions.count_documents({}) == 0


async def test_provider_event_ids_are_kept_as_long_as_links_live(
    mongo: MongoTarget, client: Client
) -> None:
    db = client[mongo.campaigns_db]
    # An earlier version's index kept a week.
    await db.webhook_events.create_index(
        "receivedAt", name="receivedAt_ttl", expireAfterSeconds=7 * 86400
    )
    await MongoFeedback(db, "campaigns", dedupe_s=180 * 86400).ensure_indexes()
    indexes = {i["name"]: i async for i in await db.webhook_events.list_indexes()}
    assert indexes["receivedAt_ttl"]["expireAfterSeconds"] == 180 * 86400
    await MongoFeedback(db, "campaigns", dedupe_s=180 * 86400).ensure_indexes()  # idempotent
    default = Settings(mongo_uri="mongodb://x")
    assert default.link_ttl_seconds == 180 * 86400


def test_the_shipped_edge_buffers_bodies_and_times_slow_ones_out() -> None:
    from pathlib import Path

    caddyfile = Path("deploy/Caddyfile").read_text()
    assert "request_buffers 256KB" in caddyfile  # bodies read whole before they go on
    assert "read_body 10s" in caddyfile
    assert "read_header 5s" in caddyfile


def test_the_flood_figures_can_fail() -> None:
    from reactor.bench.consent import figures

    phase = {"one_click_p99_ms": 250.0, "one_clicks_landed": 99}
    result = {
        "unsubscribe_to_every_replica": {"p99_ms": 50.0, "sent_anyway": 0},
        "suppression_check": {"checked_vs_unchecked": 0.95},
        "under_flood": {
            "held": 2000,
            "rate_per_s": 1000.0,
            "email_rate_per_s": 300.0,
            "one_clicks": 100,
            "flooded": phase,
            "sending_ratio": 0.5,
            "lateness_delta_ms": 150.0,
            "accept_errors": 3,
            "flood": {"answered_per_s": 480.0},
        },
    }
    met = {f.name: f.met for f in figures(result)}
    assert met["Unsubscribe on every replica, p99"] is True
    missed = [name for name, ok in met.items() if ok is False]
    assert len(missed) == 6  # p99, one missing, ratio, lateness, accept errors, the load reached


def test_the_cap_is_lowered_to_leave_descriptors_for_the_pools(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from reactor.public import server as public_server

    monkeypatch.setattr(public_server, "raise_nofile_limit", lambda target: (1024, 1024))
    links = Settings(
        mongo_uri="mongodb://x", public_base_url="https://m.example.com", link_secret="s" * 32
    ).links()
    assert links is not None
    srv = public_server.PublicServer(
        links=links,
        suppressions=None,  # type: ignore[arg-type]
        actions=None,  # type: ignore[arg-type]
        clock=None,  # type: ignore[arg-type]
        metrics=Metrics(),
        host="127.0.0.1",
        port=0,
        max_connections=5000,
    )
    with caplog.at_level(logging.WARNING):
        assert srv._connection_limit() == 1024 - public_server.FD_RESERVE
    assert "raise `ulimit -n`" in caplog.text
    srv.max_connections = 100
    assert srv._connection_limit() == 100


async def test_a_flood_of_malformed_requests_is_one_line_per_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def ready() -> dict[str, bool]:
        return {"mongodb": True}

    server = reactor_http.OpsServer(Metrics(), ready, "127.0.0.1", 0)
    await server.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="reactor.http"):
            for i in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(f"GET /\x00{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answer = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                assert answer.split(b" ", 2)[1] == b"400"
        lines = [r for r in caplog.records if "bad request" in r.getMessage()]
        assert len(lines) == 1
    finally:
        await server.stop()
