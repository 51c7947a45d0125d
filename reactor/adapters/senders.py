"""The email senders of the sending identities: one SMTP pool per identity's relay, signing with
the identity's DKIM key when it has one (keys are loaded and proven here, at start-up)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from ..config import Settings, SmtpConfig
from ..domain.models import Channel
from ..domain.senders import DEFAULT, Identity, Senders
from ..domain.zones import LocalTime
from ..execution.localtime import plan_with_zones
from ..ports import CampaignStore, Recipients
from ..scheduling.admission import Admissions, LocalTimeAdmission, SenderAdmission
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


def signer(identity: Identity, *, process: bool = False) -> DkimSigner | None:
    """The identity's DKIM signer (signing in a helper process of its own with `process`);
    raises DkimKeyError for a key that cannot sign."""
    if identity.dkim is None:
        return None
    return load_signer(identity.dkim_domain or identity.domain, identity.dkim, process=process)


def identity_senders(senders: Senders, *, process: bool = False) -> dict[str, SmtpEmailSender]:
    """An SMTP sender for each identity but the default (built from SMTP_* as before)."""
    return {
        name: SmtpEmailSender(smtp_config(identity), signer=signer(identity, process=process))
        for name, identity in senders.identities.items()
        if name != DEFAULT
    }


def default_signer(senders: Senders, *, process: bool = False) -> DkimSigner | None:
    identity = senders.default
    return signer(identity, process=process) if identity is not None else None


def public_keys(senders: Senders) -> dict[str, bytes]:
    """Each signing identity's public key (DER), for the pre-flight's DKIM record check."""
    keys = {}
    for name, identity in senders.identities.items():
        key = signer(identity)
        if key is not None:
            keys[name] = key.public_key_der
    return keys


def campaign_admission(
    settings: Settings,
    db: AsyncDatabase[dict[str, Any]],
    monotonic: Callable[[], float],
    store: CampaignStore,
    recipients: Recipients,
) -> Admissions:
    """The scheduler's checks before arming: the campaign's identity (known; authenticated per
    DNS with SENDERS_PREFLIGHT or REQUIRE_AUTHENTICATED_SENDERS) and its localTime."""
    senders = settings.senders()
    preflight = None
    if settings.senders_preflight or settings.require_authenticated_senders:
        dns_ = DnspythonDns(settings.dns_resolver, settings.dns_timeout_seconds)
        preflight = Preflight(dns_, public_keys(senders), monotonic)

    def rate(doc: dict[str, Any], channel: Channel) -> float:
        if channel is Channel.SMS:
            return settings.sms_rate_per_second
        identity = senders.choose(doc)
        rate = identity.rate_per_s if identity is not None else None
        return rate or settings.email_rate_per_second

    async def targets(campaign_id: Any) -> list[Any]:
        doc = await store.get(campaign_id, with_targets=True)
        return list((doc or {}).get("targetedCustomerIds") or [])

    async def batches(
        ids: Sequence[str], local: LocalTime, start_at: dt.datetime
    ) -> dict[dt.datetime, dict[str, int]]:
        return await plan_with_zones(
            recipients, ids, local, start_at, settings.recipient_batch_size
        )

    return Admissions(
        [
            SenderAdmission(
                senders,
                preflight=preflight,
                require_authenticated=settings.require_authenticated_senders,
            ),
            LocalTimeAdmission(targets=targets, planner=batches, rates=rate),
        ],
        MongoCampaignWarnings(db, settings.campaigns_collection),
    )
