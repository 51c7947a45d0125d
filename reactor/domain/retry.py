"""Retry policy: exponential backoff with full jitter, capped, honouring a provider's Retry-After."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_s: float = 0.5
    max_s: float = 30.0

    def delay_s(
        self, attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Delay before attempt `attempt + 1`, where `attempt` counts from 1 (the first failure)."""
        ceiling = min(self.max_s, self.base_s * (2 ** (attempt - 1)))
        jittered = (rng or random).uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            return max(min(retry_after_s, self.max_s * 4), jittered)
        return jittered

    def should_retry(self, attempt: int) -> bool:
        return attempt < self.max_attempts
