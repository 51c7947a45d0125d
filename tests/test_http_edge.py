"""The operator port as an exposed port must behave: half-open requests are dropped after the
header deadline, a malformed request is one log line without a traceback, no version leaks."""

from __future__ import annotations

import asyncio
import logging

import pytest

from reactor.http import HEADER_TIMEOUT_S, OpsServer
from reactor.metrics import Metrics


async def ready() -> dict[str, bool]:
    return {"mongodb": True}


async def test_half_open_requests_are_dropped_after_the_header_deadline() -> None:
    server = OpsServer(Metrics(), ready, "127.0.0.1", 0)
    await server.start()
    try:
        conns = []
        for _ in range(40):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            await writer.drain()
            conns.append((reader, writer))
        closed = await asyncio.wait_for(
            asyncio.gather(*(r.read() for r, _ in conns)), HEADER_TIMEOUT_S + 3
        )
        assert closed == [b""] * 40  # every one closed by the server, without an answer
        for _, w in conns:
            w.close()
        # A well-formed request is still served.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert b"aiohttp" not in answer
        assert b"Python" not in answer
    finally:
        await server.stop()


async def test_a_malformed_request_is_one_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = OpsServer(Metrics(), ready, "127.0.0.1", 0)
    await server.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="reactor.http"):
            for garbage in (
                b"GET /\x00\x1b[31mevil HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 10_000 + b"\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(garbage)
                answer = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                assert answer.split(b" ", 2)[1].startswith(b"4")  # a 4xx answer
                assert b"aiohttp" not in answer
        records = [r for r in caplog.records if r.name.startswith("reactor.http")]
        assert records
        for record in records:
            assert record.exc_info is None
            assert "\n" not in record.getMessage()
            assert "\x1b" not in record.getMessage()
            assert "aaaa" * 40 not in record.getMessage()
    finally:
        await server.stop()
