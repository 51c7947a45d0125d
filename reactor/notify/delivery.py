"""Delivering notifications: the transports (signed webhook, Slack, generic JSON, admin email)
and the courier that claims due delivery rows and sends them, on tasks of its own.

Delivery is at least once. A 2xx is delivered; a 410 Gone disables the destination; any other
answer, a timeout or a refused connection is retried with exponential back-off until
NOTIFY_RETRY_FOR_SECONDS after the event, then the row is `dead`. Requests never follow
redirects, read at most a few kilobytes of the answer, and end within NOTIFY_TIMEOUT_SECONDS;
at most NOTIFY_CONCURRENCY are in flight per instance, so a slow or dead destination costs a
few idle tasks and never slows sending or scheduling, which do not wait for any of this.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib
import anyio
from standardwebhooks.webhooks import Webhook

from ..metrics import Metrics
from ..ports import Clock
from .config import NotifyConfig, NotifySmtp
from .destinations import (
    Destination,
    DestinationSet,
    PolicyResolver,
    RefusedAddress,
    Resolve,
    system_resolve,
    vet_host,
)
from .events import slack_text
from .outbox import MongoOutbox

log = logging.getLogger(__name__)

USER_AGENT = "campaign-reactor-notify/1"


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt came to."""

    ok: bool
    status: int | None = None
    error: str = ""
    gone: bool = False  # 410: the receiver says the endpoint is gone for good
    refused: bool = False  # the policy refused the destination (not retried soon)


class Transport(Protocol):
    async def send(self, dest: Destination, row: dict[str, Any]) -> Attempt: ...

    async def aclose(self) -> None: ...


