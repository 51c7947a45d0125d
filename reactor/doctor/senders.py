"""`reactor doctor --senders`: the pre-flight of every sending identity (SPF, DKIM, DMARC,
alignment; adapters/preflight.py) against DNS, with the records to publish where one is
missing or wrong. Needs no MongoDB; exits non-zero when an identity fails."""

from __future__ import annotations

from ..adapters.preflight import DnspythonDns, check_identity
from ..adapters.senders import signer
from ..config import Settings
from .report import FAIL, Report, redacted_configuration


async def diagnose_senders(settings: Settings) -> Report:
    report = Report(configuration=redacted_configuration(settings))
    senders = settings.senders()
    if not senders.identities:
        report.add(
            "senders", FAIL, "no sending identity: set SMTP_HOST and EMAIL_FROM, or SENDERS_FILE"
        )
        return report
    dns_ = DnspythonDns(settings.dns_resolver, settings.dns_timeout_seconds)
    for name, identity in sorted(senders.identities.items()):
        key = signer(identity)
        relay = identity.relay
        report.add(
            f"sender {name}",
            "ok",
            f"From {identity.address} via {relay.host}:{relay.port} ({relay.tls}), "
            + (f"DKIM s={key.selector} d={key.domain}" if key else "no DKIM key"),
        )
        result = await check_identity(dns_, identity, key.public_key_der if key else None)
        for finding in result.findings:
            report.add(f"sender {name} {finding.check}", finding.status, finding.detail)
            if finding.status == FAIL and finding.check == "dkim" and key is not None:
                report.recommendations.append(
                    f'publish TXT {key.selector}._domainkey.{key.domain} "{key.dns_record}"'
                )
            if finding.status == FAIL and finding.check == "dmarc":
                report.recommendations.append(
                    f'publish TXT _dmarc.{identity.domain} "v=DMARC1; p=quarantine; '
                    f'rua=mailto:dmarc@{identity.domain}" (start with p=none to observe)'
                )
    return report
