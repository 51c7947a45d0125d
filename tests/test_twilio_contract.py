"""Contract test of the SMS adapter against Twilio's own published OpenAPI description of API
v2010, served by Prism in validating mock mode (`--errors`: a request that breaks the contract
is answered with an error, so a successful send proves the request conforms). .ci/install puts
Prism and the description (npm: @stoplight/prism-cli, @twilio-alpha/mcp) under .tools/."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from reactor.adapters.twilio_sms import TwilioSmsSender
from reactor.config import TwilioConfig
from reactor.domain.errors import PermanentDeliveryError, TransientDeliveryError
from reactor.ports import SmsMessage

ROOT = Path(__file__).resolve().parent.parent
PRISM = ROOT / ".tools" / "node_modules" / ".bin" / "prism"
SPEC = (
    ROOT
    / ".tools"
    / "node_modules"
    / "@twilio-alpha"
    / "mcp"
    / "twilio-oai"
    / "spec"
    / "json"
    / "twilio_api_v2010.json"
)
ACCOUNT = "AC" + "0" * 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prism_port() -> int:
    return _free_port()


@contextlib.asynccontextmanager
async def prism(port: int) -> AsyncIterator[str]:
    assert PRISM.exists(), "Prism is not installed: run `bash .ci/install`"
    assert SPEC.exists(), "Twilio's OpenAPI description is not installed: run `bash .ci/install`"
    proc = await asyncio.create_subprocess_exec(
        str(PRISM),
        "mock",
        "--errors",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        str(SPEC),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                try:
                    async with session.get(f"{base}/2010-04-01/Accounts.json") as resp:
                        if resp.status:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("Prism did not start")
        yield base
    finally:
        proc.terminate()
        await proc.wait()


def _config(base: str, **overrides: str | None) -> TwilioConfig:
    values: dict[str, object] = {
        "account_sid": ACCOUNT,
        "auth_token": SecretStr("0" * 32),
        "from_number": "+15005550006",
        "messaging_service_sid": None,
        "api_base_url": base,
        "timeout_s": 10.0,
    }
    values.update(overrides)
    return TwilioConfig(**values)  # type: ignore[arg-type]


async def test_sends_conform_to_twilios_openapi_description(prism_port: int) -> None:
    async with prism(prism_port) as base:
        sender = TwilioSmsSender(_config(base))
        try:
            sid = await sender.send(SmsMessage(to="+14155550100", body="Hi Ana: 20% off today"))
            assert sid.startswith("SM")
            assert len(sid) == 34
        finally:
            await sender.aclose()
        with_service = TwilioSmsSender(
            _config(base, from_number=None, messaging_service_sid="MG" + "0" * 32)
        )
        try:
            assert (await with_service.send(SmsMessage(to="+14155550100", body="x"))).startswith(
                "SM"
            )
        finally:
            await with_service.aclose()


async def test_contract_violations_and_http_errors_map_to_delivery_errors(prism_port: int) -> None:
    async with prism(prism_port) as base:
        # An account SID that breaks the description's pattern: Prism answers 4xx, which the
        # adapter reports as permanent (retrying would not help).
        sender = TwilioSmsSender(_config(base, account_sid="AC-not-a-sid"))
        try:
            with pytest.raises(PermanentDeliveryError):
                await sender.send(SmsMessage(to="+14155550100", body="x"))
        finally:
            await sender.aclose()
    # Nothing listening: the connection was never made, so a retry is safe.
    closed = TwilioSmsSender(_config(f"http://127.0.0.1:{_free_port()}"))
    try:
        with pytest.raises(TransientDeliveryError):
            await closed.send(SmsMessage(to="+14155550100", body="x"))
    finally:
        await closed.aclose()
