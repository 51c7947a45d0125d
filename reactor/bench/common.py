"""Shared helpers for benchmarks: percentiles, subprocess services, machine description."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import socket
import statistics
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any


def free_port() -> int:
    """A port nothing listens on now (for a listener whose URL must be known before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p99/max of durations given in seconds, in milliseconds."""
    ms = [v * 1000 for v in values]
    return {
        "p50_ms": round(percentile(ms, 0.5), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(max(ms), 3) if ms else float("nan"),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
        "n": len(ms),
    }


class Steal:
    """CPU time the hypervisor gave to others while this VM wanted it (`steal` in
    /proc/stat), as a percentage of all CPU time over a phase. On a shared 2-vCPU VM it rises
    when both vCPUs are busy, so a phase that also loads the database's core is slowed by the
    host, not only by its own work. None where /proc/stat is not readable."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (fields[7] if len(fields) > 7 else 0), sum(fields)

    def pct(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        return round(100 * (end[0] - self._start[0]) / (end[1] - self._start[1]), 1)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process `pid` has used so far, from /proc/PID/stat; None
    where that is not readable. A process's own figure: not the bench's, nor the database's."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command's ")": state is field 3, utime 14 and stime 15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@contextlib.asynccontextmanager
async def emulator_process() -> AsyncIterator[str]:
    """`reactor mongo-emulator` in its own process (so its CPU is not the client's)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reactor",
        "mongo-emulator",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"emulator did not start: {line!r}")
    try:
        yield line.split(" ", 1)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:  # a figure measured is not lost to a slow exit
                proc.kill()
                await proc.wait()
