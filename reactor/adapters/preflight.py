"""The pre-flight check of a sending identity against DNS (dnspython, a configurable resolver):
the SPF record of the MAIL FROM domain and whether it authorises the relay's addresses, the DKIM
record at `selector._domainkey.domain` and whether it holds the configured key's public key, the
DMARC policy, and the alignment of From with `d=` and the SPF domain (verdicts:
domain/authcheck.py).

SPF is evaluated for the relay's addresses with ip4, ip6, a, mx, include and redirect, at most
ten lookups (RFC 7208's limit). A relay on a loopback or private address tells nothing about
the public address the mail leaves from, and `exists`/`ptr` cannot be evaluated here: those
verdicts are warnings, never failures. A DNS timeout is a warning too: an outage of the resolver
must not read as a misconfigured domain.

`Preflight` caches each identity's report for CACHE_S, so arming a campaign does not query DNS
every sweep.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver
from cryptography.hazmat.primitives import serialization

from ..domain.authcheck import (
    FAIL,
    OK,
    WARN,
    Finding,
    SenderReport,
    alignment_findings,
    dmarc_finding,
    dmarc_record,
    organizational,
    spf_records,
    tags,
)
from ..domain.senders import Identity

log = logging.getLogger(__name__)

CACHE_S = 600.0
MAX_SPF_LOOKUPS = 10
_PRIVATE = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]


class DnsUnavailable(Exception):
    """Raised when the resolver did not answer (timeout, SERVFAIL)."""


class Dns(Protocol):
    async def txt(self, name: str) -> list[str]: ...
    async def addresses(self, name: str) -> list[str]: ...
    async def mx(self, name: str) -> list[str]: ...


class DnspythonDns:
    """Dns over dnspython's async resolver: the system's, or the one at `server` (host[:port])."""

    def __init__(self, server: str | None = None, timeout_s: float = 3.0) -> None:
        if server:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
            self._resolver.nameservers = [host or server]
            if port:
                self._resolver.port = int(port)
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout_s

    async def _rdata(self, name: str, rdtype: str) -> list[Any]:
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsUnavailable(f"{rdtype} {name}: {type(exc).__name__}") from None
        return list(answer)

    async def _query(self, name: str, rdtype: str) -> list[str]:
        return [r.to_text() for r in await self._rdata(name, rdtype)]

    async def txt(self, name: str) -> list[str]:
        # A TXT record may be split into strings of 255 bytes: joined, they are the record.
        return [
            b"".join(r.strings).decode("utf-8", "replace") for r in await self._rdata(name, "TXT")
        ]

    async def addresses(self, name: str) -> list[str]:
        return [*await self._query(name, "A"), *await self._query(name, "AAAA")]

    async def mx(self, name: str) -> list[str]:
        return [r.split()[-1].rstrip(".") for r in await self._query(name, "MX")]


# ---- SPF ----------------------------------------------------------------------------------------


@dataclass
class _SpfWalk:
    dns: Dns
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    lookups: int = 0
    undeterminable: list[str] = field(default_factory=list)

    def _count(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_SPF_LOOKUPS:
            raise _PermError(f"more than {MAX_SPF_LOOKUPS} DNS lookups (RFC 7208 permerror)")

    async def allows(self, domain: str) -> bool:
        """True when `domain`'s SPF passes every relay address."""
        records = spf_records(await self.dns.txt(domain))
        if len(records) != 1:
            raise _PermError(f"{domain} has {len(records)} SPF records")
        redirect = None
        for term in records[0].split()[1:]:
            qualifier = term[0] if term[0] in "+-~?" else "+"
            mech = term[1:] if term[0] in "+-~?" else term
            if mech.lower().startswith("redirect="):
                redirect = mech.split("=", 1)[1]
                continue
            if "=" in mech:
                continue  # a modifier (exp=...)
            if await self._matches(mech, domain):
                return qualifier == "+"
        if redirect is not None:
            self._count()
            return await self.allows(redirect)
        return False

    async def _matches(self, mech: str, domain: str) -> bool:
        name, _, arg = mech.partition(":")
        name = name.lower().split("/")[0]
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            net = ipaddress.ip_network(arg, strict=False)
            return all(ip in net for ip in self.ips if ip.version == net.version) and any(
                ip.version == net.version for ip in self.ips
            )
        if name == "include":
            self._count()
            return await self.allows(arg)
        if name in ("a", "mx"):
            self._count()
            target = (arg or domain).split("/")[0]
            hosts = [target] if name == "a" else await self.dns.mx(target)
            found = {ipaddress.ip_address(a) for h in hosts for a in await self.dns.addresses(h)}
            return bool(self.ips) and all(ip in found for ip in self.ips)
        self.undeterminable.append(mech)  # exists, ptr: not evaluated here
        return False


class _PermError(Exception):
    pass


