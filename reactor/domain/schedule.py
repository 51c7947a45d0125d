"""What timers a campaign wants, and what firing one should do — pure functions of (campaign, now).

The scheduler arms exactly what `desired_timers` returns; the claim logic asks `start_decision`
whether a due start should run, be recorded as missed, or was already handled elsewhere.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from .models import Campaign, Status


class TimerKind(StrEnum):
    START = "start"
    END = "end"
    DECIDE = "decide"  # an A/B split's decision (issue 25)


@dataclass(frozen=True, order=True)
class TimerKey:
    campaign: str
    kind: TimerKind


@dataclass(frozen=True)
class Timer:
    key: TimerKey
    due_at: dt.datetime


# Statuses whose schedule the reactor acts on; every other status wants no timer.
ACTIVE = frozenset({Status.APPROVED, Status.RUNNING, Status.PAUSED})


def desired_timers(campaign: Campaign, now: dt.datetime, horizon_s: float) -> list[Timer]:
    """Timers the campaign wants now. Instants past the horizon are left to a later sweep; instants
    in the past are due at once (the claim decides whether that is late or missed)."""
    horizon_at = now + dt.timedelta(seconds=horizon_s)
    due: list[Timer] = []
    if campaign.status is Status.APPROVED:
        if campaign.start_at <= horizon_at:
            due.append(Timer(TimerKey(campaign.key, TimerKind.START), campaign.start_at))
    elif campaign.status in (Status.RUNNING, Status.PAUSED) and campaign.end_at <= horizon_at:
        due.append(Timer(TimerKey(campaign.key, TimerKind.END), campaign.end_at))
    decide_at = decision_due(campaign)
    if decide_at is not None and decide_at <= horizon_at:
        due.append(Timer(TimerKey(campaign.key, TimerKind.DECIDE), decide_at))
    return due


def decision_due(campaign: Campaign) -> dt.datetime | None:
    """When a split campaign's decision is due: while it runs (a pause defers it) and no
    result is written yet, at startDate + decideAfterMinutes, before the window closes; while
    a decider's claim holds, when its lease ends (it may have died)."""
    split = campaign.split
    if split is None or split.ab.result is not None or campaign.status is not Status.RUNNING:
        return None
    decide_at = split.decide_at(campaign.start_at)
    if decide_at >= campaign.end_at:
        return None
    claimed = split.ab.claimed_until
    return max(decide_at, claimed) if claimed is not None else decide_at


class StartDecision(StrEnum):
    RUN = "run"
    MISSED = "missed"  # past the misfire grace, or the window already closed
    NOT_DUE = "not_due"


def start_decision(
    start_at: dt.datetime, end_at: dt.datetime, now: dt.datetime, grace_s: float
) -> StartDecision:
    if now < start_at:
        return StartDecision.NOT_DUE
    if end_at <= now:
        return StartDecision.MISSED
    if (now - start_at).total_seconds() > grace_s:
        return StartDecision.MISSED
    return StartDecision.RUN


def wants_takeover(campaign: Campaign, now: dt.datetime) -> bool:
    """A running campaign whose owner is gone (lease expired or released) with sends left to do
    inside its window: any replica may claim it from the old epoch and resume from the ledger."""
    return (
        campaign.status is Status.RUNNING
        and not campaign.execution.sends_done
        and campaign.end_at > now
        and campaign.execution.lease_expired(now)
    )
