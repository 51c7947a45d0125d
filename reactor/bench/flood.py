"""The consent bench's flood, in a process of its own (so its CPU is not the reactor's): it
holds connections open to the public port the way a slow client does (a request line and a
header, never the blank line; reopened whenever the server lets one go) and sends requests at
a fixed rate, each with a forged link token. It prints `holding N` about once a second, and
when its standard input closes, one JSON line of what it did.

    python -m reactor.bench.flood --port P --held 2000 --rate 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import sys
from collections import Counter
from typing import Any

import aiohttp

MAX_IN_FLIGHT = 512


class Flood:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.holding = 0
        self.reopened = 0
        self.connect_errors = 0
        self.statuses: Counter[str] = Counter()
        self.skipped = 0  # requests not sent because MAX_IN_FLIGHT were outstanding
        self.stop = asyncio.Event()
        self.started_at = 0.0

    async def hold(self) -> None:
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.connect_errors += 1
                await asyncio.sleep(0.2)
                continue
            self.holding += 1
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n")
                await writer.drain()
                await reader.read()  # until the server closes it (its header deadline)
            except OSError:
                pass
            finally:
                self.holding -= 1
                writer.close()
            self.reopened += 1

    async def requests(self, rate: float) -> None:
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
        timeout = aiohttp.ClientTimeout(total=10)
        in_flight: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            next_at = loop.time()
            while not self.stop.is_set():
                next_at += 1.0 / rate
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    self.skipped += 1
                    continue
                task = asyncio.create_task(self._one(http))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            for task in list(in_flight):
                task.cancel()

    async def _one(self, http: aiohttp.ClientSession) -> None:
        token = f"v1.k1.{secrets.token_urlsafe(24)}.{secrets.token_urlsafe(32)}"
        try:
            async with http.get(f"http://{self.host}:{self.port}/u/{token}") as resp:
                await resp.read()
                self.statuses[str(resp.status)] += 1
        except (aiohttp.ClientError, TimeoutError):
            self.statuses["error"] += 1

    def summary(self) -> dict[str, Any]:
        elapsed = asyncio.get_running_loop().time() - self.started_at
        answered = sum(self.statuses.values())
        return {
            "answered_per_s": round(answered / elapsed, 1) if elapsed > 0 else 0.0,
            "holding": self.holding,
            "reopened": self.reopened,
            "connect_errors": self.connect_errors,
            "statuses": dict(self.statuses),
            "skipped": self.skipped,
        }


async def _main(port: int, held: int, rate: float) -> None:
    # The attacker's CPU is not the reactor's: on a machine of its own it would not compete
    # with the reactor and its database, so here it yields to them (and reports the rate it
    # reached, which the bench checks).
    os.nice(19)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, held + 2 * MAX_IN_FLIGHT + 256)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    flood = Flood("127.0.0.1", port)
    tasks = []
    for i in range(held):
        tasks.append(asyncio.create_task(flood.hold()))
        if i % 100 == 99:
            await asyncio.sleep(0.05)  # ramp up: the listen backlog is finite
    tasks.append(asyncio.create_task(flood.requests(rate)))
    loop = asyncio.get_running_loop()
    eof = loop.run_in_executor(None, sys.stdin.read)
    while not eof.done():
        print(f"holding {flood.holding}", flush=True)
        await asyncio.wait([eof], timeout=1.0)
    flood.stop.set()
    summary = flood.summary()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(summary), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m reactor.bench.flood")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--held", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0)
    args = parser.parse_args()
    asyncio.run(_main(args.port, args.held, args.rate))


if __name__ == "__main__":
    main()
