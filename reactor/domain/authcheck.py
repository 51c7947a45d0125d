"""The pre-flight verdicts on a sending identity's authentication, from DNS records already read:
the tags of a DKIM or DMARC record, the DMARC policy, and the alignment (RFC 7489) of the From
domain with the DKIM `d=` and the SPF (MAIL FROM) domain.

A finding is `ok`, `warn` (worth knowing, not disqualifying: DMARC `p=none`, an SPF verdict that
cannot be determined from here) or `fail` (receivers will not authenticate the mail: no SPF
record, no DKIM record or another key in it, no DMARC record, From not aligned). With
REQUIRE_AUTHENTICATED_SENDERS=true a `fail` keeps a campaign from starting.

Relaxed alignment compares organizational domains; without the Public Suffix List the
organizational domain is taken as the last two labels (three under a two-letter country code
whose second-level label is a known registry label such as `co.uk`), which is right for
ordinary domains and documented as a limit.
"""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL = "ok", "warn", "fail"

_SECOND_LEVEL = {"co", "com", "net", "org", "gov", "ac", "edu", "ne", "or", "go"}


@dataclass(frozen=True)
class Finding:
    check: str  # spf | dkim | dmarc | alignment
    status: str  # ok | warn | fail
    detail: str


@dataclass(frozen=True)
class SenderReport:
    identity: str
    domain: str
    findings: tuple[Finding, ...]

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.status == FAIL]

    @property
    def warnings(self) -> list[str]:
        """What goes into a campaign's execution.warnings: every finding that is not ok."""
        return [
            f"sender {self.identity} ({self.domain}) {f.check}: {f.detail}"
            for f in self.findings
            if f.status != OK
        ]


def tags(record: str) -> dict[str, str]:
    """`k=v; k=v` (DKIM, DMARC) into a dict; names lower-cased, white space removed."""
    out: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out[name.strip().lower()] = "".join(value.split())
    return out


def spf_records(txts: list[str]) -> list[str]:
    return [t for t in txts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def dmarc_record(txts: list[str]) -> dict[str, str] | None:
    found = [tags(t) for t in txts if t.replace(" ", "").lower().startswith("v=dmarc1")]
    return found[0] if len(found) == 1 else None


def organizational(domain: str) -> str:
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(from_domain: str, other: str, mode: str) -> bool:
    """RFC 7489 identifier alignment: strict needs the same domain, relaxed the same
    organizational domain."""
    a, b = from_domain.lower().rstrip("."), other.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational(a) == organizational(b)


def dmarc_finding(record: dict[str, str] | None, at: str) -> Finding:
    if record is None:
        return Finding(
            "dmarc", FAIL, f"no DMARC record at {at} (Gmail and Yahoo require one of bulk senders)"
        )
    policy = record.get("p", "")
    if policy not in ("none", "quarantine", "reject"):
        return Finding("dmarc", FAIL, f"the record at {at} has no valid p= (found {policy!r})")
    if policy == "none":
        return Finding("dmarc", WARN, f"p=none at {at}: receivers are asked to take no action")
    return Finding("dmarc", OK, f"p={policy} at {at}")


def alignment_findings(
    from_domain: str, dkim_domain: str | None, spf_domain: str, dmarc: dict[str, str] | None
) -> list[Finding]:
    adkim = (dmarc or {}).get("adkim", "r")
    aspf = (dmarc or {}).get("aspf", "r")
    out: list[Finding] = []
    if dkim_domain is None:
        out.append(Finding("alignment", WARN, "no DKIM key here: DKIM alignment is the relay's"))
    elif aligned(from_domain, dkim_domain, adkim):
        out.append(Finding("alignment", OK, f"DKIM d={dkim_domain} aligned with From"))
    else:
        out.append(
            Finding(
                "alignment",
                FAIL,
                f"DKIM d={dkim_domain} is not aligned with From {from_domain} (adkim={adkim})",
            )
        )
    if aligned(from_domain, spf_domain, aspf):
        out.append(Finding("alignment", OK, f"SPF domain {spf_domain} aligned with From"))
    else:
        out.append(
            Finding(
                "alignment",
                FAIL,
                f"SPF domain {spf_domain} is not aligned with From {from_domain} (aspf={aspf})",
            )
        )
    return out
