"""DKIM signing's cost, in one run against the same local SMTP sink:

* emails per second through the pooled SMTP sender with signing and without (same pool, same
  concurrency, same messages, rounds alternated so that load on the machine falls on both), at
  the sink's loopback speed (the worst case: nothing but CPU to hide the cost in) and with a
  5 ms simulated round trip (a nearby relay);
* every signed message the sink received is verified with dkimpy against the public key, and
  counted only if it verifies;
* the time one signature takes, with OpenSSL for the RSA primitive (what the reactor does) and
  with dkimpy's pure-Python one, and thus how long signing holds the event loop per message.

The signer signs where `reactor run` does by default (DKIM_SIGNING=process: a helper process),
and the CPU it costs there is reported beside the event loop's.

Target: signed ÷ unsigned >= 0.9 at loopback speed. Sizes are fixed here, before any run.
"""

from __future__ import annotations

import base64
import os
import statistics
import time
from typing import Any

import anyio
import cryptography
import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..adapters.dkim import DkimSigner
from ..adapters.smtp import SmtpEmailSender, build_mime
from ..config import SmtpConfig
from ..embedded.smtp_sink import SmtpSink
from ..ports import EmailMessage
from .figures import Figure

SOURCES = [
    "reactor/bench/dkim.py",
    "reactor/adapters/dkim.py",
    "reactor/adapters/dkim_process.py",
    "reactor/adapters/smtp.py",
]
DOMAIN = "reactor.example.com"
CONCURRENCY = 32
POOL = 16


