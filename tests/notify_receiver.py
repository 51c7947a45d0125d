"""A notification receiver on loopback (aiohttp) that tests and the bench count events at: it
records every request, can fail the next N, answer a fixed status, or hold requests open."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived

    @property
    def payload(self) -> Any:
        return json.loads(self.body)

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class Receiver:
    url: str = ""
    received: list[Received] = field(default_factory=list)
    fail_next: int = 0
    status: int = 200
    hold: asyncio.Event | None = None
    holding: int = 0

    def unique(self) -> list[Received]:
        """What a receiver that drops repeats by webhook-id keeps, in arrival order."""
        seen: set[str] = set()
        out = []
        for r in self.received:
            if r.id not in seen:
                seen.add(r.id)
                out.append(r)
        return out

    def types(self) -> list[str]:
        return [r.payload.get("type") for r in self.unique()]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hold is not None:
            self.holding += 1
            await self.hold.wait()
        self.received.append(Received(dict(request.headers.items()), body, time.time()))
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="down for a while")
        return web.Response(status=self.status, text="ok")


@asynccontextmanager
async def receiver(path: str = "/hook") -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post(path, rec._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}{path}"
    try:
        yield rec
    finally:
        if rec.hold is not None:
            rec.hold.set()
        await runner.cleanup()
