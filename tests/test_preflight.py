"""The pre-flight of sending identities against a DNS server the test controls (UDP on loopback,
never the internet): SPF present and authorising the relay, the DKIM record holding the
configured key, the DMARC policy, alignment; warnings on the campaign, and
REQUIRE_AUTHENTICATED_SENDERS refusing a campaign whose identity fails."""

from __future__ import annotations

import base64
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from reactor.adapters.preflight import DnspythonDns, Preflight, check_identity
from reactor.domain.authcheck import FAIL, OK, WARN, aligned, dmarc_finding, organizational, tags
from reactor.domain.senders import DkimKey, Identity, Relay
from reactor.embedded.dns_server import DnsServer
from reactor.embedded.smtp_sink import SmtpSink

from .conftest import MongoTarget
from .helpers import Client, campaign, eventually, holds, running, seed_customers, settings

DOMAIN = "news.example.com"


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("news.example.com", "example.com"),
        ("example.com", "example.com"),
        ("a.b.shop.co.uk", "shop.co.uk"),
        ("Mail.Example.ORG.", "example.org"),
    ],
)
def test_organizational_domains(domain: str, org: str) -> None:
    assert organizational(domain) == org


@pytest.mark.parametrize(
    ("from_domain", "other", "mode", "expected"),
    [
        ("news.example.com", "news.example.com", "s", True),
        ("news.example.com", "example.com", "s", False),
        ("news.example.com", "example.com", "r", True),
        ("news.example.com", "mail.example.com", "r", True),
        ("news.example.com", "example.net", "r", False),
        ("shop.co.uk", "other.co.uk", "r", False),
    ],
)
def test_alignment(from_domain: str, other: str, mode: str, expected: bool) -> None:
    assert aligned(from_domain, other, mode) is expected


@pytest.mark.parametrize(
    ("record", "status"),
    [
        (None, FAIL),
        ("v=DMARC1; p=reject", OK),
        ("v=DMARC1; p=quarantine; pct=50", OK),
        ("v=DMARC1; p=none; rua=mailto:d@example.com", WARN),
        ("v=DMARC1; p=maybe", FAIL),
    ],
)
def test_dmarc_policies(record: str | None, status: str) -> None:
    assert dmarc_finding(tags(record) if record else None, "_dmarc.x").status == status


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def dkim_record(key: rsa.RSAPrivateKey) -> str:
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(public_der(key)).decode()


def publish_good(dns: DnsServer, key: rsa.RSAPrivateKey) -> None:
    dns.add("smtp.news.example.com", "A", "203.0.113.5")
    dns.txt(DOMAIN, "v=spf1 include:_spf.example.com -all")
    dns.txt("_spf.example.com", "v=spf1 ip4:198.51.100.0/24 a:smtp.news.example.com ~all")
    dns.txt(f"s1._domainkey.{DOMAIN}", dkim_record(key))
    dns.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; adkim=r")


def identity(dkim_domain: str | None = None, relay: str = "smtp.news.example.com") -> Identity:
    return Identity(
        name="news",
        from_address=f"News <news@{DOMAIN}>",
        relay=Relay(host=relay),
        dkim=DkimKey("s1", "/unused", dkim_domain),
    )


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    async with DnsServer() as server:
        yield server


async def statuses(dns: DnsServer, ident: Identity, der: bytes) -> dict[str, list[str]]:
    report = await check_identity(DnspythonDns(dns.address, 1.0), ident, der)
    out: dict[str, list[str]] = {}
    for f in report.findings:
        out.setdefault(f.check, []).append(f.status)
    return out


async def test_a_well_published_domain_passes_every_check(
    dns: DnsServer, key: rsa.RSAPrivateKey
) -> None:
    publish_good(dns, key)
    report = await check_identity(DnspythonDns(dns.address, 1.0), identity(), public_der(key))
    assert report.failures == []
    assert report.warnings == []
    details = " | ".join(f.detail for f in report.findings)
    assert "authorises the relay smtp.news.example.com (203.0.113.5)" in details
    assert f"s1._domainkey.{DOMAIN} holds the configured key's public key" in details
    assert "p=reject" in details
    assert ("_spf.example.com", "TXT") in dns.queries  # the include was followed


