"""The providers' webhooks, each authenticated its provider's way before its body is read as
anything but bytes:

    POST /webhooks/ses               Amazon SES through SNS: the SNS signature (certificate from
                                     an SNS host) and a topic in SES_SNS_TOPIC_ARNS
    POST /webhooks/sendgrid          SendGrid's signed Event Webhook: ECDSA P-256 over
                                     timestamp + body, with SENDGRID_WEBHOOK_PUBLIC_KEY
    POST /webhooks/postmark          Postmark: HTTP basic auth (POSTMARK_WEBHOOK_USERNAME/PASSWORD)
    POST /webhooks/generic           any other sender: `Authorization: Bearer WEBHOOK_TOKEN`
    POST /webhooks/twilio/inbound    replies to your number: X-Twilio-Signature (TWILIO_AUTH_TOKEN)
    POST /webhooks/twilio/status     delivery receipts (StatusCallback): X-Twilio-Signature

A route exists only when its provider is configured. A bad or missing signature is 403 and
counted (`reactor_webhook_rejected_total{provider,why}`); a body that authenticates but does not
parse is 400. Nothing a webhook sends is logged except ascii-escaped and shortened.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from ..batching import GroupCommit
from ..domain.consent import callback_delivery
from ..domain.feedback import START_WORDS, STOP_WORDS, FeedbackEvent, keyword
from ..metrics import Metrics
from ..ports import Clock
from .feedback import FeedbackSink, Receipt
from .forms import read_body
from .logsample import SampledLog
from .providers import generic_events, parse_json, postmark_events, sendgrid_events, ses_events
from .sns import DEFAULT_MAX_AGE_S, SnsError, SnsVerifier

if TYPE_CHECKING:
    from ..engagement.provider import ProviderSignals

log = logging.getLogger(__name__)

MAX_WEBHOOK_BYTES = 256 * 1024
SENDGRID_MAX_SKEW_S = 600
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


@dataclass(frozen=True)
class WebhookConfig:
    base_url: str
    ses_topics: frozenset[str] = frozenset()
    ses_cert_host: str | None = None
    ses_ca_file: str | None = None
    ses_cert_subject: str | None = None
    ses_max_age_s: float = DEFAULT_MAX_AGE_S
    sendgrid_public_key: str | None = None
    postmark_username: str | None = None
    postmark_password: SecretStr | None = None
    generic_token: SecretStr | None = None
    twilio_auth_token: SecretStr | None = None

    def configured(self) -> dict[str, bool]:
        return {
            "ses": bool(self.ses_topics),
            "sendgrid": bool(self.sendgrid_public_key),
            "postmark": bool(self.postmark_username and self.postmark_password),
            "generic": self.generic_token is not None,
            "twilio": self.twilio_auth_token is not None,
        }


class Rejected(Exception):
    """Raised when a webhook call does not authenticate; `why` is the metric label."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def load_ec_key(text: str) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key: base64 DER (as its settings page shows it) or PEM."""
    data = text.strip().encode()
    try:
        key = (
            serialization.load_pem_public_key(data)
            if data.startswith(b"-----")
            else serialization.load_der_public_key(base64.b64decode(data, validate=True))
        )
    except (ValueError, binascii.Error):
        raise ValueError("SENDGRID_WEBHOOK_PUBLIC_KEY is not an EC public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("SENDGRID_WEBHOOK_PUBLIC_KEY is not an EC public key")
    return key


class WebhookRoutes:
    def __init__(
        self,
        config: WebhookConfig,
        sink: FeedbackSink,
        metrics: Metrics,
        clock: Clock | None = None,
    ) -> None:
        self._config = config
        self._sink = sink
        self._metrics = metrics
        self._refusals = SampledLog(log)
        pins: dict[str, Any] = {}
        if config.ses_cert_host:
            pins["cert_host"] = config.ses_cert_host
        if config.ses_cert_subject:
            pins["cert_subject"] = config.ses_cert_subject
        if clock is not None:
            pins["now"] = clock.now
        self._sns = (
            SnsVerifier(
                config.ses_topics,
                **pins,
                ca_file=config.ses_ca_file,
                max_age_s=config.ses_max_age_s,
            )
            if config.ses_topics
            else None
        )
        self._sendgrid = (
            load_ec_key(config.sendgrid_public_key) if config.sendgrid_public_key else None
        )
        self._twilio = (
            RequestValidator(config.twilio_auth_token.get_secret_value())
            if config.twilio_auth_token is not None
            else None
        )
        # Concurrent requests' events are applied together (and each answered once stored).
        self._emails: GroupCommit[FeedbackEvent, bool] = GroupCommit(sink.emails)
        self._receipts: GroupCommit[Receipt, bool] = GroupCommit(sink.sms_statuses)
        self.signals: ProviderSignals | None = None  # provider opens and clicks (issue 24)

    def add_to(self, app: web.Application) -> None:
        on = self._config.configured()
        routes = {
            "ses": ("/webhooks/ses", self.ses),
            "sendgrid": ("/webhooks/sendgrid", self.sendgrid),
            "postmark": ("/webhooks/postmark", self.postmark),
            "generic": ("/webhooks/generic", self.generic),
        }
        for name, (path, handler) in routes.items():
            if on[name]:
                app.router.add_post(path, handler)
        if on["twilio"]:
            app.router.add_post("/webhooks/twilio/inbound", self.twilio_inbound)
            app.router.add_post("/webhooks/twilio/status", self.twilio_status)

    async def aclose(self) -> None:
        await self._emails.aclose()
        await self._receipts.aclose()
        if self._sns is not None:
            await self._sns.aclose()

    # ---- email providers ---------------------------------------------------------------------

    async def ses(self, request: web.Request) -> web.Response:
        body = await read_body(request, MAX_WEBHOOK_BYTES)
        assert self._sns is not None
        try:
            message = parse_json(body)
            if not isinstance(message, dict):
                raise ValueError
        except ValueError:
            return self._reject("ses", "malformed", status=400)
        try:
            await self._sns.verify(message)
        except SnsError as exc:
            return self._reject("ses", exc.why)
        kind = message.get("Type")
        if kind == "SubscriptionConfirmation":
            try:
                status = await self._sns.get(str(message.get("SubscribeURL")))
            except SnsError as exc:
                return self._reject("ses", exc.why)
            log.info(
                "SNS subscription to %s confirmed (%s)", ascii(message.get("TopicArn")), status
            )
            return web.Response(text="confirmed\n")
        if kind != "Notification":
            return web.Response(text="ok\n")
        sns_id = str(message.get("MessageId"))
        try:  # parsed once, for the feedback events and the provider signals
            doc = parse_json(str(message.get("Message", "")))
            events = ses_events(sns_id, doc)
        except ValueError:
            return self._reject("ses", "malformed", status=400)
        if self.signals is not None:
            await self.signals.ses(sns_id, doc)
        return await self._apply("ses", events)

    async def sendgrid(self, request: web.Request) -> web.Response:
        body = await read_body(request, MAX_WEBHOOK_BYTES)
        assert self._sendgrid is not None
        signature = request.headers.get("X-Twilio-Email-Event-Webhook-Signature", "")
        timestamp = request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp", "")
        try:
            sig = base64.b64decode(signature, validate=True)
            if not sig or abs(time.time() - int(timestamp)) > SENDGRID_MAX_SKEW_S:
                raise Rejected("timestamp" if sig else "signature")
            self._sendgrid.verify(sig, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        except Rejected as exc:
            return self._reject("sendgrid", exc.why)
        except (ValueError, binascii.Error, InvalidSignature):
            return self._reject("sendgrid", "signature")
        try:  # parsed once, for the feedback events and the provider signals
            doc = parse_json(body)
            events = sendgrid_events(doc)
        except ValueError:
            return self._reject("sendgrid", "malformed", status=400)
        if self.signals is not None:
            await self.signals.sendgrid(doc)
        return await self._apply("sendgrid", events)

    async def postmark(self, request: web.Request) -> web.Response:
        cfg = self._config
        assert cfg.postmark_username
        assert cfg.postmark_password
        if not _basic_ok(
            request.headers.get("Authorization", ""),
            cfg.postmark_username,
            cfg.postmark_password.get_secret_value(),
        ):
            return self._reject("postmark", "credentials", status=401)
        body = await read_body(request, MAX_WEBHOOK_BYTES)
        try:
            events = postmark_events(body)
        except ValueError:
            return self._reject("postmark", "malformed", status=400)
        return await self._apply("postmark", events)

    async def generic(self, request: web.Request) -> web.Response:
        assert self._config.generic_token is not None
        header = request.headers.get("Authorization", "")
        expected = f"Bearer {self._config.generic_token.get_secret_value()}"
        if not hmac.compare_digest(header.encode(), expected.encode()):
            return self._reject("generic", "credentials", status=401)
        body = await read_body(request, MAX_WEBHOOK_BYTES)
        try:
            events = generic_events(body)
        except ValueError as exc:
            self._metrics.webhook_rejected.labels("generic", "malformed").inc()
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        return await self._apply("generic", events)

    async def _apply(self, provider: str, events: list[FeedbackEvent]) -> web.Response:
        applied = sum(await self._emails.submit_many(events))
        if events:
            await self._sink.received(provider, len(events))
        return web.json_response({"received": len(events), "applied": applied})

    # ---- Twilio ------------------------------------------------------------------------------

    async def _twilio_form(self, request: web.Request) -> dict[str, str] | web.Response:
        body = await read_body(request, MAX_WEBHOOK_BYTES)
        try:
            params = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            return self._reject("twilio", "malformed", status=400)
        assert self._twilio is not None
        # Twilio signs the URL it called: the public base URL, not the address behind a proxy.
        url = self._config.base_url + request.raw_path  # as sent: path and query undecoded
        signature = request.headers.get("X-Twilio-Signature", "")
        if not signature or not self._twilio.validate(url, params, signature):
            return self._reject("twilio", "signature")
        return params

    async def twilio_inbound(self, request: web.Request) -> web.Response:
        params = await self._twilio_form(request)
        if isinstance(params, web.Response):
            return params
        word = keyword(params.get("Body", ""))
        phone = params.get("From", "").strip()
        sid = params.get("MessageSid") or params.get("SmsSid") or ""
        if phone and sid and (word in STOP_WORDS or word in START_WORDS):
            await self._sink.sms_reply(sid, phone, word, stop=word in STOP_WORDS)
            await self._sink.received("twilio", 1)
        return web.Response(text=EMPTY_TWIML, content_type="text/xml")

    async def twilio_status(self, request: web.Request) -> web.Response:
        params = await self._twilio_form(request)
        if isinstance(params, web.Response):
            return params
        sid = params.get("MessageSid") or params.get("SmsSid") or ""
        status = (params.get("MessageStatus") or params.get("SmsStatus") or "").lower()
        if sid and status:
            delivery = callback_delivery(request.query.get("d"))  # the row this callback names
            await self._receipts.submit((sid, status, params.get("ErrorCode") or None, delivery))
        return web.Response(status=204)

    def _reject(self, provider: str, why: str, *, status: int = 403) -> web.Response:
        self._metrics.webhook_rejected.labels(provider, why).inc()
        self._refusals.warning(f"{provider}:{why}", "refused a %s webhook call: %s", provider, why)
        return web.Response(text="refused\n", status=status)


def _basic_ok(header: str, username: str, password: str) -> bool:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, f"{username}:{password}".encode())
