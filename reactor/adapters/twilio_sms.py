"""SMS through Twilio's REST API with twilio's async client.

The HTTP layer is twilio's `AsyncTwilioHttpClient`, with `request` overridden only to place
failures: a connection never made is transient, a timeout or disconnect after the request went out
is uncertain (Twilio may have queued the message), and 429 carries its Retry-After up to the
rate limiter. A 5xx answer is uncertain too: a gateway can fail after Twilio accepted the message,
so retrying it blindly could text the customer twice. Everything else — URLs, form encoding,
errors as `TwilioRestException` — is twilio's.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
from typing import Any

import aiohttp
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from ..config import TwilioConfig
from ..domain.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
)
from ..ports import SmsMessage

log = logging.getLogger(__name__)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class MappedTwilioHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    def __init__(self, timeout_s: float) -> None:
        super().__init__(pool_connections=False, timeout=timeout_s)
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self,
        method: str,
        url: str,
        params: Any = None,
        data: Any = None,
        headers: Any = None,
        auth: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109 - twilio's signature
        allow_redirects: bool = False,
    ) -> Response:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=timeout or self._timeout_s, connect=min(5.0, self._timeout_s)
                )
            )
        headers = dict(headers or {})
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        try:
            async with self._session.request(
                method.upper(),
                url,
                params=params,
                data=data,
                headers=headers,
                allow_redirects=allow_redirects,
            ) as resp:
                text = await resp.text()
                status, resp_headers = resp.status, dict(resp.headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise TransientDeliveryError(
                f"Twilio unreachable: {type(exc).__name__}", channel_wide="connect"
            ) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UncertainDeliveryError(
                f"Twilio request outcome unknown: {type(exc).__name__}"
            ) from exc
        if status == 429:
            raise TransientDeliveryError(
                "Twilio rate limit (429)",
                retry_after_s=_retry_after(resp_headers.get("Retry-After")),
            )
        return Response(status, text, resp_headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


STOPPED_RECIPIENT = 21610  # "Attempt to send to unsubscribed recipient": it replied STOP


class TwilioSmsSender:
    def __init__(self, config: TwilioConfig) -> None:
        self._config = config
        self._http = MappedTwilioHttpClient(config.timeout_s)
        self._client = Client(
            config.account_sid, config.auth_token.get_secret_value(), http_client=self._http
        )
        if config.api_base_url:
            self._client.api.base_url = config.api_base_url.rstrip("/")
        # twilio's own request logging would print URLs and parameters at INFO.
        logging.getLogger("twilio").setLevel(logging.WARNING)

    async def send(self, message: SmsMessage) -> str:
        kwargs: dict[str, Any] = {"to": message.to, "body": message.body}
        if message.status_callback:
            kwargs["status_callback"] = message.status_callback
        if self._config.messaging_service_sid:
            kwargs["messaging_service_sid"] = self._config.messaging_service_sid
        else:
            kwargs["from_"] = self._config.from_number
        try:
            created = await self._client.messages.create_async(**kwargs)
        except TwilioRestException as exc:
            text = f"Twilio {exc.status} error {exc.code}: {exc.msg}"
            if exc.status >= 500:
                raise UncertainDeliveryError(text, channel_wide="provider_5xx") from exc
            if exc.status in (408, 409):
                raise TransientDeliveryError(text) from exc
            if exc.status in (401, 403):
                raise PermanentDeliveryError(text, channel_wide="auth") from exc
            if exc.code == STOPPED_RECIPIENT:
                raise PermanentDeliveryError(text, suppress="sms_stop") from exc
            raise PermanentDeliveryError(text) from exc
        return str(created.sid)

    async def find_sent(self, message: SmsMessage, since: dt.datetime) -> str | None:
        """The SID of a message Twilio took for `message` since `since` (its Messages list,
        filtered by To, From and DateSent), or None: how an uncertain send is resolved."""
        kwargs: dict[str, Any] = {"to": message.to, "date_sent_after": since, "limit": 50}
        if not self._config.messaging_service_sid:
            kwargs["from_"] = self._config.from_number
        try:
            found = await self._client.messages.list_async(**kwargs)
        except (TwilioRestException, DeliveryError) as exc:
            log.warning("could not look an uncertain SMS up in Twilio's list: %s", exc)
            return None
        for candidate in found:
            service = self._config.messaging_service_sid
            if candidate.body == message.body and (
                not service or candidate.messaging_service_sid == service
            ):
                return str(candidate.sid)
        return None

    async def aclose(self) -> None:
        await self._http.close()

    async def check(self) -> None:
        """Fetch the account resource once, for `reactor doctor --probe`; raises on failure."""
        await asyncio.wait_for(
            self._client.api.v2010.accounts(self._config.account_sid).fetch_async(), 10
        )
