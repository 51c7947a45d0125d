"""The reactor's exception tree.

    ReactorError
    ├── InvalidCampaign            a campaign document the reactor cannot schedule or send
    ├── DeliveryError              one send did not go through
    │   ├── TransientDeliveryError     worth retrying (4xx SMTP, 5xx/429 HTTP, connection refused)
    │   ├── PermanentDeliveryError     never worth retrying (5xx SMTP, invalid number)
    │   │   └── UndeliverableError         this address cannot be sent to on this channel
    │   └── UncertainDeliveryError     may or may not have been delivered; never retried blindly
    └── LeaseLost                  another replica owns the execution now

Adapters map their technology's errors onto these (`raise ... from exc`); the executor and the
retry policy only ever see these.
"""

from __future__ import annotations


class ReactorError(Exception):
    """Raised for any failure the reactor itself defines."""


class InvalidCampaign(ReactorError):
    """Raised when a campaign document is malformed; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeliveryError(ReactorError):
    """Raised when one message could not be handed to its provider. `channel_wide` names a
    failure that would meet every recipient alike (connect, tls, auth, provider_5xx): enough of
    them in a row pause the channel instead of failing the audience one by one."""

    def __init__(self, message: str, *, channel_wide: str | None = None) -> None:
        super().__init__(message)
        self.channel_wide = channel_wide


class TransientDeliveryError(DeliveryError):
    """Raised when a send failed in a way that a later attempt may fix. `deferrable`: the
    provider itself said "try later" (an SMTP 4xx, greylisting among them), which a quick
    retry would only meet again: the send is deferred on the TEMPFAIL_RETRY_SECONDS schedule."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        deferrable: bool = False,
        channel_wide: str | None = None,
    ) -> None:
        super().__init__(message, channel_wide=channel_wide)
        self.retry_after_s = retry_after_s
        self.deferrable = deferrable


class PermanentDeliveryError(DeliveryError):
    """Raised when a send was refused for good (bad address, rejected content). `suppress`
    names the consent reason when the refusal says this address must never be tried again:
    `hard_bounce` (an SMTP 5.1.x: no such mailbox) or `sms_stop` (Twilio 21610: the number
    replied STOP)."""

    def __init__(
        self, message: str, *, channel_wide: str | None = None, suppress: str | None = None
    ) -> None:
        super().__init__(message, channel_wide=channel_wide)
        self.suppress = suppress


class UndeliverableError(PermanentDeliveryError):
    """Raised when a message cannot go to this address on this channel at all (an address that
    needs SMTPUTF8 on a server without it): the delivery is `skipped` with `reason`."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UncertainDeliveryError(DeliveryError):
    """Raised when a send may have reached the provider but its outcome is unknown."""


class LeaseLost(ReactorError):
    """Raised when an execution's epoch is no longer the campaign's: another replica took over."""


# Change-stream errors it cannot resume from: history lost, invalid token, fatal, capped
# position deleted. The stream must restart from "now" (after a sweep, for campaigns).
HISTORY_LOST_CODES = frozenset({286, 260, 280, 136})
