"""Amazon SNS message signatures, as AWS documents them: the listed fields of the message,
each as `name\nvalue\n`, signed with the key of the certificate at SigningCertURL
(SignatureVersion 1: SHA1withRSA, 2: SHA256withRSA). A signature only proves that SNS sent the
message, not whose topic it came from: the topic must also be one of SES_SNS_TOPIC_ARNS.

What is refused before anything is fetched: a topic not configured, a message whose signed
`Timestamp` is older than SES_SNS_MAX_AGE_SECONDS (or more than five minutes ahead: a replay
of a captured message, or a forged time), and a certificate URL that is not exactly
`https://sns.<region>.amazonaws.com[.cn]/<name>.pem` (no user info, port, query or fragment; a
pattern of the operator's replaces the host part). The certificate's subject (common name or a
DNS name) must be an SNS name too. Certificates are cached by host and path (least recently
used out first, so a flood of other URLs cannot evict the one in use), a failed fetch is
remembered for a minute, and at most a few fetches run at once: more are refused, not queued.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import re
import ssl
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

# sns.us-east-1.amazonaws.com, sns.us-gov-west-1.amazonaws.com, sns.cn-north-1.amazonaws.com.cn
# (never sns.s3.amazonaws.com, a bucket's host); matched against the whole netloc, so no port.
DEFAULT_CERT_HOST = r"^sns\.[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]{1,2}\.amazonaws\.com(\.cn)?$"
DEFAULT_CERT_SUBJECT = r"^sns(\.[a-z0-9-]+)?\.amazonaws\.com(\.cn)?$"
DEFAULT_MAX_AGE_S = 3600.0  # SNS retries a delivery for at most an hour by default
MAX_FUTURE_S = 300.0
CERT_CACHE = 64
MAX_FETCHES = 4
FAILURE_TTL_S = 60.0
_CERT_PATH = re.compile(r"^/[A-Za-z0-9_.-]{1,200}\.pem$")
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
        cert_subject: str = DEFAULT_CERT_SUBJECT,
        ca_file: str | None = None,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        max_fetches: int = MAX_FETCHES,
    ) -> None:
        self.topics = topics
        self._host = re.compile(cert_host)
        self._subject = re.compile(cert_subject)
        self._ca_file = ca_file
        self._max_age_s = max_age_s
        self._now = now
        self._max_fetches = max_fetches
        self._certs: OrderedDict[tuple[str, str], rsa.RSAPublicKey] = OrderedDict()
        self._failed: dict[tuple[str, str], tuple[float, SnsError]] = {}
        self._fetching: dict[tuple[str, str], asyncio.Task[rsa.RSAPublicKey]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # certificate fetches started (for tests and the bench)

    def trusted_url(self, url: object, *, certificate: bool = False) -> str:
        """`url` if it is https on an SNS host (and, for a certificate, a single .pem name
        without a query), else SnsError."""
        if not isinstance(url, str) or len(url) > 2048:
            raise SnsError("malformed", "URL missing")
        parts = urlsplit(url)
        if (
            parts.scheme != "https"
            or "@" in parts.netloc
            or "\\" in url
            or not self._host.fullmatch(parts.netloc)
        ):
            raise SnsError("untrusted_url", "not an https URL on an SNS host")
        if certificate and (parts.query or parts.fragment or not _CERT_PATH.match(parts.path)):
            raise SnsError("untrusted_url", "the certificate URL is not a .pem on an SNS host")
        return url

    async def verify(self, message: Mapping[str, Any]) -> None:
        if message.get("TopicArn") not in self.topics:
            raise SnsError("topic", "topic is not in SES_SNS_TOPIC_ARNS")
        version = str(message.get("SignatureVersion", ""))
        if version not in ("1", "2"):
            raise SnsError("signature", "unknown SignatureVersion")
        url = self.trusted_url(message.get("SigningCertURL"), certificate=True)
        self._check_time(message.get("Timestamp"))
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

    def _check_time(self, value: object) -> None:
        """The signed Timestamp: a message older than the window is a replay (or a very late
        retry, which SNS does not make); one from the future is forged."""
        if not isinstance(value, str):
            raise SnsError("malformed", "Timestamp missing")
        try:
            at = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise SnsError("malformed", "Timestamp is not ISO 8601") from None
        if at.tzinfo is None:
            raise SnsError("malformed", "Timestamp has no time zone")
        age_s = (self._now() - at).total_seconds()
        if age_s > self._max_age_s or age_s < -MAX_FUTURE_S:
            raise SnsError("stale", f"Timestamp is {age_s:.0f}s old")

    async def get(self, url: str) -> int:
        """GET a trusted SNS URL (SubscribeURL); the status code."""
        session = self._client()
        async with session.get(self.trusted_url(url), allow_redirects=False) as resp:
            await resp.read()
            return resp.status

    async def _key(self, url: str) -> rsa.RSAPublicKey:
        parts = urlsplit(url)
        cache_key = (parts.netloc.lower(), parts.path)
        if cache_key in self._certs:
            self._certs.move_to_end(cache_key)
            return self._certs[cache_key]
        loop = asyncio.get_running_loop()
        failed = self._failed.get(cache_key)
        if failed is not None and failed[0] > loop.time():
            raise failed[1]
        task = self._fetching.get(cache_key)
        if task is None:
            if len(self._fetching) >= self._max_fetches:
                raise SnsError("certificate", "too many certificate fetches at once")
            task = loop.create_task(self._fetch(url))
            self._fetching[cache_key] = task
            task.add_done_callback(lambda _: self._fetching.pop(cache_key, None))
        try:
            key = await asyncio.shield(task)
        except SnsError as exc:
            if len(self._failed) >= CERT_CACHE:
                self._failed.clear()
            self._failed[cache_key] = (loop.time() + FAILURE_TTL_S, exc)
            raise
        self._certs[cache_key] = key
        while len(self._certs) > CERT_CACHE:
            self._certs.popitem(last=False)
        return key

    async def _fetch(self, url: str) -> rsa.RSAPublicKey:
        self.fetches += 1
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
        except TimeoutError:
            raise SnsError("certificate", "certificate fetch timed out") from None
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise SnsError("certificate", "not a PEM certificate") from None
        if not any(self._subject.fullmatch(name) for name in _names(cert)):
            raise SnsError("certificate", "the certificate is not an SNS signing certificate")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SnsError("certificate", "not an RSA certificate")
        return key

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context = ssl.create_default_context(cafile=self._ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=self._max_fetches + 2),
                timeout=aiohttp.ClientTimeout(total=10),
            )
        return self._session

    async def aclose(self) -> None:
        for task in list(self._fetching.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _names(cert: x509.Certificate) -> list[str]:
    """The certificate's common names and DNS names."""
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return names
    return names + list(san.value.get_values_for_type(x509.DNSName))
