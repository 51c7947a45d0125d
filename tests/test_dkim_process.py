"""DKIM signing in a helper process (DKIM_SIGNING=process, the default): what it signs verifies,
the child gets neither the key on its command line nor the parent's environment, and when the
child cannot start, dies, stalls or answers garbage, every message is still signed (by the
parent) and the failure is logged."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import pickle
import signal
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from reactor.adapters import dkim_process
from reactor.adapters.dkim import DkimKeyError, DkimSigner
from reactor.adapters.smtp import SmtpEmailSender
from reactor.embedded.smtp_sink import SmtpSink
from reactor.ports import EmailMessage

from .helpers import sink_smtp

DOMAIN = "reactor.example"
RAW = (
    b"From: a@reactor.example\r\nTo: b@example.com\r\nSubject: s {i}\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <m{i}@reactor.example>\r\n"
    b"List-Unsubscribe: <https://m.reactor.example/u/t>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nbody {i}\r\n"
)


@pytest.fixture(scope="module")
def key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def raw(i: int) -> bytes:
    return RAW.replace(b"{i}", str(i).encode())


def verifies(signer: DkimSigner, message: bytes) -> bool:
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(signer.public_key_der)
    return bool(dkim.verify(message, dnsfunc=lambda name, timeout=5: record))


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    """Whether `text` is logged within 5 s (the exit code is logged once the child is reaped)."""
    for _ in range(100):
        if text in caplog.text:
            return True
        await asyncio.sleep(0.05)
    return False


def record_children(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.subprocess.Process]:
    """The children the signer starts, in order."""
    children: list[asyncio.subprocess.Process] = []
    start = asyncio.create_subprocess_exec

    async def recording(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        child = await start(*args, **kwargs)
        children.append(child)
        return child

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recording)
    return children


def fake_child(tmp_path: Path, body: str) -> str:
    """An executable standing in for the child's Python (its arguments ignored)."""
    script = tmp_path / "child.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


async def test_messages_signed_in_the_child_verify_and_the_child_stops_on_close(
    key_pem: bytes, sink: SmtpSink
) -> None:
    signer = DkimSigner(DOMAIN, "s1", key_pem, process=True)
    assert signer.signing == "process"
    config = sink_smtp(sink, sender=f"campaigns@{DOMAIN}")
    sender = SmtpEmailSender(config, signer=signer)
    messages = [
        EmailMessage(
            to=f"c{i}@example.com",
            subject=f"Hello {i}",
            text=f"Hello {i}\n",
            html=None,
            message_id=f"<p.{i}@{DOMAIN}>",
            headers=(("List-Unsubscribe", f"<https://m.{DOMAIN}/u/{i}>"),),
        )
        for i in range(20)
    ]
    await asyncio.gather(*(sender.send(m) for m in messages))
    assert signer.process is not None
    pid = signer.process.pid
    assert pid is not None
    assert pid != os.getpid()
    assert signer.process.starts == 1
    assert signer.process.failures == 0
    await sender.aclose()  # the sender owns its signer: its child goes with it
    assert signer.process.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert len(sink.messages) == 20
    assert all(verifies(signer, m.raw) for m in sink.messages)


async def test_the_child_gets_no_secret_on_its_command_line_or_in_its_environment(
    key_pem: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", "hunter2-not-for-the-child")
    signer = DkimSigner(DOMAIN, "s1", key_pem, process=True)
    try:
        assert verifies(signer, await signer.sign_off_loop(raw(1)))
        assert signer.process is not None
        assert signer.process.pid is not None
        proc = Path(f"/proc/{signer.process.pid}")
        cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
    finally:
        await signer.aclose()
    assert b"reactor.adapters.dkim_process" in cmdline
    for secret in (b"hunter2", b"PRIVATE KEY", key_pem[40:80]):
        assert secret not in cmdline
        assert secret not in environ


async def test_a_killed_child_loses_no_signature_and_is_restarted_after_the_backoff(
    key_pem: bytes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dkim_process, "RESTART_BACKOFF_S", 0.3)
    signer = DkimSigner(DOMAIN, "s1", key_pem, process=True)
    process = signer.process
    assert process is not None
    try:
        await signer.sign_off_loop(raw(0))
        pid = process.pid
        assert pid is not None
        burst = [asyncio.ensure_future(signer.sign_off_loop(raw(i))) for i in range(1, 60)]
        await asyncio.sleep(0)  # the burst is written to the child
        os.kill(pid, signal.SIGKILL)
        with caplog.at_level(logging.WARNING, logger=dkim_process.__name__):
            signed = await asyncio.gather(*burst)
            # Within the backoff the parent signs: no new child.
            assert verifies(signer, await signer.sign_off_loop(raw(99)))
            assert process.starts == 1
            assert await logged(caplog, "DKIM signing process exited (exit code -9)")
        assert process.failures == 1
        assert all(verifies(signer, m) for m in signed)
        assert [m.endswith(raw(i)) for i, m in enumerate(signed, 1)] == [True] * 59
        await asyncio.sleep(0.35)
        assert verifies(signer, await signer.sign_off_loop(raw(100)))
        assert process.starts == 2
        assert process.pid not in (None, pid)
    finally:
        await signer.aclose()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("exit 3", "exited (exit code 3)"),
        ("printf 'garbage!'; cat > /dev/null", "answered something that is not a frame"),
        ("cat > /dev/null", "did not answer within"),
    ],
)
async def test_a_child_that_dies_stalls_or_answers_garbage_is_replaced_by_the_parent(
    key_pem: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    body: str,
    why: str,
) -> None:
    monkeypatch.setattr(dkim_process, "SIGN_TIMEOUT_S", 0.5)
    children = record_children(monkeypatch)
    signer = DkimSigner(DOMAIN, "s1", key_pem, process=True)
    assert signer.process is not None
    signer.process.python = fake_child(tmp_path, body)
    try:
        with caplog.at_level(logging.WARNING, logger=dkim_process.__name__):
            signed = await asyncio.gather(*(signer.sign_off_loop(raw(i)) for i in range(5)))
            assert await logged(caplog, why)
        assert all(verifies(signer, m) for m in signed)
        assert signer.process.failures == 1
    finally:
        await signer.aclose()
    # Every child given up on is reaped and its pipe closed, even one whose own child still
    # holds the other end (the stalled shell's `cat`): nothing is left to the garbage collector.
    assert len(children) == 1
    assert all(c.returncode is not None for c in children)
    assert all(c.stdin is not None and c.stdin.is_closing() for c in children)


