"""Execution: sends one claimed campaign to its audience, exactly once per (channel, customer).

registry.py   Executor: the runs on this instance (start, heartbeat, stop, stop all)
run.py        CampaignRun: one campaign from its claim to sendsDone (batches, channels,
              leftovers of an earlier owner, window close, finish)
window.py     SendWindow: one channel's sends, bounded and batched into few ledger writes
deliver.py    Deliverer: one message with its retries
ledger.py     LedgerWriter: outcomes, pending marks and live counters, fenced by the epoch
state.py      Run and StopReason: what a run carries and how it is told to stop
"""

from .registry import Executor
from .state import Run, StopReason

__all__ = ["Executor", "Run", "StopReason"]
