"""Sampled warning lines for what a flood can repeat without limit (refused links, refused
webhook calls): every one is counted in its metric by the caller, and at most one line per
reason per interval is written, saying how many were left unwritten since the last one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

SAMPLE_INTERVAL_S = 10.0
MAX_KEYS = 256  # reasons are few; a cap keeps a bug from growing this without bound


class SampledLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = SAMPLE_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._monotonic = monotonic
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Write `msg % args` if no line for `key` was written in the interval (with the
        number left unwritten since); True when it was written."""
        now = self._monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return False
        if len(self._last) >= MAX_KEYS and key not in self._last:
            self._last.clear()
            self._skipped.clear()
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        if skipped:
            self._log.warning(msg + " (and %d more like it since the last line)", *args, skipped)
        else:
            self._log.warning(msg, *args)
        return True