async def test_a_stalled_child_is_killed_and_reaped_before_aclose_returns(
    key_pem: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race CI once lost: the signer gave up on a stalled child, killed it, and the test's
    loop closed before anything reaped it; the child's transport then warned from the garbage
    collector in a later test. Signing inline, nothing yields between the kill and `aclose`."""
    monkeypatch.setattr(dkim_process, "SIGN_TIMEOUT_S", 0.3)
    children = record_children(monkeypatch)
    signer = DkimSigner(DOMAIN, "s1", key_pem, threaded=False, process=True)
    assert signer.process is not None
    signer.process.python = fake_child(tmp_path, "cat > /dev/null")
    assert verifies(signer, await signer.sign_off_loop(raw(1)))
    await signer.aclose()
    (child,) = children
    assert child.returncode == -signal.SIGKILL
    assert child.stdin is not None
    assert child.stdin.is_closing()


async def test_a_child_that_cannot_be_started_leaves_the_signing_to_the_parent(
    key_pem: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    signer = DkimSigner(DOMAIN, "s1", key_pem, process=True)
    assert signer.process is not None
    signer.process.python = "/nonexistent/python3"
    with caplog.at_level(logging.WARNING, logger=dkim_process.__name__):
        assert verifies(signer, await signer.sign_off_loop(raw(1)))
    assert signer.process.failures == 1
    assert signer.process.starts == 0
    assert "could not be started" in caplog.text
    await signer.aclose()


def test_the_child_answers_each_frame_and_reports_a_failure_to_its_caller(key_pem: bytes) -> None:
    """The child's loop on its own: a signature before the key is an error for that request,
    the ones after it are signatures, in order, and EOF ends it."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    frames = [
        ("sign", 7, raw(7)),
        ("key", DOMAIN, "s1", key_pem),
        ("sign", 8, raw(8)),
        ("sign", 9, raw(9)),
    ]
    os.write(to_child_w, b"".join(dkim_process._frame(f) for f in frames))
    os.close(to_child_w)
    assert dkim_process.child_main(to_child_r, from_child_w) == 0
    os.close(from_child_w)
    out = bytearray()
    while chunk := os.read(from_child_r, 1 << 16):
        out += chunk
    replies: list[Any] = dkim_process._frames(out)
    assert out == b""
    assert [(r[0], r[1]) for r in replies] == [(7, False), (8, True), (9, True)]
    assert "no key" in replies[0][2]
    signer = DkimSigner(DOMAIN, "s1", key_pem)
    assert verifies(signer, replies[1][2] + raw(8))
    assert verifies(signer, replies[2][2] + raw(9))
    assert pickle.loads(pickle.dumps(replies)) == replies


async def test_a_failure_the_child_reports_is_a_dkim_key_error(
    key_pem: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = DkimSigner(DOMAIN, "s1", key_pem, process=True)
    assert signer.process is not None

    async def refused(message: bytes) -> tuple[bool, str]:
        return False, "DKIM signing for reactor.example failed: bad message"

    monkeypatch.setattr(signer.process, "signature", refused)
    with pytest.raises(DkimKeyError, match="bad message"):
        await signer.sign_off_loop(raw(1))
