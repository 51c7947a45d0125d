"""A fake of Twilio's Messages API (v2010) on aiohttp, shaped like the real one closely enough for
twilio's own client: form-encoded POSTs, basic auth, JSON resources and error bodies. Fault
injection: answer the next N requests with a status (429 with Retry-After, 500...), fail a share
at random, or add latency."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import random
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

from ..http import start_site
from .served import Served

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


@dataclass
class CapturedSms:
    sid: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    status_callback: str | None = None


@dataclass
class _Faults:
    next_statuses: list[tuple[int, float | None]] = field(default_factory=list)
    failure_rate: float = 0.0
    failure_status: int = 503
    delay_s: float = 0.0
    # Take the message (it will be delivered), then answer with this status: a gateway failing
    # after Twilio accepted, which the client cannot tell from a refusal.
    accept_then_fail: list[int] = field(default_factory=list)
    # Numbers that replied STOP: Twilio refuses to message them (error 21610).
    stopped: set[str] = field(default_factory=set)
    # Numbers whose carrier will not deliver: the status callback says undelivered, 30003.
    undeliverable: set[str] = field(default_factory=set)


class TwilioFake(Served):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        account_sid: str | None = None,
        auth_token: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.auth_token = auth_token or secrets.token_hex(16)
        self.messages: list[CapturedSms] = []
        self.requests = 0
        self.faults = _Faults()
        self.rng = random.Random(seed)
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.callbacks_sent = 0
        self.callback_failures = 0
        # False: record each message's StatusCallback but never call it (a bench posts the
        # receipts itself, each one a change to a row that has none yet).
        self.send_callbacks = True

    def signature(self, url: str, params: dict[str, str]) -> str:
        """X-Twilio-Signature as Twilio computes it, with this account's auth token."""
        return str(RequestValidator(self.auth_token).compute_signature(url, params))

    async def post_signed(self, url: str, params: dict[str, str]) -> int:
        """POST a form the way Twilio calls a webhook (signed); returns the status code."""
        headers = {"X-Twilio-Signature": self.signature(url, params)}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=params, headers=headers) as r,
        ):
            return r.status

    async def _callbacks(
        self, url: str, sid: str, to: str, from_: str, steps: list[tuple[str, str]]
    ) -> None:
        """Twilio's status callbacks for one message: `sent`, then its final status."""
        for status, error in steps:
            await asyncio.sleep(0.02)
            params = {
                "AccountSid": self.account_sid,
                "MessageSid": sid,
                "SmsSid": sid,
                "MessageStatus": status,
                "SmsStatus": status,
                "To": to,
                "From": from_,
                "ApiVersion": "2010-04-01",
            }
            if error:
                params["ErrorCode"] = error
            try:
                await self.post_signed(url, params)
                self.callbacks_sent += 1
            except (aiohttp.ClientError, OSError):
                self.callback_failures += 1

    async def send_inbound(self, url: str, from_: str, body: str, to: str = "+15005550006") -> int:
        """A reply from a phone, as Twilio posts an incoming message to the number's webhook."""
        params = {
            "AccountSid": self.account_sid,
            "MessageSid": "SM" + secrets.token_hex(16),
            "From": from_,
            "To": to,
            "Body": body,
            "NumMedia": "0",
            "ApiVersion": "2010-04-01",
        }
        return await self.post_signed(url, params)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def accept_then_fail_next(self, n: int, status: int = 502) -> None:
        """The next `n` valid messages are accepted and delivered, but answered with `status`."""
        self.faults.accept_then_fail.extend([status] * n)

    def fail_next(self, n: int, status: int, retry_after_s: float | None = None) -> None:
        self.faults.next_statuses.extend([(status, retry_after_s)] * n)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create_message)
        app.router.add_get("/2010-04-01/Accounts/{sid}/Messages.json", self._list_messages)
        app.router.add_get("/2010-04-01/Accounts/{sid}.json", self._fetch_account)
        self._runner, self.port = await start_site(app, self.host, self.port)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _error(
        self, status: int, code: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        return web.json_response(
            {
                "code": code,
                "message": message,
                "status": status,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
            },
            status=status,
            headers=headers,
        )

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            login, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return login == self.account_sid and password == self.auth_token

    async def _fetch_account(self, request: web.Request) -> web.Response:
        if not self._authorised(request) or request.match_info["sid"] != self.account_sid:
            return self._error(401, 20003, "Authenticate")
        return web.json_response(
            {
                "sid": self.account_sid,
                "status": "active",
                "friendly_name": "reactor fake",
                "type": "Full",
            }
        )

    async def _create_message(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.faults.delay_s:
            await asyncio.sleep(self.faults.delay_s)
        if not self._authorised(request) or request.match_info["sid"] != self.account_sid:
            return self._error(401, 20003, "Authenticate")
        if self.faults.next_statuses:
            status, retry_after = self.faults.next_statuses.pop(0)
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
            return self._error(
                status,
                20429 if status == 429 else 20500,
                "Too Many Requests" if status == 429 else "Injected failure",
                headers,
            )
        if self.faults.failure_rate and self.rng.random() < self.faults.failure_rate:
            return self._error(self.faults.failure_status, 20500, "Injected failure")
        form = await request.post()
        to = str(form.get("To", ""))
        body = str(form.get("Body", ""))
        from_ = form.get("From")
        service = form.get("MessagingServiceSid")
        if not to:
            return self._error(400, 21604, "A 'To' phone number is required.")
        if not E164.match(to):
            return self._error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not body:
            return self._error(400, 21602, "Message body is required.")
        if not from_ and not service:
            return self._error(400, 21603, "A 'From' phone number is required.")
        if to in self.faults.stopped:
            return self._error(400, 21610, "Attempt to send to unsubscribed recipient")
        sid = "SM" + secrets.token_hex(16)
        callback = str(form["StatusCallback"]) if form.get("StatusCallback") else None
        self.messages.append(
            CapturedSms(
                sid,
                to,
                str(from_) if from_ else None,
                str(service) if service else None,
                body,
                status_callback=callback,
            )
        )
        if callback and self.send_callbacks:
            final = (
                ("undelivered", "30003") if to in self.faults.undeliverable else ("delivered", "")
            )
            task = asyncio.get_running_loop().create_task(
                self._callbacks(callback, sid, to, str(from_ or ""), [("sent", ""), final])
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self.faults.accept_then_fail:
            return self._error(self.faults.accept_then_fail.pop(0), 20500, "Bad Gateway")
        return web.json_response(self._resource(sid, to, from_, service, body), status=201)

    async def _list_messages(self, request: web.Request) -> web.Response:
        """Twilio's Messages list, filtered by To, From and DateSent> / DateSent< (one page)."""
        if not self._authorised(request) or request.match_info["sid"] != self.account_sid:
            return self._error(401, 20003, "Authenticate")
        q = request.query
        after = _parse_time(q.get("DateSent>"))
        before = _parse_time(q.get("DateSent<"))
        found = [
            m
            for m in self.messages
            if ("To" not in q or m.to == q["To"])
            and ("From" not in q or m.from_ == q["From"])
            and (after is None or m.created_at >= after)
            and (before is None or m.created_at <= before)
        ]
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        return web.json_response(
            {
                "messages": [
                    self._resource(
                        m.sid, m.to, m.from_, m.messaging_service_sid, m.body, m.created_at
                    )
                    for m in found
                ],
                "end": max(0, len(found) - 1),
                "first_page_uri": uri,
                "next_page_uri": None,
                "previous_page_uri": None,
                "page": 0,
                "page_size": max(50, len(found)),
                "start": 0,
                "uri": uri,
            }
        )

    def _resource(
        self,
        sid: str,
        to: str,
        from_: Any,
        service: Any,
        body: str,
        created_at: dt.datetime | None = None,
    ) -> dict[str, Any]:
        stamp = email.utils.format_datetime(created_at) if created_at else None
        return {
            "sid": sid,
            "account_sid": self.account_sid,
            "to": to,
            "from": str(from_) if from_ else None,
            "messaging_service_sid": str(service) if service else None,
            "body": body,
            "status": "queued",
            "num_segments": "1",
            "num_media": "0",
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "price": None,
            "price_unit": "USD",
            "error_code": None,
            "error_message": None,
            "date_created": stamp,
            "date_updated": stamp,
            "date_sent": stamp,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
            "subresource_uris": {},
        }

    def settings_env(self) -> dict[str, Any]:
        return {
            "TWILIO_ACCOUNT_SID": self.account_sid,
            "TWILIO_AUTH_TOKEN": self.auth_token,
            "TWILIO_FROM_NUMBER": "+15005550006",
            "TWILIO_API_BASE_URL": self.base_url,
        }


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        parsed = dt.datetime.fromisoformat(value[:10])  # a bare date, as DateSent= takes
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
