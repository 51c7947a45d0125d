"""Test doubles: a clock that tests drive by hand, and in-memory stand-ins for the ports."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio

from reactor.domain.deliveries import (
    SUPPRESSED,
    SUPPRESSED_PREFIX,
    DeliveryRecord,
    DeliveryState,
    LedgerOp,
    RowState,
    delivery_id,
)
from reactor.domain.models import target_problem
from reactor.ports import Recipient


async def settle(spins: int = 2000) -> None:
    """Let every other task run until it blocks again. anyio's wait_all_tasks_blocked() polls
    every 100 ms of real time, which makes each fake wake-up cost that much; yielding until all
    tasks wait on a pending future costs microseconds. Falls back to anyio's wait if tasks keep
    running (real I/O in flight)."""
    me = asyncio.current_task()
    for _ in range(spins):
        await asyncio.sleep(0)
        if all(
            t is me or (t._fut_waiter is not None and not t._fut_waiter.done())  # type: ignore[attr-defined]
            for t in asyncio.all_tasks()
        ):
            return
    await anyio.wait_all_tasks_blocked()


class FakeClock:
    """Wall time that only moves when a test calls `advance()`; sleepers wake in due order."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        self._sleepers: list[tuple[dt.datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._now.timestamp()

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Rounded up to the clock's microsecond: a real sleep always lets time pass, and a wait
        # of 1e-7 s (float rounding) would otherwise be due at once, forever.
        deadline = self._now + dt.timedelta(microseconds=math.ceil(max(0.0, seconds) * 1e6))
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper due on the way, in order, and letting the
        woken tasks run until they block again."""
        target = self._now + dt.timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
            await settle()
        self._now = target
        await settle()

    def set(self, when: dt.datetime) -> None:
        """Step the wall clock (a clock correction); sleepers are not woken."""
        self._now = when


# ---- in-memory ports ---------------------------------------------------------------------------
#
# Fakes of the store, the ledger, the recipients and the senders, with the same compare-and-set
# meaning as the MongoDB adapters, judged by the fake clock (the "database's" clock here). The
# adapters' own semantics are tested through the real driver; these let the scheduler and the
# executor be tested alone, in milliseconds.


def _expired(execution: dict[str, Any], now: dt.datetime) -> bool:
    lease = execution.get("leaseUntil")
    return lease is None or lease <= now


class MemoryCampaignStore:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.docs: dict[Any, dict[str, Any]] = {}
        self.fail_heartbeats = False
        self.calls: list[str] = []

    def add(self, doc: dict[str, Any]) -> dict[str, Any]:
        self.docs[doc["_id"]] = doc
        return doc

    def _now(self) -> dt.datetime:
        return self.clock.now()

    def _exe(self, doc: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(doc.get("execution"), dict):
            doc["execution"] = {}
        execution: dict[str, Any] = doc["execution"]
        return execution

    @staticmethod
    def _view(doc: dict[str, Any], with_targets: bool = False) -> dict[str, Any]:
        out = copy.deepcopy(doc)
        if not with_targets:
            out.pop("targetedCustomerIds", None)
        return out

    async def ensure_indexes(self) -> None:
        return None

    async def list_active(self) -> list[dict[str, Any]]:
        active = ("approved", "running", "paused")
        return [self._view(d) for d in self.docs.values() if d.get("status") in active]

    async def get(self, campaign_id: Any, *, with_targets: bool = False) -> dict[str, Any] | None:
        doc = self.docs.get(campaign_id)
        return None if doc is None else self._view(doc, with_targets)

    async def get_slice(self, campaign_id: Any, start: int, count: int) -> dict[str, Any] | None:
        doc = self.docs.get(campaign_id)
        if doc is None:
            return None
        out = self._view(doc, with_targets=True)
        out["targetedCustomerIds"] = list(out.get("targetedCustomerIds") or [])[
            start : start + count
        ]
        return out

    async def sending_state(self, campaign_id: Any) -> str:
        doc = self.docs.get(campaign_id)
        if doc is None:
            return "gone"
        if doc.get("status") != "running":
            return "stopped"
        return "running" if doc["endDate"] > self._now() else "window_closed"

    async def not_due_yet(self, campaign_id: Any) -> bool:
        doc = self.docs.get(campaign_id)
        return bool(doc and doc["status"] == "approved" and doc["startDate"] > self._now())

    async def target_problem(self, campaign_id: Any) -> str | None:
        targets = self.docs[campaign_id].get("targetedCustomerIds", [])
        if not isinstance(targets, list):
            return "targetedCustomerIds must be a list"
        problems = [p for p in map(target_problem, targets) if p]
        return f"{len(problems)} targeted customer ids are not ids" if problems else None

    async def record_invalid(self, campaign_id: Any, reason: str, detail: str) -> bool:
        exe = self._exe(self.docs[campaign_id])
        if (exe.get("lastError") or {}).get("detail") == detail:
            return False
        exe["lastError"] = {"reason": reason, "detail": detail, "at": self._now()}
        return True

    async def claim_start(
        self, campaign_id: Any, *, owner: str, lease_s: float, grace_s: float
    ) -> dict[str, Any] | None:
        self.calls.append("claim_start")
        doc, now = self.docs.get(campaign_id), self._now()
        if doc is None or doc["status"] != "approved":
            return None
        start = doc["startDate"]
        if not (start <= now and start >= now - dt.timedelta(seconds=grace_s)):
            return None
        if doc["endDate"] <= now:
            return None
        doc["status"] = "running"
        exe = self._exe(doc)
        exe.update(
            owner=owner,
            epoch=int(exe.get("epoch", 0)) + 1,
            leaseUntil=now + dt.timedelta(seconds=lease_s),
            startedAt=now,
            sendsDone=False,
        )
        return self._view(doc)

    async def mark_missed(self, campaign_id: Any, *, grace_s: float, reason: str) -> bool:
        doc, now = self.docs.get(campaign_id), self._now()
        if doc is None or doc["status"] != "approved":
            return False
        late = doc["startDate"] < now - dt.timedelta(seconds=grace_s)
        if not (late or doc["endDate"] <= now):
            return False
        doc["status"] = "missed"
        self._exe(doc).update(reason=reason, finishedAt=now)
        return True

    async def claim_takeover(
        self, campaign_id: Any, *, old_epoch: int, owner: str, lease_s: float
    ) -> dict[str, Any] | None:
        doc, now = self.docs.get(campaign_id), self._now()
        if doc is None or doc["status"] != "running":
            return None
        exe = self._exe(doc)
        if exe.get("epoch") != old_epoch or not _expired(exe, now):
            return None
        exe.update(
            owner=owner,
            epoch=old_epoch + 1,
            leaseUntil=now + dt.timedelta(seconds=lease_s),
            takenOverAt=now,
        )
        return self._view(doc)

    async def heartbeat(
        self, campaign_id: Any, *, epoch: int, owner: str, lease_s: float
    ) -> dict[str, Any] | None:
        self.calls.append("heartbeat")
        if self.fail_heartbeats:
            raise ConnectionError("heartbeat refused (fake)")
        doc = self.docs.get(campaign_id)
        if doc is None or doc["status"] != "running":
            return None
        exe = self._exe(doc)
        if exe.get("epoch") != epoch or exe.get("owner") != owner:
            return None
        exe["leaseUntil"] = self._now() + dt.timedelta(seconds=lease_s)
        return {"_id": campaign_id}

    async def release(self, campaign_id: Any, *, epoch: int, retry_after_s: float = 0.0) -> bool:
        doc = self.docs.get(campaign_id)
        if doc is None or self._exe(doc).get("epoch") != epoch:
            return False
        self._exe(doc).update(
            owner=None,
            leaseUntil=self._now() + dt.timedelta(seconds=retry_after_s),
            releasedAt=self._now(),
        )
        return True

    async def record_failure(
        self, campaign_id: Any, *, epoch: int, detail: str, max_failures: int, retry_after_s: float
    ) -> str | None:
        doc = self.docs.get(campaign_id)
        if doc is None or self._exe(doc).get("epoch") != epoch:
            return None
        exe = self._exe(doc)
        exe["failures"] = int(exe.get("failures", 0)) + 1
        exe.update(failedEpoch=epoch, lastError={"reason": "execution_failed", "detail": detail})
        await self.release(campaign_id, epoch=epoch, retry_after_s=retry_after_s)
        if exe["failures"] >= max_failures and doc["status"] == "running":
            doc["status"] = "failed"
        return str(doc["status"])

    async def mark_sends_done(
        self, campaign_id: Any, *, epoch: int, performance: Mapping[str, int] | None = None
    ) -> bool:
        doc = self.docs.get(campaign_id)
        if doc is None or self._exe(doc).get("epoch") != epoch:
            return False
        self._exe(doc)["sendsDone"] = True
        if performance is not None:
            doc["performance"] = dict(performance)
        return True

    async def complete(self, campaign_id: Any, *, epoch: int | None = None) -> bool:
        doc, now = self.docs.get(campaign_id), self._now()
        if doc is None or doc["status"] not in ("running", "paused") or doc["endDate"] > now:
            return False
        exe = self._exe(doc)
        if epoch is not None and exe.get("epoch") != epoch:
            return False
        if epoch is None and not (
            exe.get("sendsDone") or _expired(exe, now) or exe.get("owner") is None
        ):
            return False
        doc["status"] = "completed"
        exe.update(finishedAt=now, owner=None)
        return True

    async def add_performance(
        self, campaign_id: Any, *, epoch: int | None, counts: Mapping[str, int]
    ) -> bool:
        doc = self.docs.get(campaign_id)
        if doc is None:
            return False
        if epoch is None and self._exe(doc).get("sendsDone"):
            return False
        if epoch is not None and self._exe(doc).get("epoch") != epoch:
            return False
        perf = doc.setdefault("performance", {})
        for name, n in counts.items():
            perf[name] = perf.get(name, 0) + n
        self._exe(doc)["failures"] = 0
        return True


class MemoryLedger:
    """The ledger's conditional writes (domain.deliveries.LedgerOp), in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.executions: dict[tuple[str, int], dict[str, Any]] = {}

    async def ensure_indexes(self) -> None:
        return None

    async def states(
        self, campaign: str, channel: str, customers: Sequence[str]
    ) -> dict[str, RowState]:
        out = {}
        for c in customers:
            row = self.rows.get(delivery_id(campaign, channel, c))
            if row is not None:
                out[c] = RowState(row["state"], row["epoch"], row.get("shard"))
        return out

    async def write(
        self,
        campaign: str,
        *,
        epoch: int,
        records: Iterable[DeliveryRecord],
        now: dt.datetime,
        shard: int | None = None,
    ) -> set[str]:
        refused = set()
        for rec in records:
            _id = delivery_id(campaign, rec.channel, rec.customer)
            row = self.rows.get(_id)
            op = rec.operation
            if row is not None and op not in (LedgerOp.MARK, LedgerOp.RECORD):
                if row.get("shard") != shard:  # epochs compare within one shard only
                    refused.add(_id)
                    continue
            fields = {
                "state": rec.state,
                "reason": rec.reason,
                "error": rec.error,
                "to": rec.to,
                "attempts": rec.attempts,
            }
            if op in (LedgerOp.MARK, LedgerOp.RECORD):
                if row is not None:
                    refused.add(_id)
                    continue
                self.rows[_id] = {
                    "campaign": campaign,
                    "channel": rec.channel,
                    "customer": rec.customer,
                    "epoch": epoch,
                    "shard": shard,
                    **fields,
                }
            elif op is LedgerOp.OUTCOME:
                if row is None or row["epoch"] != epoch or row["state"] != DeliveryState.PENDING:
                    refused.add(_id)
                    continue
                row.update(fields)
            elif op is LedgerOp.RESOLVE:
                if row is None or row["epoch"] != epoch or row["state"] != DeliveryState.UNCERTAIN:
                    refused.add(_id)
                    continue
                row.update(fields)
            else:  # SETTLE
                if row is None or row["epoch"] >= epoch or row["state"] != DeliveryState.PENDING:
                    refused.add(_id)
                    continue
                row.update(fields, settledBy=epoch)
        return refused

    async def forget_pending(self, ids: Sequence[str], *, epoch: int) -> None:
        for _id in ids:
            row = self.rows.get(_id)
            if row is not None and row["epoch"] == epoch and row["state"] == DeliveryState.PENDING:
                del self.rows[_id]

    async def counts(self, campaign: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for row in self.rows.values():
            if row["campaign"] == campaign:
                by_state = out.setdefault(row["channel"], {})
                by_state[row["state"]] = by_state.get(row["state"], 0) + 1
                if row["state"] == DeliveryState.SKIPPED and str(row.get("reason", "")).startswith(
                    SUPPRESSED_PREFIX
                ):
                    by_state[SUPPRESSED] = by_state.get(SUPPRESSED, 0) + 1
        return out

    async def pending_from_other_epochs(
        self, campaign: str, epoch: int, shard: int | None = None
    ) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.rows.values()
            if r["campaign"] == campaign
            and r["state"] == DeliveryState.PENDING
            and r["epoch"] < epoch
            and r.get("shard") == shard
        ]

    async def record_execution(
        self, campaign: str, *, epoch: int, owner: str, fields: dict[str, Any]
    ) -> None:
        self.executions.setdefault((campaign, epoch), {}).update(fields, owner=owner)


class MemoryRecipients:
    def __init__(self, recipients: Iterable[Recipient]) -> None:
        self.by_id = {r.customer_id: r for r in recipients}

    async def resolve(self, customer_ids: Sequence[Any]) -> dict[str, Recipient]:
        return {str(c): self.by_id[str(c)] for c in customer_ids if str(c) in self.by_id}


class RecordingSender:
    """A sender that records every message and answers through `handler` (httpx's
    MockTransport idea): return a provider id, or raise one of the DeliveryError kinds."""

    def __init__(self, handler: Callable[[Any], str] | None = None) -> None:
        self.handler = handler or (lambda message: f"id-{message.to}")
        self.sent: list[Any] = []
        self.attempts = 0

    async def send(self, message: Any) -> str:
        self.attempts += 1
        provider_id = self.handler(message)
        self.sent.append(message)
        return provider_id

    async def aclose(self) -> None:
        return None
