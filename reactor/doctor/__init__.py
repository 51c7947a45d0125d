"""`reactor doctor`: the old `test-campaign-execution.js`, done properly.

It checks the configuration (secrets redacted), MongoDB connectivity, the replica set and change
streams, the reactor's indexes, the segmentation database and its field names, the channels (and,
with --probe, that SMTP and Twilio answer), then lists approved campaigns waiting (and which
would be missed), running ones (owner, lease, progress) and recent failures, and ends with
recommendations. Exit code 0 when healthy, 1 when something is wrong.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict

from rich.console import Console

from ..config import Settings
from .checks import diagnose
from .report import Check, Report, printable, redact_url, redacted_configuration, render

__all__ = [
    "Check",
    "Report",
    "diagnose",
    "printable",
    "redact_url",
    "redacted_configuration",
    "render",
    "run_doctor",
]


def run_doctor(
    settings: Settings, *, as_json: bool = False, probe: bool = False, senders: bool = False
) -> int:
    if senders:  # the sending identities' pre-flight only (issue 27)
        from .senders import diagnose_senders

        report = asyncio.run(diagnose_senders(settings))
    else:
        report = asyncio.run(diagnose(settings, probe=probe))
    if as_json:
        payload = asdict(report)
        payload["healthy"] = report.healthy
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        render(report, Console(width=140))
    return 0 if report.healthy else 1
