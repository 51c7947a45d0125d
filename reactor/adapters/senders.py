"""The email senders of the sending identities: one SMTP pool per identity's relay, signing with
the identity's DKIM key when it has one (keys are loaded and proven here, at start-up)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from ..config import Settings, SmtpConfig
from ..domain.senders import DEFAULT, Identity, Senders
from ..scheduling.admission import SenderAdmission
from .dkim import DkimSigner, load_signer
from .mongo.warnings import MongoCampaignWarnings
from .preflight import DnspythonDns, Preflight
from .smtp import SmtpEmailSender


def smtp_config(identity: Identity) -> SmtpConfig:
    relay = identity.relay
    return SmtpConfig(
        host=relay.host,
        port=relay.port,
        username=relay.username,
        password=relay.password,
        tls=relay.tls,
        pool_size=relay.pool_size,
        timeout_s=relay.timeout_s,
        sender=identity.from_address,
        ca_file=relay.ca_file,
        ehlo_name=relay.ehlo_name,
    )


def signer(identity: Identity) -> DkimSigner | None:
    """The identity's DKIM signer; raises DkimKeyError for a key that cannot sign."""
    if identity.dkim is None:
        return None
    return load_signer(identity.dkim_domain or identity.domain, identity.dkim)


def identity_senders(senders: Senders) -> dict[str, SmtpEmailSender]:
    """An SMTP sender for each identity but the default (built from SMTP_* as before)."""
    return {
        name: SmtpEmailSender(smtp_config(identity), signer=signer(identity))
        for name, identity in senders.identities.items()
        if name != DEFAULT
    }


def default_signer(senders: Senders) -> DkimSigner | None:
    identity = senders.default
    return signer(identity) if identity is not None else None


def public_keys(senders: Senders) -> dict[str, bytes]:
    """Each signing identity's public key (DER), for the pre-flight's DKIM record check."""
    keys = {}
    for name, identity in senders.identities.items():
        key = signer(identity)
        if key is not None:
            keys[name] = key.public_key_der
    return keys


def sender_admission(
    settings: Settings, db: AsyncDatabase[dict[str, Any]], monotonic: Callable[[], float]
) -> SenderAdmission:
    """The scheduler's check of a campaign's identity: known, and (with SENDERS_PREFLIGHT)
    authenticated per DNS."""
    senders = settings.senders()
    preflight = None
    if settings.senders_preflight or settings.require_authenticated_senders:
        dns_ = DnspythonDns(settings.dns_resolver, settings.dns_timeout_seconds)
        preflight = Preflight(dns_, public_keys(senders), monotonic)
    return SenderAdmission(
        senders,
        preflight=preflight,
        warnings=MongoCampaignWarnings(db, settings.campaigns_collection),
        require_authenticated=settings.require_authenticated_senders,
    )
