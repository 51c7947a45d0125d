"""Delivering one message: the provider call, its retries and what the outcome is.

Transient errors are retried with backoff (and Retry-After pauses the whole channel); a
provider's "try later" is deferred on the TEMPFAIL_RETRY_SECONDS schedule; permanent errors are
`failed` at once; an outcome that cannot be known is `uncertain` and never retried. A retry the
run stops before is `abandoned`: never sent after the stop. Channel-wide failures feed the
channel's breaker (breaker.py); while it is open, sends are handed back unsent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from ..domain.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
    UndeliverableError,
)
from ..domain.models import Channel
from ..domain.retry import RetryPolicy
from ..limits.ratelimit import RateLimit
from ..metrics import Metrics
from ..ports import Clock, EmailSender, SmsSender
from .breaker import FIRST_PAUSE_S, ChannelBreaker
from .ledger import ABANDONED, DEFERRED, Item, Outcome
from .state import Run, unless_stopped, until_lease_holds

log = logging.getLogger(__name__)

# Why a `failed` row failed: refused for good, or temporary errors until the attempts ran out.
PERMANENT = "permanent"
TEMPORARY = "temporary"
CHANNEL_PAUSED = "channel_paused"  # a deferral by the channel's breaker


class Deliverer:
    def __init__(
        self,
        senders: dict[Channel, EmailSender | SmsSender | None],
        limits: dict[Channel, RateLimit],
        policy: RetryPolicy,
        clock: Clock,
        metrics: Metrics,
        tempfail_retry_s: tuple[float, ...] = (),
        channel_pause_max_s: float = 300.0,
        *,
        identity: str | None = None,
        shared_breakers: Mapping[Channel, ChannelBreaker] | None = None,
    ) -> None:
        self._senders = senders
        self._limits = limits
        self._policy = policy
        self._tempfail_retry_s = tempfail_retry_s
        # One deliverer per sending identity: its email breaker is its own (a relay down pauses
        # only the campaigns that use it); the breakers in `shared_breakers` (SMS) are shared.
        self.breakers = {
            ch: ChannelBreaker(
                f"{ch} ({identity})" if identity and ch is Channel.EMAIL else str(ch),
                clock.monotonic,
                first_pause_s=min(FIRST_PAUSE_S, channel_pause_max_s),
                max_pause_s=channel_pause_max_s,
            )
            for ch in Channel
        }
        self.breakers.update(shared_breakers or {})
        self._clock = clock
        self._metrics = metrics
        # Told when a channel's breaker opens or closes: (channel, paused, kind, error).
        self.on_channel: list[Callable[[str, bool, str, str], None]] = []

    async def deliver(self, run: Run, item: Item) -> Outcome:
        """Send one message, retrying transient errors. The first attempt uses the rate-limit
        token taken when its row was marked pending; every retry waits for a token of its own."""
        sender = self._senders[item.channel]
        assert sender is not None
        limiter = self._limits[item.channel]
        channel = str(item.channel)
        duration = self._metrics.send_duration.labels(channel)
        attempt = 0
        if item.attempted_at is None:
            item.attempted_at = self._clock.now()
        while True:
            attempt += 1
            # The self-fence: past the instant the lease may have lapsed, nothing goes to a
            # provider until the lease is renewed (or the run stops: then it is abandoned).
            if not await until_lease_holds(run, self._clock):
                return Outcome(item, ABANDONED, error="stopped while fenced", attempts=attempt - 1)
            breaker = self.breakers[item.channel]
            if attempt > 1 and breaker.open:
                # A retry that comes due while the channel is paused: given back, not tried
                # (first attempts are held back by the window; the probe is one of those).
                return Outcome(
                    item,
                    DEFERRED,
                    error=f"{item.channel} paused: {breaker.reason}",
                    reason=CHANNEL_PAUSED,
                    attempts=attempt - 1,
                    retry_at_m=breaker.reopen_at_m,
                )
            started = time.perf_counter()
            try:
                provider_id = await sender.send(item.message)  # type: ignore[arg-type]
            except DeliveryError as exc:
                duration.observe(time.perf_counter() - started)
                paused = self._channel_failure(item, exc, attempt)
                if paused is not None:
                    return paused
                outcome = await self._failure(run, item, exc, attempt, limiter)
                if outcome is not None:
                    return outcome
                continue
            except Exception as exc:  # a bug in one send must not stop the campaign
                log.exception(
                    "unexpected error sending %s to customer %s",
                    channel,
                    item.customer,
                    extra={"campaign_id": run.key, "channel": channel},
                )
                return Outcome(
                    item, "uncertain", error=f"{type(exc).__name__}: {exc}", attempts=attempt
                )
            duration.observe(time.perf_counter() - started)
            if self.breakers[item.channel].succeeded():
                self._metrics.channel_paused.labels(channel).set(0)
                for hook in self.on_channel:
                    hook(channel, False, "", "")
            return Outcome(item, "sent", provider_id=provider_id, attempts=attempt)

    def _channel_failure(self, item: Item, exc: DeliveryError, attempt: int) -> Outcome | None:
        """Count a channel-wide failure; once the channel is paused, give the send back unsent
        (a failure whose outcome is unknown is still recorded uncertain: it may have gone out)."""
        if exc.channel_wide is None:
            return None
        breaker = self.breakers[item.channel]
        if breaker.failed(exc.channel_wide, str(exc)):
            self._metrics.channel_pauses.labels(str(item.channel), exc.channel_wide).inc()
            self._metrics.channel_paused.labels(str(item.channel)).set(1)
            for hook in self.on_channel:
                hook(str(item.channel), True, exc.channel_wide, str(exc))
        if not breaker.open or isinstance(exc, UncertainDeliveryError):
            return None
        return Outcome(
            item,
            DEFERRED,
            error=str(exc),
            reason=CHANNEL_PAUSED,
            attempts=attempt,
            retry_at_m=breaker.reopen_at_m,
        )

    async def _failure(
        self, run: Run, item: Item, exc: DeliveryError, attempt: int, limiter: RateLimit
    ) -> Outcome | None:
        """What a failed attempt means: an outcome, or None to try again (after a back-off)."""
        if isinstance(exc, UndeliverableError):
            return Outcome(item, "skipped", error=str(exc), reason=exc.reason, attempts=attempt)
        if isinstance(exc, PermanentDeliveryError):
            return Outcome(
                item,
                "failed",
                error=str(exc),
                reason=exc.suppress or PERMANENT,
                attempts=attempt,
                suppress=exc.suppress,
            )
        if not isinstance(exc, TransientDeliveryError):  # uncertain: never retried blindly
            return Outcome(item, "uncertain", error=str(exc), attempts=attempt)
        channel = str(item.channel)
        if exc.deferrable:
            # "Try later" from the provider itself: a quick retry would meet it again.
            if item.deferrals < len(self._tempfail_retry_s):
                self._metrics.sends_deferred.labels(channel).inc()
                return Outcome(item, DEFERRED, error=str(exc), attempts=attempt)
            return Outcome(
                item,
                "failed",
                error=f"temporary, still refused after {item.deferrals} deferrals: {exc}",
                reason=TEMPORARY,
                attempts=attempt,
            )
        if exc.retry_after_s:
            limiter.pause(exc.retry_after_s)
        if not self._policy.should_retry(attempt):
            return Outcome(
                item,
                "failed",
                error=f"transient, gave up: {exc}",
                reason=TEMPORARY,
                attempts=attempt,
            )
        self._metrics.send_retries.labels(channel).inc()
        delay = self._policy.delay_s(attempt, exc.retry_after_s)
        # Not delivered: if the run stops during the backoff or while the channel is paused by
        # a Retry-After, leave it for whoever resumes instead of sending late.
        if not (
            await unless_stopped(run, self._clock.sleep, delay)
            and await unless_stopped(run, limiter.acquire)
        ):
            return Outcome(item, ABANDONED, error=str(exc), attempts=attempt)
        return None
