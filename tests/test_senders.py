"""Sending identities: SENDERS_FILE parsed (or refused with the field and the reason), a campaign's
choice of identity, DKIM signatures that verify with dkimpy against the public key on messages
the SMTP sink captured, keys that cannot sign stopping start-up, and a relay that is down
pausing only the campaigns that send through it."""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import dkim  # type: ignore[import-untyped]
import dkim.crypto  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from reactor.adapters import dkim as reactor_dkim
from reactor.adapters.dkim import SIGNED_HEADERS, DkimKeyError, load_signer
from reactor.domain.errors import InvalidCampaign
from reactor.domain.senders import DkimKey, SendersFileError, parse_senders
from reactor.embedded.smtp_sink import SmtpSink

from .conftest import MongoTarget
from .helpers import Client, campaign, eventually, holds, ledger, running, seed_customers, settings
from .test_consent import public

GOOD = """
[senders.news]
from = "News <news@news.example.com>"
rate_per_second = 20

[senders.news.relay]
host = "smtp.news.example.com"
port = 465
tls = "tls"
username = "news"
password_env = "NEWS_SMTP_PASSWORD"
pool_size = 4

[senders.news.dkim]
selector = "s2026"
key_file = "/etc/dkim/news.pem"

[senders.shop]
from = "shop@shop.example.org"

[senders.shop.relay]
host = "127.0.0.1"
tls = "none"
"""


def signing_children() -> list[int]:
    """The pids of this process's live DKIM signing helpers."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        alive = fields[0] != "Z"
        if b"reactor.adapters.dkim_process" in cmdline and int(fields[1]) == os.getpid() and alive:
            found.append(int(proc.name))
    return found


def test_a_senders_file_is_read_with_credentials_from_the_environment() -> None:
    senders = parse_senders(GOOD, {"NEWS_SMTP_PASSWORD": "hunter2-hunter2"})
    news = senders.identities["news"]
    assert news.domain == "news.example.com"
    assert news.address == "news@news.example.com"
    assert news.relay.password is not None
    assert news.relay.password.get_secret_value() == "hunter2-hunter2"
    assert (news.relay.port, news.relay.tls, news.relay.pool_size) == (465, "tls", 4)
    assert news.dkim == DkimKey("s2026", "/etc/dkim/news.pem")
    assert news.rate_per_s == 20
    assert news.budget_key == "sender:news"
    shop = senders.identities["shop"]
    assert shop.relay.username is None
    assert shop.relay.password is None
    assert shop.rate_per_s is None  # the email channel's rate
    assert senders.default is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('password_env = "NEWS_SMTP_PASSWORD"\n', ""), "credentials need both"),
        (("NEWS_SMTP_PASSWORD", "UNSET_VAR_27"), "the variable UNSET_VAR_27 is not set"),
        (('tls = "tls"', 'tls = "none"'), "clear text"),
        (('tls = "tls"', 'tls = "ssl"'), "tls must be one of"),
        (('selector = "s2026"', 'selector = "bad selector"'), "selector must be a DNS label"),
        (("pool_size = 4", "pool_size = 0"), "pool_size must be an integer"),
        (("rate_per_second = 20", "rate_per_second = -1"), "must be positive"),
        (("rate_per_second = 20", "rate = 20"), "unknown field(s) rate"),
        (('from = "News <news@news.example.com>"', 'from = "news"'), "from: needs an address"),
        (("[senders.shop]", "[senders.default]"), "'default' is made from SMTP_*"),
        (('host = "127.0.0.1"', 'host = ""'), "senders.shop.relay.host is required"),
        (("[senders.news.relay]", "[senders.news.relai]"), "unknown field(s) relai"),
    ],
)
def test_a_broken_senders_file_is_refused_with_the_field_and_the_reason(
    change: tuple[str, str], message: str
) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(SendersFileError) as info:
        parse_senders(text, {"NEWS_SMTP_PASSWORD": "hunter2-hunter2"})
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)


def test_a_campaign_chooses_by_name_or_by_from_domain_and_unknown_ones_are_refused() -> None:
    senders = parse_senders(GOOD, {"NEWS_SMTP_PASSWORD": "x"})
    by_name = senders.choose({"email": {"sender": "shop"}})
    by_domain = senders.choose({"email": {"from": "Deals <deals@News.Example.com>"}})
    assert by_name is not None
    assert by_name.name == "shop"
    assert by_domain is not None
    assert by_domain.name == "news"
    assert senders.choose({"email": {"subject": "x"}}) is None  # no default identity
    with pytest.raises(InvalidCampaign) as info:
        senders.choose({"email": {"sender": "newz"}})
    assert info.value.reason == "unknown_sender"
    assert "'newz'" in info.value.detail
    assert "news, shop" in info.value.detail
    with pytest.raises(InvalidCampaign) as info:
        senders.choose({"email": {"from": "a@elsewhere.example"}})
    assert "elsewhere.example" in info.value.detail


# ---- DKIM ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture
def key_file(tmp_path: pathlib.Path, rsa_key: rsa.RSAPrivateKey) -> pathlib.Path:
    path = tmp_path / "dkim.pem"
    path.write_bytes(pem(rsa_key))
    return path


def dns_for(key: rsa.RSAPrivateKey, name: bytes) -> Any:
    """dkimpy's dnsfunc: the public key at `name` only, nothing anywhere else."""
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import base64

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dnsfunc(queried: bytes, timeout: int = 5) -> bytes:
        return record if queried.rstrip(b".") == name else b""

    return dnsfunc


