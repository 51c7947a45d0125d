"""Delivering one message: the provider call, its retries and what the outcome is.

Transient errors are retried with backoff (and Retry-After pauses the whole channel); permanent
ones are `failed` at once; an outcome that cannot be known is `uncertain` and never retried. A
retry the run stops before is `abandoned`: never sent after the stop.
"""

from __future__ import annotations

import logging
import time

from ..domain.errors import (
    PermanentDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
    UndeliverableError,
)
from ..domain.models import Channel
from ..domain.retry import RetryPolicy
from ..metrics import Metrics
from ..ports import Clock, EmailSender, SmsSender
from ..ratelimit import TokenBucket
from .ledger import ABANDONED, DEFERRED, Item, Outcome
from .state import Run, unless_stopped, until_lease_holds

log = logging.getLogger(__name__)

# Why a `failed` row failed: refused for good, or temporary errors until the attempts ran out.
PERMANENT = "permanent"
TEMPORARY = "temporary"


class Deliverer:
    def __init__(
        self,
        senders: dict[Channel, EmailSender | SmsSender | None],
        limits: dict[Channel, TokenBucket],
        policy: RetryPolicy,
        clock: Clock,
        metrics: Metrics,
        tempfail_retry_s: tuple[float, ...] = (),
    ) -> None:
        self._senders = senders
        self._limits = limits
        self._policy = policy
        self._tempfail_retry_s = tempfail_retry_s
        self._clock = clock
        self._metrics = metrics

    async def deliver(self, run: Run, item: Item) -> Outcome:
        """Send one message, retrying transient errors. The first attempt uses the rate-limit
        token taken when its row was marked pending; every retry waits for a token of its own."""
        sender = self._senders[item.channel]
        assert sender is not None
        limiter = self._limits[item.channel]
        channel = str(item.channel)
        duration = self._metrics.send_duration.labels(channel)
        attempt = 0
        while True:
            attempt += 1
            # The self-fence: past the instant the lease may have lapsed, nothing goes to a
            # provider until the lease is renewed (or the run stops: then it is abandoned).
            if not await until_lease_holds(run, self._clock):
                return Outcome(item, ABANDONED, error="stopped while fenced", attempts=attempt - 1)
            started = time.perf_counter()
            try:
                provider_id = await sender.send(item.message)  # type: ignore[arg-type]
            except TransientDeliveryError as exc:
                duration.observe(time.perf_counter() - started)
                if exc.deferrable:
                    # "Try later" from the provider itself: a quick retry meets it again.
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
                # Not delivered: if the run stops during the backoff or while the channel is
                # paused by a Retry-After, leave it for whoever resumes instead of sending late.
                if not (
                    await unless_stopped(run, self._clock.sleep, delay)
                    and await unless_stopped(run, limiter.acquire)
                ):
                    return Outcome(item, ABANDONED, error=str(exc), attempts=attempt)
                continue
            except UndeliverableError as exc:
                duration.observe(time.perf_counter() - started)
                return Outcome(item, "skipped", error=str(exc), reason=exc.reason, attempts=attempt)
            except PermanentDeliveryError as exc:
                duration.observe(time.perf_counter() - started)
                return Outcome(item, "failed", error=str(exc), reason=PERMANENT, attempts=attempt)
            except UncertainDeliveryError as exc:
                duration.observe(time.perf_counter() - started)
                return Outcome(item, "uncertain", error=str(exc), attempts=attempt)
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
            return Outcome(item, "sent", provider_id=provider_id, attempts=attempt)