async def _relay_ips(dns_: Dns, host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return [ipaddress.ip_address(a) for a in await dns_.addresses(host)]


async def spf_findings(dns_: Dns, domain: str, relay_host: str) -> list[Finding]:
    records = spf_records(await dns_.txt(domain))
    if not records:
        return [Finding("spf", FAIL, f"no SPF record (v=spf1) at {domain}")]
    if len(records) > 1:
        return [Finding("spf", FAIL, f"{len(records)} SPF records at {domain} (permerror)")]
    found = Finding("spf", OK, f"record at {domain}: {records[0][:120]}")
    ips = await _relay_ips(dns_, relay_host)
    if not ips:
        return [found, Finding("spf", WARN, f"the relay {relay_host} has no address to check")]
    if any(ip.is_loopback or any(ip in n for n in _PRIVATE) for ip in ips):
        detail = f"the relay {relay_host} is on a private address; its public one is unknown here"
        return [found, Finding("spf", WARN, detail)]
    walk = _SpfWalk(dns_, ips)
    try:
        allowed = await walk.allows(domain)
    except _PermError as exc:
        return [found, Finding("spf", FAIL, str(exc))]
    shown = ", ".join(str(ip) for ip in ips)
    if allowed:
        return [found, Finding("spf", OK, f"authorises the relay {relay_host} ({shown})")]
    if walk.undeterminable:
        detail = f"cannot tell whether it authorises {shown}: {' '.join(walk.undeterminable)}"
        return [found, Finding("spf", WARN, detail)]
    return [found, Finding("spf", FAIL, f"does not authorise the relay {relay_host} ({shown})")]


# ---- DKIM ---------------------------------------------------------------------------------------


async def dkim_finding(dns_: Dns, domain: str, selector: str, public_der: bytes | None) -> Finding:
    name = f"{selector}._domainkey.{domain}"
    records = [tags(t) for t in await dns_.txt(name)]
    records = [r for r in records if "p" in r]
    if not records:
        return Finding("dkim", FAIL, f"no DKIM key record at {name}")
    if public_der is None:
        return Finding("dkim", OK, f"a key is published at {name}")
    for record in records:
        try:
            published = base64.b64decode(record["p"], validate=True)
            if not published:
                return Finding("dkim", FAIL, f"the key at {name} is revoked (empty p=)")
            key = serialization.load_der_public_key(published)
            ours = serialization.load_der_public_key(public_der)
        except (binascii.Error, ValueError):
            continue
        if key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == ours.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            return Finding("dkim", OK, f"{name} holds the configured key's public key")
    return Finding("dkim", FAIL, f"{name} holds another key than the configured private key's")


# ---- the whole check ----------------------------------------------------------------------------


async def check_identity(dns_: Dns, identity: Identity, public_der: bytes | None) -> SenderReport:
    """Every finding about one identity; DNS outages become warnings."""
    findings: list[Finding] = []
    spf_domain = identity.address.rpartition("@")[2].lower()
    dkim_domain = identity.dkim_domain

    async def guarded(step: Callable[[], Awaitable[list[Finding]]], check: str) -> None:
        try:
            findings.extend(await step())
        except DnsUnavailable as exc:
            findings.append(Finding(check, WARN, f"DNS did not answer ({exc})"))

    async def spf() -> list[Finding]:
        return await spf_findings(dns_, spf_domain, identity.relay.host)

    async def dkim_() -> list[Finding]:
        if identity.dkim is None or dkim_domain is None:
            return [Finding("dkim", WARN, "no DKIM key configured: only the relay can sign")]
        return [await dkim_finding(dns_, dkim_domain, identity.dkim.selector, public_der)]

    dmarc: dict[str, str] | None = None

    async def dmarc_() -> list[Finding]:
        nonlocal dmarc
        at = f"_dmarc.{identity.domain}"
        dmarc = dmarc_record(await dns_.txt(at))
        org = organizational(identity.domain)
        if dmarc is None and org != identity.domain:
            at = f"_dmarc.{org}"
            dmarc = dmarc_record(await dns_.txt(at))
        return [dmarc_finding(dmarc, at)]

    await guarded(spf, "spf")
    await guarded(dkim_, "dkim")
    await guarded(dmarc_, "dmarc")
    findings.extend(alignment_findings(identity.domain, dkim_domain, spf_domain, dmarc))
    return SenderReport(identity.name, identity.domain, tuple(findings))


class Preflight:
    """Each identity's report, cached for CACHE_S (by the monotonic clock handed in)."""

    def __init__(
        self,
        dns_: Dns,
        public_keys: dict[str, bytes],
        monotonic: Callable[[], float],
        cache_s: float = CACHE_S,
    ) -> None:
        self._dns = dns_
        self._public_keys = public_keys
        self._monotonic = monotonic
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, SenderReport]] = {}

    async def report(self, identity: Identity) -> SenderReport:
        now_m = self._monotonic()
        cached = self._cache.get(identity.name)
        if cached is not None and now_m - cached[0] < self._cache_s:
            return cached[1]
        report = await check_identity(self._dns, identity, self._public_keys.get(identity.name))
        self._cache[identity.name] = (now_m, report)
        if report.failures:
            log.warning(
                "sending identity %s (%s) fails pre-flight: %s",
                identity.name,
                identity.domain,
                "; ".join(f.detail for f in report.failures),
            )
        return report