def test_openssl_gives_dkimpys_own_rsa_signature_byte_for_byte(key_file: pathlib.Path) -> None:
    load_signer("reactor.example", DkimKey("s1", str(key_file)))  # registers the key
    private = dkim.crypto.parse_pem_private_key(key_file.read_bytes())
    for data in (b"", b"one message", os.urandom(300)):
        digest = dkim.HashThrough(hashlib.sha256(data))
        fast = reactor_dkim._openssl_rsa_sign(digest, private)
        pure = reactor_dkim._DKIMPY_RSA_SIGN(dkim.HashThrough(hashlib.sha256(data)), private)
        assert fast == bytes(pure)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        (b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", "not an unencr"),
        ("ec", "is not an RSA key"),
        ("public", "not an unencrypted PEM private key"),
    ],
)
def test_a_key_that_cannot_sign_stops_start_up_with_a_clear_message(
    tmp_path: pathlib.Path, rsa_key: rsa.RSAPrivateKey, content: Any, message: str
) -> None:
    path = tmp_path / "key.pem"
    if content == "ec":
        content = pem(ec.generate_private_key(ec.SECP256R1()))
    elif content == "public":
        content = rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValidationError) as info:
        settings_with_dkim(path)
    text = str(info.value)
    assert message in text
    assert str(path) in text
    assert "sending identity 'default'" in text


def settings_with_dkim(path: pathlib.Path, **extra: Any) -> Any:
    from reactor.config import Settings

    return Settings(
        mongo_uri="mongodb://x",
        smtp_host="127.0.0.1",
        smtp_tls="none",
        email_from="campaigns@reactor.example",
        dkim_selector="s1",
        dkim_private_key_file=str(path),
        **extra,
    )


def test_a_selector_without_a_key_is_refused(tmp_path: pathlib.Path) -> None:
    from reactor.config import Settings

    with pytest.raises(ValidationError, match="DKIM_SELECTOR and DKIM_PRIVATE_KEY_FILE"):
        Settings(mongo_uri="mongodb://x", dkim_selector="s1")


