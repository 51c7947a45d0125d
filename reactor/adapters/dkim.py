"""DKIM signing (RFC 6376) of outgoing messages with dkimpy: rsa-sha256, relaxed/relaxed, over
the headers receivers and one-click unsubscribe need (From, To, Subject, Date, Message-ID, the
MIME headers, List-Unsubscribe, List-Unsubscribe-Post).

A key is loaded and proven at start-up: read, parsed, at least 1024 bits, and a probe message
signed and verified against the key's own public key. A key that fails any of it raises
`DkimKeyError`, which stops the reactor before it sends anything.

dkimpy does the DKIM work (canonicalization, header and body hashes, the signature header), but
its RSA primitive is pure-Python modular exponentiation: ~5 ms per message for a 2048-bit key,
more than the rest of a send. RSASSA-PKCS1-v1_5 is deterministic, so the same signature comes
from OpenSSL (through `cryptography`) in ~0.2 ms: `_openssl_rsa_sign` stands in for dkimpy's
primitive for the keys loaded here (and falls back to dkimpy's own for any other key), and a
test checks both give identical bytes. dkimpy also re-parses the PEM on every signature;
`_parsed_pem` hands it its own earlier parse of the keys loaded here.

Even through OpenSSL, the RSA signature is most of what signing costs (~0.25 ms of ~0.37 ms for
a 2048-bit key; a whole unsigned send is ~1 ms of event-loop time). From cryptography 47 on, RSA
signing releases the GIL (pyca/cryptography#14370), so `sign_off_loop` runs dkimpy in a worker
thread and the event loop goes on with other sends meanwhile; dkimpy's canonicalization and
hashing stay Python (or below hashlib's 2 KiB GIL threshold) and still share the GIL. With an
older cryptography the thread would only add a hop, so signing stays inline there.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cryptography
import dkim  # type: ignore[import-untyped]
import dkim.crypto  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from ..domain.senders import DkimKey
from .dkim_process import SigningProcess

SIGNED_HEADERS = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)
MIN_KEY_BITS = 1024
# pyca/cryptography#14370 (first released in 47.0): RSA sign runs with the GIL released.
RSA_SIGN_RELEASES_GIL = tuple(int(p) for p in cryptography.__version__.split(".")[:1]) >= (47,)
SIGNING_THREADS = 2

_PROBE = (
    b"From: probe@{domain}\r\nTo: probe@example.invalid\r\nSubject: probe\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <probe@{domain}>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nprobe\r\n"
)


class DkimKeyError(ValueError):
    """Raised when a DKIM private key cannot be read, parsed or used to sign."""


# ---- OpenSSL for dkimpy's RSA primitive --------------------------------------------------------

_KEYS: dict[int, rsa.RSAPrivateKey] = {}  # modulus -> the same key, loaded by OpenSSL
_PARSED: dict[bytes, Any] = {}  # PEM -> dkimpy's parse of it, for the keys loaded here
_LOCK = threading.Lock()
_DKIMPY_RSA_SIGN = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_DKIMPY_PARSE_PEM = dkim.crypto.parse_pem_private_key


def _parsed_pem(data: bytes) -> Any:
    # dkimpy parses the PEM (ASN.1 in Python) on every signature: as long as the signature
    # itself, for a key that never changes.
    parsed = _PARSED.get(data)
    return parsed if parsed is not None else _DKIMPY_PARSE_PEM(data)


def _openssl_rsa_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    key = _KEYS.get(private_key.get("modulus", 0))
    if key is None or hash.name.lower() != "sha256":
        return bytes(_DKIMPY_RSA_SIGN(hash, private_key))
    return key.sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def _install_openssl_primitive() -> None:
    # dkimpy's signer calls the primitive it imported into its package namespace.
    with _LOCK:
        if dkim.RSASSA_PKCS1_v1_5_sign is not _openssl_rsa_sign:
            dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign
            dkim.parse_pem_private_key = _parsed_pem


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(SIGNING_THREADS, thread_name_prefix="dkim-sign")
        return _EXECUTOR


# ---- the signer ---------------------------------------------------------------------------------


class DkimSigner:
    """Signs messages for one domain with one selector's key."""

    def __init__(
        self,
        domain: str,
        selector: str,
        key_pem: bytes,
        *,
        fast: bool = True,
        threaded: bool | None = None,
        process: bool = False,
    ) -> None:
        self.domain = domain
        self.selector = selector
        self._pem = key_pem
        self._domain_b = domain.encode("ascii")
        self._selector_b = selector.encode("ascii")
        key = _load_rsa(key_pem)
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_der = public
        # Off the event loop only where that buys parallelism: OpenSSL's RSA without the GIL.
        self.threaded = (fast and RSA_SIGN_RELEASES_GIL) if threaded is None else threaded
        # In a helper process of its own, with the above as the fallback when it is unavailable.
        self.process = SigningProcess(domain, selector, key_pem) if process else None
        if fast:
            _KEYS[key.private_numbers().public_numbers.n] = key
            _PARSED[key_pem] = _DKIMPY_PARSE_PEM(key_pem)
            _install_openssl_primitive()

    @property
    def dns_record(self) -> str:
        """The TXT record to publish at selector._domainkey.domain."""
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(self.public_key_der).decode("ascii")

    def signature(self, message: bytes) -> bytes:
        """The DKIM-Signature header (with its CRLF) for `message` (CRLF line endings)."""
        try:
            return bytes(
                dkim.sign(
                    message,
                    self._selector_b,
                    self._domain_b,
                    self._pem,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=list(SIGNED_HEADERS),
                )
            )
        except dkim.DKIMException as exc:
            raise DkimKeyError(f"DKIM signing for {self.domain} failed: {exc}") from exc

    def sign(self, message: bytes) -> bytes:
        """`message` with its DKIM-Signature header prepended."""
        return self.signature(message) + message

    @property
    def signing(self) -> str:
        """Where `sign_off_loop` signs: process, thread or inline."""
        return "process" if self.process is not None else "thread" if self.threaded else "inline"

    async def sign_off_loop(self, message: bytes) -> bytes:
        """`sign(message)`, in the helper process (`process`), else in a worker thread when that
        frees the event loop (`threaded`), else inline. A message the helper process cannot
        sign (it is down) is signed here instead.

        A cancelled caller leaves the thread or the process to finish one harmless signature."""
        if self.process is not None:
            answer = await self.process.signature(message)
            if answer is not None:
                ok, payload = answer
                if not ok:
                    raise DkimKeyError(str(payload))
                return bytes(payload) + message
        if not self.threaded:
            return self.sign(message)
        return await asyncio.get_running_loop().run_in_executor(_executor(), self.sign, message)

    async def aclose(self) -> None:
        """Stop the helper process, if one was started."""
        if self.process is not None:
            await self.process.aclose()

    def verify_own(self, message: bytes) -> bool:
        """Verify a signed message against this key's own public key (no DNS)."""
        record = self.dns_record.encode("ascii")

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
            expected = self._selector_b + b"._domainkey." + self._domain_b + b"."
            return record if name.rstrip(b".") + b"." == expected else b""

        return bool(dkim.verify(message, dnsfunc=dnsfunc))


