"""Lanes: what a campaign's sends go through, one lane per sending identity.

A lane is an identity's email sender (its relay's pool, its DKIM key), its own budget (cluster
wide, `sender:NAME` in `rate_budgets`; the default identity keeps `channel:email`), and its own
deliverer, whose email breaker is the lane's: a relay that is down pauses only the campaigns
sending through it. SMS is the same for every lane (one provider, one breaker, one budget).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..domain.models import Channel
from ..domain.senders import DEFAULT, Identity, Senders
from ..limits.ratelimit import RateLimit
from ..ports import EmailSender, SmsSender
from .deliver import Deliverer


@dataclass(frozen=True)
class Lane:
    name: str
    senders: dict[Channel, EmailSender | SmsSender | None]
    limits: dict[Channel, RateLimit]
    deliverer: Deliverer
    message_domain: str  # the Message-ID's domain: the identity's own
    identity: Identity | None = None


class Lanes:
    """The lanes by identity name, and which one a campaign document uses."""

    def __init__(self, senders: Senders, lanes: Mapping[str, Lane], default: Lane) -> None:
        self._senders = senders
        self._lanes = dict(lanes)
        self._default = default

    def for_campaign(self, doc: Mapping[str, Any]) -> Lane:
        """Raises InvalidCampaign(unknown_sender) for a name or domain no identity has."""
        identity = self._senders.choose(doc)
        if identity is None:
            return self._default
        return self._lanes.get(identity.name, self._default)

    def all(self) -> list[Lane]:
        return [self._default, *(lane for n, lane in self._lanes.items() if n != DEFAULT)]