async def test_sent_messages_carry_a_dkim_signature_that_verifies_against_the_public_key(
    mongo: MongoTarget,
    client: Client,
    sink: SmtpSink,
    key_file: pathlib.Path,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    cfg = settings(
        mongo,
        sink,
        dkim_selector="s1",
        dkim_private_key_file=str(key_file),
        **public(),
    )
    ids = await seed_customers(client, mongo, 4)
    coll = client[mongo.campaigns_db].campaigns
    await coll.insert_one(campaign("signed", 0.3, 60, ids, channels=["email"]))
    async with running(cfg):
        await eventually(lambda: holds(len(sink.messages) == 4), 15)
        # Signed where DKIM_SIGNING's default says: a helper process of this one.
        assert len(signing_children()) == 1
    assert signing_children() == []  # stopped with the reactor
    dnsfunc = dns_for(rsa_key, b"s1._domainkey.reactor.example")
    for message in sink.messages:
        assert dkim.verify(message.raw, dnsfunc=dnsfunc), message.to
        signature = message.header("DKIM-Signature") or ""
        tags = dict(t.strip().split("=", 1) for t in signature.split(";") if "=" in t)
        assert tags["a"] == "rsa-sha256"
        assert tags["c"] == "relaxed/relaxed"
        assert tags["d"] == "reactor.example"
        assert tags["s"] == "s1"
        signed = {h.strip() for h in tags["h"].split(":")}
        assert {"from", "to", "subject", "date", "message-id", "mime-version"} <= signed
        assert {"content-type", "list-unsubscribe", "list-unsubscribe-post"} <= signed
        assert message.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    # A signature that verifies only with the right key: another key's record fails.
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert not dkim.verify(
        sink.messages[0].raw, dnsfunc=dns_for(other, b"s1._domainkey.reactor.example")
    )
    # And a changed header breaks it (the unsubscribe headers are covered).
    raw = sink.messages[0].raw
    at = raw.index(b"<", raw.index(b"\nList-Unsubscribe:"))
    tampered = raw[: at + 1] + b"x" + raw[at + 1 :]
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_every_listed_header_is_asked_for() -> None:
    assert SIGNED_HEADERS[0] == b"from"
    assert b"list-unsubscribe-post" in SIGNED_HEADERS
    with pytest.raises(DkimKeyError):
        reactor_dkim.DkimSigner("reactor.example", "s1", b"garbage")


# ---- identities on their own relays ------------------------------------------------------------


async def test_a_relay_down_pauses_only_the_campaigns_that_send_through_it(
    mongo: MongoTarget,
    client: Client,
    sink: SmtpSink,
    tmp_path: pathlib.Path,
    key_file: pathlib.Path,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    async with SmtpSink() as news_sink:
        senders_file = tmp_path / "senders.toml"
        senders_file.write_text(
            f"""
[senders.news]
from = "News <news@news.example.com>"
rate_per_second = 500
[senders.news.relay]
host = "127.0.0.1"
port = {news_sink.port}
tls = "none"
pool_size = 2
[senders.news.dkim]
selector = "n1"
key_file = "{key_file}"
"""
        )
        await news_sink.go_down()
        ids = await seed_customers(client, mongo, 12)
        coll = client[mongo.campaigns_db].campaigns
        plain = (
            await coll.insert_one(campaign("plain", 0.3, 60, ids, channels=["email"]))
        ).inserted_id
        news_doc = campaign("news", 0.3, 60, ids, channels=["email"])
        news_doc["email"]["sender"] = "news"
        news = (await coll.insert_one(news_doc)).inserted_id
        cfg = settings(
            mongo,
            sink,
            senders_file=str(senders_file),
            channel_pause_max_seconds=0.5,
            send_concurrency=2,
        )
        async with running(cfg):
            # The default relay's campaign is sent in full while the news relay is down...
            await eventually(lambda: holds(len(sink.messages) == 12), 15)

            async def news_paused() -> bool:
                doc = await coll.find_one({"_id": news})
                error = ((doc or {}).get("execution") or {}).get("lastError") or {}
                return error.get("reason") == "channel_paused"

            await eventually(news_paused, 15)
            doc = await coll.find_one({"_id": news})
            assert doc is not None
            assert "email (news)" in doc["execution"]["lastError"]["detail"]
            rows = await ledger(client, mongo, news)
            assert not [r for r in rows if r["state"] in ("sent", "failed")]
            # ...and once it is back, the news campaign goes out through it, signed as news.
            await news_sink.come_back()
            await eventually(lambda: holds(len(news_sink.messages) == 12), 20)
        assert {m.mail_from for m in sink.messages} == {"campaigns@reactor.example"}
        assert {m.mail_from for m in news_sink.messages} == {"news@news.example.com"}
        assert sorted(m.to for m in news_sink.messages) == sorted(
            f"c{i}@example.com" for i in range(12)
        )
        dnsfunc = dns_for(rsa_key, b"n1._domainkey.news.example.com")
        assert all(dkim.verify(m.raw, dnsfunc=dnsfunc) for m in news_sink.messages)
        assert all(m.header("DKIM-Signature") is None for m in sink.messages)
        assert all(m.message_id.endswith("@news.example.com>") for m in news_sink.messages)
        budgets = {d["_id"] for d in await client[mongo.campaigns_db].rate_budgets.find().to_list()}
        assert {"channel:email", "sender:news"} <= budgets
        plain_doc = await coll.find_one({"_id": plain})
        assert plain_doc is not None
        assert plain_doc["execution"].get("sendsDone")


async def test_a_campaign_naming_an_unknown_identity_is_not_sent(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 3)
    coll = client[mongo.campaigns_db].campaigns
    doc = campaign("typo", 0.3, 60, ids, channels=["email"])
    doc["email"]["sender"] = "newz"
    cid = (await coll.insert_one(doc)).inserted_id
    async with running(settings(mongo, sink)):

        async def refused() -> bool:
            found = await coll.find_one({"_id": cid})
            error = ((found or {}).get("execution") or {}).get("lastError") or {}
            return error.get("reason") == "unknown_sender"

        await eventually(refused, 10)
        found = await coll.find_one({"_id": cid})
        assert found is not None
        assert "'newz'" in found["execution"]["lastError"]["detail"]
        assert found["status"] == "approved"  # not armed, not started
    assert sink.messages == []


@pytest.mark.parametrize(
    ("email", "reason", "fragment"),
    [
        ({"sender": "news", "from": "x@shop.example.org"}, "unknown_sender", "not sender news's"),
        ({"from": "Deals\r\nBcc: all@x.example <d@news.example.com>"}, "bad_content", "one line"),
        ({"from": "no address"}, "bad_content", "one address"),
        ({"from": 7}, "bad_content", "one address"),
    ],
)
def test_a_from_that_does_not_fit_its_identity_is_refused(
    email: dict[str, Any], reason: str, fragment: str
) -> None:
    senders = parse_senders(GOOD, {"NEWS_SMTP_PASSWORD": "x"})
    with pytest.raises(InvalidCampaign) as info:
        senders.choose({"email": email})
    assert info.value.reason == reason
    assert fragment in info.value.detail


async def test_a_campaigns_own_from_goes_out_signed_and_aligned(
    mongo: MongoTarget,
    client: Client,
    sink: SmtpSink,
    key_file: pathlib.Path,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    cfg = settings(mongo, sink, dkim_selector="s1", dkim_private_key_file=str(key_file))
    ids = await seed_customers(client, mongo, 2)
    doc = campaign("deals", 0.3, 60, ids, channels=["email"])
    doc["email"]["from"] = "Spring Deals <deals@reactor.example>"
    await client[mongo.campaigns_db].campaigns.insert_one(doc)
    async with running(cfg):
        await eventually(lambda: holds(len(sink.messages) == 2), 15)
    dnsfunc = dns_for(rsa_key, b"s1._domainkey.reactor.example")
    for message in sink.messages:
        assert message.header("From") == "Spring Deals <deals@reactor.example>"
        assert message.mail_from == "campaigns@reactor.example"  # the identity's envelope
        assert dkim.verify(message.raw, dnsfunc=dnsfunc)