def body_of(row: dict[str, Any]) -> bytes:
    return json.dumps(row["payload"], separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: str, msg_id: str, at: dt.datetime, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers for `body`."""
    signature = Webhook(secret).sign(msg_id, at, body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


class HttpTransport:
    """Webhook, Slack and JSON destinations over one aiohttp session whose resolver applies the
    address policy."""

    def __init__(
        self,
        config: NotifyConfig,
        clock: Clock,
        resolve: Resolve | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._resolve = resolve or system_resolve
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=PolicyResolver(
                    self._resolve,
                    allow_private=self._config.allow_private,
                    allow_loopback=self._config.allow_loopback,
                ),
                limit=self._config.concurrency * 2,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._config.timeout_s),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def send(self, dest: Destination, row: dict[str, Any]) -> Attempt:
        assert dest.url is not None
        parts = urlsplit(dest.url)
        try:
            await vet_host(
                parts.hostname or "",
                parts.port or (443 if parts.scheme == "https" else 80),
                self._resolve,
                allow_private=self._config.allow_private,
                allow_loopback=self._config.allow_loopback,
            )
        except RefusedAddress as exc:
            return Attempt(False, error=str(exc), refused=True)
        body, headers = self._request(dest, row)
        try:
            async with self._session_now().post(
                dest.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                # Read a bounded prefix only: a hostile receiver cannot make us buffer much.
                await response.content.read(self._config.response_cap_bytes)
                status = response.status
        except TimeoutError:
            return Attempt(False, error=f"timed out after {self._config.timeout_s:g}s")
        except aiohttp.ClientError as exc:
            # The URL may hold a secret (a Slack hook's path): never in an error text.
            error = f"{type(exc).__name__}: {_first_line(exc)}".replace(dest.url, dest.where)
            return Attempt(False, error=error)
        if 200 <= status < 300:
            return Attempt(True, status)
        if status == 410:
            return Attempt(False, status, error="410 Gone", gone=True)
        return Attempt(False, status, error=f"HTTP {status}")

    def _request(self, dest: Destination, row: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        headers = {"Content-Type": "application/json"}
        if dest.kind == "slack":
            # Slack's three control characters: a campaign named "<!channel>" pings no one.
            text = slack_text(row["payload"])
            text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            return json.dumps({"text": text}, ensure_ascii=False).encode(), headers
        body = body_of(row)
        if dest.secret is not None:
            headers.update(sign(dest.secret, row["webhookId"], self._clock.now(), body))
        else:
            headers["webhook-id"] = row["webhookId"]
        return body, headers

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class SmtpTransport:
    """Admin emails through NOTIFY_SMTP_* (or the campaign relay): not campaign mail, so never
    in the deliveries ledger nor against the channel budgets."""

    def __init__(self, smtp: NotifySmtp | None) -> None:
        self._smtp = smtp

    async def send(self, dest: Destination, row: dict[str, Any]) -> Attempt:
        if self._smtp is None:
            return Attempt(False, error="no SMTP settings for admin email", refused=True)
        payload = row["payload"]
        message = EmailMessage()
        message["From"] = self._smtp.sender
        message["To"] = ", ".join(dest.to)
        message["Subject"] = f"[campaign-reactor] {slack_text(payload).replace('*', '')[:120]}"
        message["Message-ID"] = f"<{row['webhookId']}@campaign-reactor>"
        message.set_content(
            slack_text(payload).replace("*", "")
            + "\n\n"
            + json.dumps(payload, indent=2, ensure_ascii=False)
        )
        s = self._smtp
        try:
            await aiosmtplib.send(
                message,
                hostname=s.host,
                port=s.port,
                username=s.username,
                password=s.password,
                use_tls=s.tls == "tls",
                start_tls=True if s.tls == "starttls" else False,
                timeout=s.timeout_s,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            return Attempt(False, error=f"{type(exc).__name__}: {_first_line(exc)}")
        return Attempt(True)

    async def aclose(self) -> None:
        return None


def backoff_s(attempts: int, config: NotifyConfig) -> float:
    """Delay before the next attempt after `attempts` failed ones: base·2^(n-1), capped."""
    return float(min(config.retry_base_s * 2 ** max(0, attempts - 1), config.retry_max_s))


class Courier:
    """Claims due rows (the oldest of each lane) and delivers them, NOTIFY_CONCURRENCY at a
    time. `wake()` makes it look at once (an event this instance just wrote)."""

    def __init__(
        self,
        *,
        outbox: MongoOutbox,
        destinations: DestinationSet,
        transports: dict[str, Transport],
        clock: Clock,
        metrics: Metrics,
        config: NotifyConfig,
        instance_id: str,
    ) -> None:
        self._outbox = outbox
        self._destinations = destinations
        self._transports = transports
        self._clock = clock
        self._metrics = metrics
        self._config = config
        self._instance = instance_id
        self._wake = anyio.Event()
        self._inflight: set[str] = set()
        self._limiter = anyio.Semaphore(config.concurrency)

    def wake(self) -> None:
        self._wake.set()

    @property
    def inflight(self) -> frozenset[str]:
        """The rows this instance is delivering now."""
        return frozenset(self._inflight)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                # Cleared before looking, so that a wake-up during the round is not lost.
                self._wake = anyio.Event()
                try:
                    await self.round(tg)
                except Exception:  # a failed look must not end delivery
                    log.exception("looking for notifications to deliver failed")
                with anyio.move_on_after(self._config.poll_s):
                    await self._wake.wait()

    async def round(self, tg: anyio.abc.TaskGroup) -> int:
        """Claim what is due, up to the free slots, and start delivering it. Returns the
        number started."""
        free = self._config.concurrency - len(self._inflight)
        if free <= 0 or not self._destinations.current:
            return 0  # full, or nowhere to deliver to (no query every poll then)
        now = self._clock.now()
        skip = [d for d, dest in self._destinations.current.items() if dest.disabled]
        started = 0
        for head in await self._outbox.heads(now, free + len(self._inflight), skip):
            if head["_id"] in self._inflight or started >= free:
                continue
            if head["dest"] not in self._destinations.current:
                continue  # removed, or not loaded yet: left for when it is
            row = await self._outbox.claim(
                head["_id"], owner=self._instance, now=now, lease_s=self._config.lease_s
            )
            if row is None:
                continue  # another instance claimed it
            self._inflight.add(row["_id"])
            tg.start_soon(self._deliver, row)
            started += 1
        return started

    async def _deliver(self, row: dict[str, Any]) -> None:
        try:
            async with self._limiter:
                await self._deliver_one(row)
        except Exception:  # one delivery's failure is logged and counted, never fatal
            log.exception("delivering notification %s failed", row.get("webhookId"))
        finally:
            self._inflight.discard(row["_id"])
            self.wake()

    async def _deliver_one(self, row: dict[str, Any]) -> None:
        dest = self._destinations.current.get(row["dest"])
        if dest is None:
            return
        transport = self._transports["email" if dest.kind == "email" else "http"]
        with anyio.move_on_after(self._config.timeout_s + 5) as scope:
            attempt = await transport.send(dest, row)
        if scope.cancelled_caught:
            attempt = Attempt(False, error="timed out")
        now = self._clock.now()
        counter = self._metrics.notifications.labels(dest.kind, row["type"], "delivered")
        if attempt.ok:
            if await self._outbox.delivered(row, now, attempt.status):
                counter.inc()
            return
        if attempt.gone:
            await self._destinations.disable(
                dest, f"the receiver answered 410 Gone at {now.isoformat()}", now
            )
            await self._outbox.retry(row, now, attempt.error)
            self._metrics.notifications.labels(dest.kind, row["type"], "gone").inc()
            return
        if attempt.refused:
            await self._destinations.refuse(dest, attempt.error, now)
        await self._failed(dest, row, attempt, now)

    async def _failed(
        self, dest: Destination, row: dict[str, Any], attempt: Attempt, now: dt.datetime
    ) -> None:
        at = row["at"] if row["at"].tzinfo else row["at"].replace(tzinfo=dt.UTC)
        outcome = "refused" if attempt.refused else "retried"
        if (now - at).total_seconds() >= self._config.retry_for_s:
            if await self._outbox.dead(row, now, attempt.error):
                self._metrics.notifications.labels(dest.kind, row["type"], "dead").inc()
                log.error(
                    "notification %s (%s) to %s is dead after %d attempts: %s",
                    row["webhookId"],
                    row["type"],
                    dest.where,
                    row["attempts"],
                    attempt.error,
                )
            return
        delay = backoff_s(int(row["attempts"]), self._config)
        await self._outbox.retry(row, now + dt.timedelta(seconds=delay), attempt.error)
        self._metrics.notifications.labels(dest.kind, row["type"], outcome).inc()
        log.warning(
            "notification %s (%s) to %s failed (attempt %d: %s); retrying in %gs",
            row["webhookId"],
            row["type"],
            dest.where,
            row["attempts"],
            attempt.error,
            delay,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