@pytest.mark.parametrize(
    ("breakage", "check", "fragment"),
    [
        ("no_spf", "spf", "no SPF record"),
        ("spf_elsewhere", "spf", "does not authorise the relay"),
        ("two_spf", "spf", "2 SPF records"),
        ("no_dkim", "dkim", "no DKIM key record"),
        ("other_key", "dkim", "holds another key"),
        ("no_dmarc", "dmarc", "no DMARC record"),
        ("misaligned", "alignment", "is not aligned with From"),
    ],
)
async def test_each_misconfiguration_is_a_failure_naming_what_is_wrong(
    dns: DnsServer, key: rsa.RSAPrivateKey, breakage: str, check: str, fragment: str
) -> None:
    publish_good(dns, key)
    ident = identity()
    der = public_der(key)
    if breakage == "no_spf":
        dns.clear(DOMAIN)
    elif breakage == "spf_elsewhere":
        dns.clear("_spf.example.com")
        dns.txt("_spf.example.com", "v=spf1 ip4:198.51.100.0/24 -all")
    elif breakage == "two_spf":
        dns.txt(DOMAIN, "v=spf1 -all")
    elif breakage == "no_dkim":
        dns.clear(f"s1._domainkey.{DOMAIN}")
    elif breakage == "other_key":
        der = public_der(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    elif breakage == "no_dmarc":
        dns.clear(f"_dmarc.{DOMAIN}")
    elif breakage == "misaligned":
        ident = identity(dkim_domain="esp.example.net")
        dns.txt("s1._domainkey.esp.example.net", dkim_record(key))
    report = await check_identity(DnspythonDns(dns.address, 1.0), ident, der)
    failed = [f for f in report.failures if f.check == check]
    assert failed, report.findings
    assert fragment in failed[0].detail
    assert any(fragment in w for w in report.warnings)


async def test_what_cannot_be_determined_is_a_warning_not_a_failure(
    dns: DnsServer, key: rsa.RSAPrivateKey
) -> None:
    publish_good(dns, key)
    dns.clear(f"_dmarc.{DOMAIN}")
    dns.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=none")
    found = await statuses(dns, identity(relay="127.0.0.1"), public_der(key))
    assert found["spf"] == [OK, WARN]  # a loopback relay: its public address is unknown
    assert found["dmarc"] == [WARN]
    dns.silent = True  # the resolver times out: not a misconfigured domain
    report = await check_identity(DnspythonDns(dns.address, 0.2), identity(), public_der(key))
    assert report.failures == []
    assert {f.check for f in report.findings if f.status == WARN} >= {"spf", "dkim", "dmarc"}
    assert all("DNS did not answer" in f.detail for f in report.findings if f.check == "spf")


async def test_reports_are_cached_per_identity(dns: DnsServer, key: rsa.RSAPrivateKey) -> None:
    publish_good(dns, key)
    now = [0.0]
    preflight = Preflight(
        DnspythonDns(dns.address, 1.0), {"news": public_der(key)}, lambda: now[0], cache_s=60
    )
    first = await preflight.report(identity())
    asked = len(dns.queries)
    assert (await preflight.report(identity())) is first
    assert len(dns.queries) == asked
    now[0] = 61.0
    dns.clear(f"_dmarc.{DOMAIN}")
    assert [f.check for f in (await preflight.report(identity())).failures] == ["dmarc"]


# ---- at arming time ------------------------------------------------------------------------------


def key_file(tmp_path: pathlib.Path, key: rsa.RSAPrivateKey) -> str:
    path = tmp_path / "k.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


def publish_reactor_example(dns: DnsServer, key: rsa.RSAPrivateKey) -> None:
    dns.txt("reactor.example", "v=spf1 ip4:127.0.0.1 -all")
    dns.txt("s1._domainkey.reactor.example", dkim_record(key))
    dns.txt("_dmarc.reactor.example", "v=DMARC1; p=quarantine")


async def execution_of(client: Client, mongo: MongoTarget, cid: Any) -> dict[str, Any]:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
    return dict((doc or {}).get("execution") or {})


async def test_arming_writes_warnings_and_required_authentication_refuses_to_start(
    mongo: MongoTarget,
    client: Client,
    sink: SmtpSink,
    dns: DnsServer,
    key: rsa.RSAPrivateKey,
    tmp_path: pathlib.Path,
) -> None:
    publish_reactor_example(dns, key)
    dns.clear("_dmarc.reactor.example")  # DMARC missing: a failure
    ids = await seed_customers(client, mongo, 3)
    coll = client[mongo.campaigns_db].campaigns
    cid = (await coll.insert_one(campaign("strict", 0.5, 60, ids, channels=["email"]))).inserted_id
    cfg = settings(
        mongo,
        sink,
        dkim_selector="s1",
        dkim_private_key_file=key_file(tmp_path, key),
        dns_resolver=dns.address,
        dns_timeout_seconds=1.0,
        require_authenticated_senders=True,
    )
    async with running(cfg):

        async def refused() -> bool:
            error = (await execution_of(client, mongo, cid)).get("lastError") or {}
            return error.get("reason") == "unauthenticated_sender"

        await eventually(refused, 10)
        execution = await execution_of(client, mongo, cid)
        assert "no DMARC record at _dmarc.reactor.example" in execution["lastError"]["detail"]
        assert any("dmarc" in w for w in execution["warnings"])
        assert (await coll.find_one({"_id": cid}) or {}).get("status") == "approved"
    assert sink.messages == []


async def test_a_warned_campaign_still_sends_when_authentication_is_not_required(
    mongo: MongoTarget,
    client: Client,
    sink: SmtpSink,
    dns: DnsServer,
    key: rsa.RSAPrivateKey,
    tmp_path: pathlib.Path,
) -> None:
    publish_reactor_example(dns, key)
    dns.clear("_dmarc.reactor.example")
    dns.txt("_dmarc.reactor.example", "v=DMARC1; p=none")
    ids = await seed_customers(client, mongo, 3)
    coll = client[mongo.campaigns_db].campaigns
    cid = (await coll.insert_one(campaign("lax", 0.5, 60, ids, channels=["email"]))).inserted_id
    cfg = settings(
        mongo,
        sink,
        dkim_selector="s1",
        dkim_private_key_file=key_file(tmp_path, key),
        dns_resolver=dns.address,
        senders_preflight=True,
    )
    async with running(cfg):
        await eventually(lambda: holds(len(sink.messages) == 3), 15)
        execution = await execution_of(client, mongo, cid)
    warnings = execution.get("warnings") or []
    assert any("p=none" in w for w in warnings)
    assert any("private address" in w for w in warnings)  # the sink listens on loopback
    assert not any("dkim:" in w for w in warnings)  # the key in DNS is the configured one
    assert execution.get("lastError") is None


# ---- reactor doctor --senders ------------------------------------------------------------------


async def test_doctor_senders_reports_each_identity_and_the_records_to_publish(
    dns: DnsServer, key: rsa.RSAPrivateKey, tmp_path: pathlib.Path
) -> None:
    from reactor.config import Settings
    from reactor.doctor.senders import diagnose_senders

    publish_reactor_example(dns, key)
    dns.clear("s1._domainkey.reactor.example")
    cfg = Settings(
        mongo_uri="mongodb://unused",
        smtp_host="127.0.0.1",
        smtp_tls="none",
        email_from="campaigns@reactor.example",
        dkim_selector="s1",
        dkim_private_key_file=key_file(tmp_path, key),
        dns_resolver=dns.address,
    )
    report = await diagnose_senders(cfg)
    assert not report.healthy
    by_name = {c.name: c for c in report.checks}
    assert by_name["sender default"].status == OK
    assert "DKIM s=s1 d=reactor.example" in by_name["sender default"].detail
    assert by_name["sender default dkim"].status == FAIL
    assert by_name["sender default dmarc"].status == OK
    (publish,) = report.recommendations
    assert publish.startswith('publish TXT s1._domainkey.reactor.example "v=DKIM1; k=rsa; p=')
    assert base64.b64encode(public_der(key)).decode() in publish
    dns.txt("s1._domainkey.reactor.example", dkim_record(key))
    assert (await diagnose_senders(cfg)).healthy


def test_the_doctor_command_takes_senders_and_says_when_dns_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import socket

    from reactor.cli import main

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet:  # bound, never answers
        quiet.bind(("127.0.0.1", 0))
        for name, value in {
            "MONGO_URI": "mongodb://unused",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_TLS": "none",
            "EMAIL_FROM": "campaigns@reactor.example",
            "DNS_RESOLVER": f"127.0.0.1:{quiet.getsockname()[1]}",
            "DNS_TIMEOUT_SECONDS": "0.2",
        }.items():
            monkeypatch.setenv(name, value)
        code = main(["doctor", "--senders", "--json"])
    payload = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in payload["checks"]}
    assert "DNS did not answer" in checks["sender default spf"]["detail"]
    assert checks["sender default spf"]["status"] == WARN
    assert checks["sender default dkim"]["status"] == WARN  # no key configured
    assert code == 0  # warnings only