def _message(i: int) -> EmailMessage:
    return EmailMessage(
        to=f"c{i}@example.com",
        subject=f"Hello Customer {i}",
        text=f"Hello Customer {i}, 20% off today.\n" * 20,
        html=f"<p>Hello <b>Customer {i}</b>, 20% off today.</p>" * 20,
        message_id=f"<bench.{i}@{DOMAIN}>",
        headers=(
            ("List-Unsubscribe", f"<https://m.{DOMAIN}/u/token{i}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ),
    )


def _config(sink: SmtpSink) -> SmtpConfig:
    return SmtpConfig(
        host=sink.host,
        port=sink.port,
        username=None,
        password=None,
        tls="none",
        pool_size=POOL,
        timeout_s=30,
        sender=f"campaigns@{DOMAIN}",
    )


async def _round(
    sink: SmtpSink, sender: SmtpEmailSender, first: int, n: int
) -> tuple[float, float, float]:
    """Emails per second for `n` messages, counted where they land (the sink), and the CPU
    µs per message of the event loop's thread and of every other thread of this process
    (signing threads; a signing process's CPU is its own)."""
    before = len(sink.messages)
    queue = list(range(first, first + n))
    t0, loop_cpu0, cpu0 = time.perf_counter(), time.thread_time(), time.process_time()

    async def worker() -> None:
        while queue:
            await sender.send(_message(queue.pop()))

    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENCY):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - t0
    loop_cpu, cpu = time.thread_time() - loop_cpu0, time.process_time() - cpu0
    received = len(sink.messages) - before
    return received / elapsed, 1e6 * loop_cpu / n, 1e6 * (cpu - loop_cpu) / n


def _process_cpu_s(signer: DkimSigner) -> float:
    """CPU seconds the signer's helper process has used (0 without one)."""
    pid = signer.process.pid if signer.process is not None else None
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _signed_round(
    sink: SmtpSink, sender: SmtpEmailSender, signer: DkimSigner, first: int, n: int
) -> tuple[float, float, float, float]:
    """`_round`, and the CPU µs per message of the signer's helper process."""
    before = _process_cpu_s(signer)
    rate, loop_us, threads_us = await _round(sink, sender, first, n)
    return rate, loop_us, threads_us, 1e6 * (_process_cpu_s(signer) - before) / n


def _sign_us(signer: DkimSigner, n: int) -> float:
    data = build_mime(_message(0), f"campaigns@{DOMAIN}").as_bytes()
    t0 = time.perf_counter()
    for _ in range(n):
        signer.sign(data)
    return 1e6 * (time.perf_counter() - t0) / n


async def _ratio(rtt_s: float, signer: DkimSigner, n: int, rounds: int) -> dict[str, Any]:
    async with SmtpSink(reply_delay_s=rtt_s) as sink:
        # One sender each, kept through the rounds (as a reactor keeps its pool and its
        # signing process); both warmed up first (connections, caches, the process).
        unsigned = SmtpEmailSender(_config(sink))
        signing = SmtpEmailSender(_config(sink), signer=signer)
        await _round(sink, unsigned, 0, min(200, n))
        await _round(sink, signing, 5 * n, min(200, n))
        sink.messages.clear()
        plain: list[tuple[float, float, float]] = []
        signed: list[tuple[float, float, float, float]] = []
        for r in range(rounds):
            base = (r + 1) * 10 * n
            if r % 2 == 0:
                plain.append(await _round(sink, unsigned, base, n))
                signed.append(await _signed_round(sink, signing, signer, base + n, n))
            else:
                signed.append(await _signed_round(sink, signing, signer, base + n, n))
                plain.append(await _round(sink, unsigned, base, n))
        await unsigned.aclose()
        await signing.aclose()  # and the signer's process: the next run starts its own
        record = signer.dns_record.encode()
        dnsfunc = lambda name, timeout=5: record  # noqa: E731  # the one key in this run
        with_sig = [m for m in sink.messages if m.raw.startswith(b"DKIM-Signature:")]
        verified = sum(1 for m in with_sig if dkim.verify(m.raw, dnsfunc=dnsfunc))
        rate_plain = statistics.median(r[0] for r in plain)
        rate_signed = statistics.median(r[0] for r in signed)
        return {
            "rtt_ms": rtt_s * 1000,
            "unsigned_per_s": round(rate_plain, 1),
            "signed_per_s": round(rate_signed, 1),
            "ratio": round(rate_signed / rate_plain, 3),
            # CPU per message (the sink shares the event loop): less sensitive to other load
            # on the machine than the rates, for information.
            "loop_cpu_us_unsigned": round(statistics.median(r[1] for r in plain), 1),
            "loop_cpu_us_signed": round(statistics.median(r[1] for r in signed), 1),
            "worker_cpu_us_signed": round(statistics.median(r[2] for r in signed), 1),
            "process_cpu_us_signed": round(statistics.median(r[3] for r in signed), 1),
            "signed_received": len(with_sig),
            "signed_verified": verified,
            "signed_expected": n * rounds,
        }


async def run(quick: bool) -> dict[str, Any]:
    n, rounds = (300, 2) if quick else (2000, 4)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signer = DkimSigner(DOMAIN, "bench", pem, process=True)  # as `reactor run` signs
    # The pure signer must not use the key the fast one registered: a key of its own.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pure = DkimSigner(
        DOMAIN,
        "bench",
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        fast=False,
    )
    return {
        "messages_per_round": n,
        "rounds": rounds,
        "loopback": await _ratio(0.0, signer, n, rounds),
        "rtt_5ms": await _ratio(0.005, signer, n, rounds),
        "sign_us_openssl": round(_sign_us(signer, 200), 1),
        "sign_us_dkimpy_pure": round(_sign_us(pure, 20 if quick else 50), 1),
        "public_key_b64_len": len(base64.b64encode(signer.public_key_der)),
        "signing": signer.signing,  # where: the helper process, as DKIM_SIGNING's default
        "signing_process_starts": signer.process.starts if signer.process else 0,
        "signing_process_failures": signer.process.failures if signer.process else 0,
        "cryptography": cryptography.__version__,
    }


def figures(result: dict[str, Any]) -> list[Figure]:
    loop, rtt = result["loopback"], result["rtt_5ms"]
    return [
        Figure("dkim signed ÷ unsigned, loopback sink", loop["ratio"], "×", 0.9, ">="),
        Figure("dkim signed ÷ unsigned, 5 ms relay", rtt["ratio"], "×", 0.9, ">="),
        Figure(
            "dkim signed messages that verify",
            loop["signed_verified"] + rtt["signed_verified"],
            "messages",
            float(loop["signed_expected"] + rtt["signed_expected"]),
            "==",
        ),
        Figure("dkim signature time (OpenSSL RSA)", result["sign_us_openssl"], "µs"),
        Figure("dkim signature time (dkimpy pure RSA)", result["sign_us_dkimpy_pure"], "µs"),
    ]
