"""What the public listener needs from storage (adapters in `reactor.adapters.mongo`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol

from ..domain.consent import Suppression


class SuppressionWriter(Protocol):
    async def add(self, entries: Sequence[Suppression], *, now: dt.datetime) -> list[str]: ...
    async def remove(self, ids: Sequence[str], *, reasons: Sequence[str] | None = None) -> int: ...


class RecipientActions(Protocol):
    async def campaign_name(self, campaign_key: str) -> str | None: ...
    async def delivered_to(self, campaign_key: str, channel: str, customer: str) -> str | None: ...
    async def add_unsubscribes(self, campaign_key: str, delta: int) -> bool: ...
