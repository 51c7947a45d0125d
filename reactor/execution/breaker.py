"""A per-channel breaker: when a channel fails the same way for recipient after recipient (the
SMTP server refuses connections or TLS, the credentials are wrong, Twilio answers 5xx), what is
broken is the channel, not the audience. The breaker then pauses the channel — nothing new is
handed to its provider and the sends under way are given back unsent, their rows unmarked — so
that an outage does not burn every customer as `failed`. After a pause one probe goes out: its
success closes the breaker, its failure pauses again for twice as long.

    closed ──(THRESHOLD channel-wide failures in a row)──► open ──(pause over)──► probing
       ▲                                                     ▲                       │
       └──────────────────── probe succeeds ─────────────────┴──── probe fails ──────┘

One breaker per channel per instance, shared by every campaign the instance sends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

THRESHOLD = 5
FIRST_PAUSE_S = 5.0
MAX_PAUSE_S = 300.0


class ChannelBreaker:
    def __init__(
        self,
        channel: str,
        monotonic: Callable[[], float],
        *,
        threshold: int = THRESHOLD,
        first_pause_s: float = FIRST_PAUSE_S,
        max_pause_s: float = MAX_PAUSE_S,
    ) -> None:
        self.channel = channel
        self._monotonic = monotonic
        self.threshold = threshold
        self.first_pause_s = first_pause_s
        self.max_pause_s = max_pause_s
        self.consecutive = 0
        self.kind: str | None = None  # the kind of failure counted / that opened it
        self.last_error = ""
        self.open = False
        self.reopen_at_m = 0.0
        self.pause_s = first_pause_s
        self.probing = False  # the one probe send is under way

    # ---- what may go out -----------------------------------------------------------------------

    def room(self, wanted: int) -> int:
        """How many of `wanted` new sends may start now: all while closed, one probe once a
        pause is over, none otherwise."""
        if not self.open:
            return wanted
        if self.probing or self._monotonic() < self.reopen_at_m or wanted <= 0:
            return 0
        self.probing = True
        return 1

    def wait_s(self) -> float:
        """Seconds until a send may start again (0 when closed)."""
        if not self.open:
            return 0.0
        return max(0.0, self.reopen_at_m - self._monotonic())

    # ---- what came back --------------------------------------------------------------------

    def succeeded(self) -> bool:
        """A send went through. True if that closed the breaker."""
        self.consecutive = 0
        self.kind = None
        if not self.open:
            return False
        self.open = self.probing = False
        self.pause_s = self.first_pause_s
        log.warning("✅ %s channel resumed: the probe went through", self.channel)
        return True

    def failed(self, kind: str, error: str) -> bool:
        """A channel-wide failure. True if it opened the breaker (or re-opened it)."""
        self.last_error = error
        if self.open:
            if not self.probing:
                return False  # a send that started before the pause
            self.probing = False
            self.pause_s = min(self.pause_s * 2, self.max_pause_s)
            self._pause()
            return True
        self.consecutive = self.consecutive + 1 if kind == self.kind else 1
        self.kind = kind
        if self.consecutive < self.threshold:
            return False
        self.open = True
        self._pause()
        return True

    def _pause(self) -> None:
        self.reopen_at_m = self._monotonic() + self.pause_s
        log.warning(
            "⛔ %s channel paused after %d %s failures in a row (%s); probing again in %gs",
            self.channel,
            self.consecutive,
            self.kind,
            self.last_error,
            self.pause_s,
        )

    @property
    def reason(self) -> str:
        return f"{self.consecutive} {self.kind} failures in a row: {self.last_error}"
