"""What the public listener needs from storage (adapters in `reactor.adapters.mongo`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Protocol

from ..domain.consent import Lift, Suppression


class SuppressionWriter(Protocol):
    async def add(self, entries: Sequence[Suppression], *, now: dt.datetime) -> list[str]: ...
    async def lift(self, ids: Sequence[str], rule: Lift, *, now: dt.datetime) -> int: ...
    async def claims(self, ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]: ...


class RecipientActions(Protocol):
    async def campaign_name(self, campaign_key: str) -> str | None: ...
    async def delivered_to(self, campaign_key: str, channel: str, customer: str) -> str | None: ...
    async def add_unsubscribes(self, campaign_key: str, delta: int) -> bool: ...
