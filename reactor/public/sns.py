"""Amazon SNS message signatures, as AWS documents them: the listed fields of the message,
each as `name\\nvalue\\n`, signed with the key of the certificate at SigningCertURL
(SignatureVersion 1: SHA1withRSA, 2: SHA256withRSA). The certificate is fetched only from an
https URL on an SNS host (by default `sns.<region>.amazonaws.com`) and cached. A signature only
proves that SNS sent the message, not whose topic it came from: the topic must also be one of
SES_SNS_TOPIC_ARNS.
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

DEFAULT_CERT_HOST = r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$"
_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_SUBSCRIPTION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)


class SnsError(Exception):
    """Raised when an SNS message's signature, certificate or topic does not check out; `why`
    is the metric label."""

    def __init__(self, why: str, detail: str = "") -> None:
        super().__init__(detail or why)
        self.why = why


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    kind = message.get("Type")
    fields = _NOTIFICATION_FIELDS if kind == "Notification" else _SUBSCRIPTION_FIELDS
    parts: list[str] = []
    for name in fields:
        if name == "Subject" and message.get(name) is None:
            continue
        value = message.get(name)
        if not isinstance(value, str):
            raise SnsError("malformed", f"{name} missing")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


class SnsVerifier:
    def __init__(
        self,
        topics: frozenset[str],
        *,
        cert_host: str = DEFAULT_CERT_HOST,
        ca_file: str | None = None,
    ) -> None:
        self.topics = topics
        self._host = re.compile(cert_host)
        self._ca_file = ca_file
        self._certs: dict[str, rsa.RSAPublicKey] = {}
        self._session: aiohttp.ClientSession | None = None

    def trusted_url(self, url: object) -> str:
        """`url` if it is https on an SNS host, else SnsError."""
        if not isinstance(url, str):
            raise SnsError("malformed", "URL missing")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or not self._host.match(parts.hostname):
            raise SnsError("untrusted_url", "not an https URL on an SNS host")
        return url

    async def verify(self, message: Mapping[str, Any]) -> None:
        if message.get("TopicArn") not in self.topics:
            raise SnsError("topic", "topic is not in SES_SNS_TOPIC_ARNS")
        version = str(message.get("SignatureVersion", ""))
        if version not in ("1", "2"):
            raise SnsError("signature", "unknown SignatureVersion")
        url = self.trusted_url(message.get("SigningCertURL"))
        if not urlsplit(url).path.endswith(".pem"):
            raise SnsError("untrusted_url", "the certificate URL is not a .pem")
        try:
            signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
        except (binascii.Error, ValueError):
            raise SnsError("signature", "Signature is not base64") from None
        key = await self._key(url)
        digest: hashes.HashAlgorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        try:
            key.verify(signature, string_to_sign(message), padding.PKCS1v15(), digest)
        except InvalidSignature:
            raise SnsError("signature", "signature does not verify") from None

    async def get(self, url: str) -> int:
        """GET a trusted SNS URL (SubscribeURL); the status code."""
        session = self._client()
        async with session.get(self.trusted_url(url), allow_redirects=False) as resp:
            await resp.read()
            return resp.status

    async def _key(self, url: str) -> rsa.RSAPublicKey:
        if url in self._certs:
            return self._certs[url]
        session = self._client()
        try:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise SnsError("certificate", f"certificate fetch answered {resp.status}")
                pem = await resp.content.read(64 * 1024)
        except aiohttp.ClientError as exc:
            raise SnsError(
                "certificate", f"certificate fetch failed: {type(exc).__name__}"
            ) from None
        try:
            key = x509.load_pem_x509_certificate(pem).public_key()
        except ValueError:
            raise SnsError("certificate", "not a PEM certificate") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise SnsError("certificate", "not an RSA certificate")
        if len(self._certs) > 64:
            self._certs.clear()
        self._certs[url] = key
        return key

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context = ssl.create_default_context(cafile=self._ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                timeout=aiohttp.ClientTimeout(total=10),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
