"""The notification settings the components take (derived from `Settings.notify_config()`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NotifySmtp:
    """Where admin emails go: NOTIFY_SMTP_* if set, else the campaign relay's settings."""

    host: str
    port: int
    sender: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: str = "starttls"
    timeout_s: float = 30.0


@dataclass(frozen=True)
class NotifyConfig:
    enabled: bool = True
    # Destinations from the environment, as documents like the collection's (see destinations).
    defaults: tuple[dict[str, Any], ...] = field(default=(), repr=False)  # secrets inside
    allow_private: bool = False
    allow_loopback: bool = False  # a sidecar on 127.0.0.1/::1 (tests, the demo)
    timeout_s: float = 10.0  # one delivery attempt, connect to last byte
    concurrency: int = 8  # deliveries in flight per instance
    lease_s: float = 60.0  # a claimed delivery is another instance's after this
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    retry_for_s: float = 86400.0  # then `dead`
    poll_s: float = 0.5  # how often an instance looks for deliveries others emitted
    reload_s: float = 5.0  # how often destinations are re-read
    stats_s: float = 10.0
    start_late_s: float = 30.0  # approved and due but not running this long after startDate
    scan_s: float = 10.0  # how often the late-start scan runs
    progress_every_percent: int = 0  # 0: no progress events
    failure_spike_share: float = 0.2
    failure_spike_min: int = 20
    failure_spike_window_s: float = 300.0
    response_cap_bytes: int = 64 * 1024
    smtp: NotifySmtp | None = None
