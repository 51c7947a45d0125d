"""The reactor's ports: what the scheduling and execution logic needs from the outside world.

Adapters (`reactor.adapters`) implement these against MongoDB, SMTP, Twilio and the system clock;
tests implement them with fakes. Nothing here knows a technology.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Clock(Protocol):
    """Wall-clock time for schedules, and a way to wait that tests can drive."""

    def now(self) -> dt.datetime:
        """The current aware UTC time."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps: for durations, never for instants."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""
        ...


@dataclass(frozen=True)
class Recipient:
    customer_id: str
    name: str | None
    email: str | None
    phone: str | None


class Recipients(Protocol):
    """Where targeted customers' contact details come from (the segmentation database)."""

    async def resolve(self, customer_ids: Sequence[Any]) -> dict[str, Recipient]:
        """Contact details for one batch of ids, keyed by normalised customer id."""
        ...


@dataclass(frozen=True)
class EmailMessage:
    to: str
    subject: str
    text: str | None
    html: str | None
    message_id: str


@dataclass(frozen=True)
class SmsMessage:
    to: str
    body: str


class EmailSender(Protocol):
    async def send(self, message: EmailMessage) -> str:
        """Send one email; returns the provider's id. Raises a DeliveryError subclass."""
        ...

    async def aclose(self) -> None: ...


class SmsSender(Protocol):
    async def send(self, message: SmsMessage) -> str:
        """Send one SMS; returns the provider's id (Twilio's message SID)."""
        ...

    async def aclose(self) -> None: ...
