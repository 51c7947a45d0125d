"""DKIM signing in a helper process: `SigningProcess` hands each message to a child Python
(`python -m reactor.adapters.dkim_process`) that signs it with dkimpy and returns the
DKIM-Signature header.

Why a process: OpenSSL's RSA releases the GIL, but dkimpy's parsing, canonicalization and hashing
are Python, so a signing thread still takes turns with the event loop on one core (a third of a
signature's time, on the loop's own core, when nothing else is left to overlap). A child has a GIL
and a core of its own; what the loop pays per message is one frame written to a pipe and one
read back.

The protocol is length-prefixed pickles over the child's stdin and stdout, between two processes
of this package (nothing else writes to those pipes): first the key (the PEM goes through the
pipe, never argv or the environment, and the child gets none of the parent's environment but
what Python needs to start), then `(request id, message)` frames, answered in order by
`(request id, ok, signature or error)`. The child ignores SIGINT and SIGTERM and exits when its
stdin closes: its parent decides when it ends, and a parent killed outright closes the pipe too.

When the child cannot be started, dies, or answers garbage, every signature it owed is made by
the caller instead (`signature` returns None and `DkimSigner` signs in its thread or inline), the
failure is logged once, and no new child is tried for RESTART_BACKOFF_S: a message is never lost
or left unsigned because the helper went away.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import signal
import struct
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 10.0
STOP_TIMEOUT_S = 2.0
SIGN_TIMEOUT_S = 10.0  # a signature takes under a millisecond: a child this late is stuck
MAX_FRAME = 64 << 20
_HEADER = struct.Struct("!I")
# What the child needs to start Python from the same installation; nothing else (no secrets).
_CHILD_ENV = ("PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LANG", "LC_ALL", "TMPDIR")


class _Gone(Exception):
    """The child went away before it answered."""


def _frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class SigningProcess:
    """One child process signing with one key, started on first use in the running event loop
    and stopped by `aclose` (a child from another event loop is killed on first use in a new
    one)."""

    def __init__(self, domain: str, selector: str, key_pem: bytes) -> None:
        self._key = ("key", domain, selector, key_pem)
        self.python = sys.executable
        self._proc: asyncio.subprocess.Process | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # One reader per child started and not yet reaped: it reaps its child, whichever way the
        # child ended, and `aclose` waits for them all (a killed child's pipes are closed too).
        self._readers: set[asyncio.Task[None]] = set()
        self._starting: asyncio.Task[asyncio.subprocess.Process | None] | None = None
        self._pending: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self._ids = itertools.count()
        self._down_until = 0.0
        self._outbox: list[bytes] = []  # frames written together once per loop iteration
        self.starts = 0  # children started, for tests and the bench
        self.failures = 0  # children that could not start or went away

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def signature(self, message: bytes) -> tuple[bool, Any] | None:
        """(True, the DKIM-Signature header) or (False, the child's error message); None when
        the child is unavailable and the caller must sign itself."""
        if time.monotonic() < self._down_until:
            return None
        proc = await self._running()
        if proc is None or proc.stdin is None:
            return None
        loop = asyncio.get_running_loop()
        request = next(self._ids)
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        self._pending[request] = future
        try:
            if not self._outbox:
                loop.call_soon(self._flush)
            self._outbox.append(_frame(("sign", request, message)))
            async with asyncio.timeout(SIGN_TIMEOUT_S):
                return await future
        except TimeoutError:
            self._stuck(proc)
            return None
        except (_Gone, ConnectionError, RuntimeError):
            return None
        finally:
            self._pending.pop(request, None)

    def _flush(self) -> None:
        """Write the frames queued this loop iteration to the child now running. A frame of a
        child that went away meanwhile was failed with it: if a successor reads it, its answer
        names a request nobody waits for, and is dropped."""
        frames, self._outbox = self._outbox, []
        proc = self._proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(b"".join(frames))

    async def _running(self) -> asyncio.subprocess.Process | None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._abandon()
            self._loop = loop
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return proc
        if self._starting is None:
            self._starting = loop.create_task(self._start())
        try:
            return await asyncio.shield(self._starting)
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def _start(self) -> asyncio.subprocess.Process | None:
        env = {k: os.environ[k] for k in _CHILD_ENV if k in os.environ}
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "reactor.adapters.dkim_process",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            self._failed(f"could not be started ({exc})")
            return None
        assert proc.stdin is not None
        proc.stdin.write(_frame(self._key))
        self.starts += 1
        self._proc = proc
        reader = asyncio.get_running_loop().create_task(self._read(proc))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        return proc

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        why, running = "exited", False
        buffer = bytearray()
        try:
            # Whatever has arrived, at once: the child answers in bursts, one wake-up each.
            while chunk := await proc.stdout.read(1 << 20):
                buffer += chunk
                for request, ok, payload in _frames(buffer):
                    future = self._pending.get(request)
                    if future is not None and not future.done():
                        future.set_result((bool(ok), payload))
        except ConnectionError:
            pass
        except (pickle.UnpicklingError, ValueError, TypeError, struct.error) as exc:
            why = f"answered something that is not a frame ({type(exc).__name__})"
            running = True
        if self._proc is not proc:
            # Closed (its stdin is), or killed after it stalled: reap it here.
            await proc.wait()
            return
        self._proc = None
        self._down()
        self._fail_pending()
        # A child whose stdout closed is exiting: it is waited for, not killed. (Killing polls
        # the process first, which can reap it ahead of the event loop's child watcher; the
        # watcher then reports exit code 255 for a child it never saw end.)
        if running:
            _release(proc)
        elif proc.stdin is not None:
            proc.stdin.close()
        try:
            code = await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:  # it closed its stdout and lives on
            _release(proc)
            code = await proc.wait()
        self._log(f"{why} (exit code {code})")

    def _stuck(self, proc: asyncio.subprocess.Process) -> None:
        if self._proc is not proc:
            return  # already given up on (its reader or another caller failed what it owed)
        self._proc = None
        _release(proc)  # its reader reaps it
        self._failed(f"did not answer within {SIGN_TIMEOUT_S:.0f} s and was killed")
        self._fail_pending()

    def _failed(self, why: str) -> None:
        self._down()
        self._log(why)

    def _down(self) -> None:
        """No new child for RESTART_BACKOFF_S: the callers sign meanwhile."""
        self.failures += 1
        self._down_until = time.monotonic() + RESTART_BACKOFF_S

    def _log(self, why: str) -> None:
        log.warning(
            "the DKIM signing process %s; signing in this process for the next %.0f s",
            why,
            RESTART_BACKOFF_S,
        )

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_Gone())
        self._pending.clear()

    def _abandon(self) -> None:
        """A child started by another event loop: its pipes belong to that loop."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill(proc)
        self._readers = set()  # they belong to the other loop, which reaps nothing any more
        self._starting = None
        self._pending.clear()

    async def aclose(self) -> None:
        """Close the child's stdin (it exits), kill it if it has not within STOP_TIMEOUT_S, and
        wait until every child this loop started is reaped, with its pipes closed."""
        proc, self._proc = self._proc, None
        here = self._loop is asyncio.get_running_loop()
        if proc is not None and not here:
            _kill(proc)
            return
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                _kill(proc)
                await proc.wait()
        if here and self._readers:
            _, late = await asyncio.wait(set(self._readers), timeout=STOP_TIMEOUT_S)
            for reader in late:  # a child that is killed and still not reaped: give up on it
                reader.cancel()
            await asyncio.gather(*late, return_exceptions=True)  # ended, not left pending
        self._fail_pending()


def _release(proc: asyncio.subprocess.Process) -> None:
    """Kill a child given up on and close its stdin (a grandchild may still hold the pipe's other
    end: the transport stays open until this end is closed)."""
    _kill(proc)
    if proc.stdin is not None:
        proc.stdin.close()


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except (ProcessLookupError, RuntimeError):
            pass


def _frames(buffer: bytearray) -> list[Any]:
    """The complete frames at the start of `buffer`, removed from it."""
    out, at = [], 0
    while len(buffer) - at >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer, at)
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes")
        end = at + _HEADER.size + size
        if end > len(buffer):
            break
        out.append(pickle.loads(memoryview(buffer)[at + _HEADER.size : end]))
        at = end
    del buffer[:at]
    return out


# ---- the child ----------------------------------------------------------------------------------


def child_main(stdin_fd: int, stdout_fd: int) -> int:
    """Sign what the parent sends until its pipe closes: every frame that has arrived, then
    their answers in one write."""
    from .dkim import DkimSigner  # the child's own import: the parent's module needs none

    signer: DkimSigner | None = None
    buffer = bytearray()
    while chunk := os.read(stdin_fd, 1 << 20):
        buffer += chunk
        replies = []
        for frame in _frames(buffer):
            if frame[0] == "key":
                _, domain, selector, pem = frame
                signer = DkimSigner(domain, selector, pem, threaded=False)
                continue
            _, request, message = frame
            try:
                if signer is None:
                    raise ValueError("no key was sent before the first message")
                replies.append(_frame((request, True, signer.signature(message))))
            except Exception as exc:  # one message's failure, for its caller
                replies.append(_frame((request, False, str(exc))))
        out = memoryview(b"".join(replies))
        while out:
            out = out[os.write(stdout_fd, out) :]
    return 0


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    frames = os.dup(1)
    os.dup2(2, 1)  # a stray print lands on stderr, never inside a frame
    return child_main(0, frames)


if __name__ == "__main__":
    raise SystemExit(main())
