"""Barriers: markers written to the database that the change stream carries back, so a sweep can
tell what the stream really missed from what it simply had not delivered yet."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import anyio

from ..ports import ChangeFeed


class Barriers:
    """Markers written to the database that the change stream carries back: once one arrives,
    every change made before it has been applied. The watcher delivers them; the reconciler
    waits on them before judging what the stream missed."""

    def __init__(self, feed: ChangeFeed) -> None:
        self._feed = feed
        self._waiting: dict[str, anyio.Event] = {}
        self.up = False  # the stream is open: a barrier can arrive

    async def wait(self, timeout_s: float = 5.0) -> bool:
        """Write a marker and wait for the stream to deliver it; False if it did not in time."""
        if not self.up:
            return False
        nonce = uuid.uuid4().hex
        arrived = self._waiting[nonce] = anyio.Event()
        try:
            await self._feed.write_barrier(nonce)
            with anyio.move_on_after(timeout_s):
                await arrived.wait()
        finally:
            self._waiting.pop(nonce, None)
        return arrived.is_set()

    def arrived(self, event: Mapping[str, Any]) -> None:
        nonce = (event.get("fullDocument") or {}).get("nonce")
        if nonce in self._waiting:
            self._waiting[nonce].set()
