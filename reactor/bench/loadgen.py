"""An open-loop HTTP load generator, run in its own process so that what it costs is not the
measured service's: `python -m reactor.bench.loadgen SPEC OUT`. SPEC is JSON
{"rate": per_s, "requests": [[url, "form"|"json"|"get", body, headers], ...]} ("get": a tracked
link, whose 3xx is a success); each request is sent at its scheduled instant (start + i / rate)
whether or not earlier ones were answered, and its latency is measured from that instant, so
queueing counts. OUT receives
{"latencies_s": [...], "arrivals_s": [...], "errors": n, "elapsed_s": s}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp


async def generate(rate: float, requests: list[list[Any]]) -> dict[str, Any]:
    latencies: list[float] = []
    arrivals: list[float] = []
    indices: list[int] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(
            i: int, at: float, url: str, kind: str, body: Any, headers: dict[str, str]
        ) -> None:
            nonlocal errors
            try:
                if kind == "get":  # a tracked link: its redirect is the answer
                    ctx = http.get(url, headers=headers, allow_redirects=False)
                elif kind == "json":
                    ctx = http.post(url, json=body, headers=headers)
                else:
                    ctx = http.post(url, data=body, headers=headers)
                async with ctx as resp:
                    await resp.read()
                    if resp.status >= (400 if kind == "get" else 300):
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - at)
            arrivals.append(at)
            indices.append(i)

        tasks: set[asyncio.Task[None]] = set()
        t0 = time.perf_counter() + 0.1
        for i, (url, kind, body, headers) in enumerate(requests):
            at = t0 + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, at, url, kind, body, headers))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.wait(list(tasks))
        elapsed = time.perf_counter() - t0
    return {
        "latencies_s": latencies,
        "arrivals_s": arrivals,
        "indices": indices,
        "errors": errors,
        "elapsed_s": elapsed,
    }


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = asyncio.run(generate(float(spec["rate"]), spec["requests"]))
    Path(sys.argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