def _load_rsa(pem: bytes) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DkimKeyError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DkimKeyError(f"a {type(key).__name__} is not an RSA key (rsa-sha256 needs one)")
    if key.key_size < MIN_KEY_BITS:
        raise DkimKeyError(
            f"the key has {key.key_size} bits; receivers ignore keys under {MIN_KEY_BITS} "
            "(use 2048)"
        )
    return key


def load_signer(
    domain: str, key: DkimKey, *, fast: bool = True, process: bool = False
) -> DkimSigner:
    """Read, parse and prove a key: DkimKeyError (naming the file, never its content) if any
    of it fails."""
    where = f"DKIM key {key.key_file} (selector {key.selector}, domain {domain})"
    try:
        with open(key.key_file, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise DkimKeyError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        signer = DkimSigner(domain, key.selector, pem, fast=fast, process=process)
        probe = _PROBE.replace(b"{domain}", domain.encode("ascii"))
        if not signer.verify_own(signer.sign(probe)):
            raise DkimKeyError("a probe message it signed does not verify")
    except DkimKeyError as exc:
        raise DkimKeyError(f"{where}: {exc}") from None
    except UnicodeEncodeError:
        raise DkimKeyError(f"{where}: the domain must be ASCII (use its A-label)") from None
    return signer
