"""The fault scenarios: each sets a fault loose on the world (fault_world.py) and returns its
account. `faults.py` runs them and prints the table."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from .fault_world import (
    LEASE_S,
    ReactorProcess,
    World,
    account,
    at_least,
    metrics_of,
    until,
)


async def kill_owner(w: World, quick: bool) -> dict[str, Any]:
    a = await w.spawn("a")
    await w.approve(2, start_in_s=1)
    await until(lambda: at_least(w, 40), 30)
    a.kill()
    killed_at = time.monotonic()
    await w.spawn("b")
    done_at = await until(w.all_sent, 90)
    return {**await account(w, crashes=1), "recovery_s": round(done_at - killed_at, 2)}


async def three_instances_bursts(w: World, quick: bool) -> dict[str, Any]:
    for name in ("a", "b", "c"):
        await w.spawn(name)
    t0 = time.monotonic()
    for _ in range(3):
        await w.approve(2 if quick else 4, start_in_s=0.5, size=w.customers // 2)
        await asyncio.sleep(1.0)
    done_at = await until(w.all_sent, 120)
    claims = await w.client.marketing.campaigns.distinct(
        "execution.epoch", {"_id": {"$in": w.campaign_ids}}
    )
    return {**await account(w), "epochs_seen": claims, "recovery_s": round(done_at - t0, 2)}


async def rolling_restart(w: World, quick: bool) -> dict[str, Any]:
    names = ["a", "b", "c"]
    for name in names:
        await w.spawn(name)
    await w.approve(3, start_in_s=0.5)
    await until(lambda: at_least(w, 30), 30)
    codes = []
    for reactor in list(w.reactors):
        codes.append(await reactor.terminate())
        await w.spawn(f"{reactor.name}2")
    restarted_at = time.monotonic()
    done_at = await until(w.all_sent, 120)
    return {
        **await account(w, crashes=0),
        "exit_codes": codes,
        "recovery_s": round(done_at - restarted_at, 2),
    }


async def stream_closed_repeatedly(w: World, quick: bool) -> dict[str, Any]:
    await w.spawn("a")
    await w.spawn("b")
    admin = w.client.admin
    for _ in range(4):
        await admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": {"times": 2},
                "data": {"failCommands": ["getMore", "aggregate"], "closeConnection": True},
            }
        )
        await w.approve(1, start_in_s=0.5, size=w.customers // 2)
        await asyncio.sleep(0.5)
    fault_end = time.monotonic()
    done_at = await until(w.all_sent, 90)
    return {**await account(w), "recovery_s": round(done_at - fault_end, 2)}


async def history_lost_while_down(w: World, quick: bool) -> dict[str, Any]:
    a = await w.spawn("a")
    await asyncio.sleep(1.0)  # a resume token is persisted
    await a.terminate()
    await w.approve(2, start_in_s=2)
    w.emulator.drop_change_stream_history()
    back = await w.spawn("a")
    back_at = time.monotonic()
    done_at = await until(w.all_sent, 60)
    metrics = await metrics_of(back)
    return {
        **await account(w),
        "history_lost_restarts": metrics.get(
            'reactor_change_stream_restarts_total{reason="history_lost"}', 0.0
        ),
        "recovery_s": round(done_at - back_at, 2),
    }


async def providers_failing(w: World, quick: bool) -> dict[str, Any]:
    await w.spawn("a")
    await w.approve(2, start_in_s=0.5)
    await until(lambda: at_least(w, 20), 30)
    outage_s = 3 if quick else 20
    await w.sink.go_down()
    w.twilio.fail_next(10, 429, retry_after_s=1)
    w.twilio.fail_next(20, 500)
    await asyncio.sleep(outage_s)
    await w.sink.come_back()
    back_at = time.monotonic()
    done_at = await until(w.all_sent, 120)
    result = await account(w, crashes=1, ambiguous=20)
    counted_failed = 0
    async for doc in w.client.marketing.campaigns.find({"_id": {"$in": w.campaign_ids}}):
        perf = doc.get("performance") or {}
        counted_failed += int(perf.get("emailsFailed", 0)) + int(perf.get("smsFailed", 0))
    return {
        **result,
        # Every failure here is transient (an outage, 429s) or ambiguous (500s): none may end
        # `failed`, in the ledger or in the campaign's counters.
        "failed_rows": result["states"].get("failed", 0),
        "failed_in_counters": counted_failed,
        "smtp_outage_s": outage_s,
        "recovery_s": round(done_at - back_at, 2),
    }


async def mongo_failing(w: World, quick: bool) -> dict[str, Any]:
    """Every command of the replica sending a campaign fails (ShutdownInProgress) for longer
    than its lease: it fences itself, the other replica takes the campaign over."""
    await w.spawn("a")
    await w.spawn("b")
    campaign, _ = await w.approve(2, start_in_s=1)
    await until(lambda: at_least(w, 20), 30)
    victim = await w.sender_of(campaign)
    epoch_at_fault = len(await w.executions(campaign))
    commands = ["find", "update", "insert", "findAndModify", "aggregate", "getMore", "delete"]
    await w.fail_commands(commands, error_code=91, replica=victim.name)
    # Still its sender once the fault is on (the injection hit the replica that owns it).
    still_sender = (await w.sender_of(campaign)) is victim
    await asyncio.sleep(3 * LEASE_S + 2)  # the lease lapses and a sweep (2 s) finds it
    await w.heal()
    back_at = time.monotonic()
    done_at = await until(w.all_sent, 120)
    later = [e for e in await w.executions(campaign) if int(e["epoch"]) > epoch_at_fault]
    return {
        **await account(w, crashes=1),
        "injected_into_sender": still_sender,
        "taken_over_by_other": any(e.get("owner") != victim.name for e in later),
        "recovery_s": round(done_at - back_at, 2),
    }


async def bad_campaigns_in_burst(w: World, quick: bool) -> dict[str, Any]:
    await w.spawn("a")
    now = dt.datetime.now(dt.UTC)
    bad = [
        {"name": "bad-date", "status": "approved", "startDate": "soon", "endDate": now},
        {"name": "bad-window", "status": "approved", "startDate": now, "endDate": now},
        {
            "name": "bad-channel",
            "status": "approved",
            "startDate": now,
            "endDate": now + dt.timedelta(hours=1),
            "channels": ["fax"],
        },
        {
            "name": "bad-content",
            "status": "approved",
            "startDate": now,
            "endDate": now + dt.timedelta(hours=1),
            "channels": ["email"],
            "email": {"text": "x"},
        },
        {
            "name": "bad-status",
            "status": "aproved",
            "startDate": now,
            "endDate": now + dt.timedelta(hours=1),
        },
        {
            "name": "bad-targets",
            "status": "approved",
            "startDate": now,
            "endDate": now + dt.timedelta(hours=1),
            "sms": {"body": "x"},
            "targetedCustomerIds": "1,2,3",
        },
    ]
    t0 = time.monotonic()
    result = await w.client.marketing.campaigns.insert_many(bad)
    w.bad_ids.extend(result.inserted_ids)
    await w.approve(3, start_in_s=0.5, size=w.customers // 2)
    done_at = await until(w.all_sent, 90)

    async def all_rejected() -> bool:
        n = await w.client.marketing.campaigns.count_documents(
            {"_id": {"$in": w.bad_ids}, "execution.lastError": {"$exists": True}}
        )
        return n == len(w.bad_ids)

    await until(all_rejected, 30)
    sent_for_bad = await w.client.marketing.deliveries.count_documents(
        {"campaign": {"$in": [str(i) for i in w.bad_ids]}}
    )
    return {
        **await account(w),
        "bad_campaigns": len(bad),
        "bad_rejected": len(bad),
        "deliveries_for_bad": sent_for_bad,
        "recovery_s": round(done_at - t0, 2),
    }


async def skewed_clocks(w: World, quick: bool) -> dict[str, Any]:
    """One replica's wall clock a minute ahead, another's a minute behind (faketime)."""
    await w.spawn("a")
    await w.spawn("fast", clock_offset="+60s")
    await w.spawn("slow", clock_offset="-60s")
    await w.approve(3, start_in_s=4)
    t0 = time.monotonic()
    done_at = await until(w.all_sent, 120)
    epochs = [
        (d.get("execution") or {}).get("epoch")
        async for d in w.client.marketing.campaigns.find({"_id": {"$in": w.campaign_ids}})
    ]
    return {
        **await account(w),
        "epochs_seen": sorted(set(epochs)),
        "recovery_s": round(done_at - t0, 2),
    }


async def _two_replicas_one_sending(w: World) -> ReactorProcess:
    """Two replicas, one campaign under way: returns the replica that owns it."""
    await w.spawn("a")
    await w.spawn("b")
    (campaign,) = await w.approve(1, start_in_s=1)
    await until(lambda: at_least(w, 30), 30)
    return await w.owner(campaign)


async def owner_stalled(w: World, quick: bool) -> dict[str, Any]:
    """The owner SIGSTOPped for twice its lease (a VM pause), then SIGCONTed."""
    owner = await _two_replicas_one_sending(w)
    (campaign,) = w.campaign_ids
    stalled_epoch = len(await w.executions(campaign))
    owner.pause()
    await asyncio.sleep(2 * LEASE_S)
    owner.resume()
    resumed_at = time.monotonic()
    done_at = await until(w.all_sent, 120)
    later = [e for e in await w.executions(campaign) if int(e["epoch"]) > stalled_epoch]
    others = [e for e in later if e.get("owner") != owner.name]
    takeover = min(others, key=lambda e: int(e["epoch"])) if others else None
    # The fence: once taken over, the stalled epoch marks nothing new (its late sends would
    # be ones the new owner cannot account for); rows it marked before stay its own.
    late_marks = -1  # no takeover: nothing to fence against
    if takeover is not None:
        late_marks = await w.client.marketing.deliveries.count_documents(
            {
                "campaign": str(campaign),
                "epoch": stalled_epoch,
                "createdAt": {"$gte": takeover["startedAt"]},
            }
        )
    return {
        **await account(w, crashes=1),
        "taken_over_by_other": takeover is not None,
        "marks_by_stalled_epoch_after_takeover": late_marks,
        "recovery_s": round(done_at - resumed_at, 2),
    }


async def heartbeats_failing(w: World, quick: bool) -> dict[str, Any]:
    """The owner's lease renewals fail (a failCommand on its findAndModify)."""
    owner = await _two_replicas_one_sending(w)
    await w.fail_commands(["findAndModify"], error_code=2, replica=owner.name)
    await asyncio.sleep(3 * LEASE_S)
    await w.heal()
    back_at = time.monotonic()
    done_at = await until(w.all_sent, 120)
    return {**await account(w, crashes=1), "recovery_s": round(done_at - back_at, 2)}


async def twilio_accepts_then_502(w: World, quick: bool) -> dict[str, Any]:
    """Twilio takes ten messages, then its gateway answers 502: each must stay uncertain, never
    be retried (a retry would text the customer twice)."""
    await w.spawn("a")
    await w.approve(1, start_in_s=1)
    await until(lambda: at_least(w, 10), 30)
    w.twilio.accept_then_fail_next(10, 502)
    t0 = time.monotonic()
    done_at = await until(w.all_sent, 120)
    return {**await account(w, ambiguous=10), "recovery_s": round(done_at - t0, 2)}


async def smtp_greylisting(w: World, quick: bool) -> dict[str, Any]:
    """The SMTP server greylists: 450 to every recipient's attempts in its first seconds."""
    greylist_s = 3 if quick else 60
    w.sink.greylist(greylist_s)
    # A deferral schedule that outlasts the greylisting, as production's 1/5/15 minutes do.
    w.env = {**w.env, "TEMPFAIL_RETRY_SECONDS": "1,2,4" if quick else "5,20,45"}
    await w.spawn("a")
    await w.approve(1, start_in_s=1)
    t0 = time.monotonic()
    done_at = await until(w.all_sent, 240)
    result = await account(w)
    return {
        **result,
        "greylisted": w.sink.greylisted,
        "failed_rows": result["states"].get("failed", 0),
        "recovery_s": round(done_at - t0, 2),
    }


async def mongo_unreachable_at_start(w: World, quick: bool) -> dict[str, Any]:
    """MongoDB is down when the replicas start; they wait for it, then work normally."""
    await w.emulator.stop()
    a = await w.spawn("a", wait=False)
    b = await w.spawn("b", wait=False)
    await asyncio.sleep(3 if quick else 20)
    # Still waiting, not crashed (under restart: unless-stopped an exit is a crash loop).
    exited = sum(1 for r in (a, b) if r.proc is None or r.proc.returncode is not None)
    await w.emulator.start()
    back_at = time.monotonic()
    await a.ready(60)
    await b.ready(60)
    await w.approve(2, start_in_s=1)
    done_at = await until(w.all_sent, 120)
    return {
        **await account(w),
        "exited_while_waiting": exited,
        "recovery_s": round(done_at - back_at, 2),
    }


async def smtp_errors_mid_transaction(w: World, quick: bool) -> dict[str, Any]:
    """Three campaigns share one instance's SMTP pool while the server answers DATA with an
    error for thirty messages: each failed transaction must be reset (or its connection
    dropped) before the next message on that connection, of whatever campaign."""
    await w.spawn("a")
    await w.approve(3, start_in_s=1, size=w.customers // 2)
    await until(lambda: at_least(w, 30), 30)
    w.sink.fail_next(30, "451 4.3.0 error in the middle of the transaction (injected)")
    t0 = time.monotonic()
    done_at = await until(w.all_sent, 120)
    result = await account(w)
    return {
        **result,
        "failed_rows": result["states"].get("failed", 0),
        "recovery_s": round(done_at - t0, 2),
    }


async def smtp_tls_rejected(w: World, quick: bool) -> dict[str, Any]:
    """For 30 s every STARTTLS handshake presents a certificate the replicas cannot verify
    (SMTP_CA_FILE names the real CA): the email channel must pause, not fail everyone."""
    w.sink.present_impostor_certificate(3 if quick else 30)
    a = await w.spawn("a")
    await w.approve(1, start_in_s=1)
    t0 = time.monotonic()
    done_at = await until(w.all_sent, 240)
    metrics = await metrics_of(a)
    result = await account(w)
    return {
        **result,
        "failed_rows": result["states"].get("failed", 0),
        "tls_pauses": metrics.get('reactor_channel_pauses_total{channel="email",kind="tls"}', 0),
        "recovery_s": round(done_at - t0, 2),
    }


EMAIL_BUDGET_PER_S = 40.0


def _rate(arrivals: list[float], start: float, end: float) -> float:
    n = sum(1 for t in arrivals if start <= t < end)
    return n / (end - start) if end > start else 0.0


async def budget_holder_killed(w: World, quick: bool) -> dict[str, Any]:
    """Three replicas send six campaigns, in shards, on one cluster-wide email budget; a replica
    holding leased tokens (a shard owner, mid-send) is SIGKILLed. Its shards are taken over; the
    others keep the budget busy meanwhile, so the rate the provider sees holds, counted from
    the kill on (the seconds before the takeover included)."""
    w.env["EMAIL_RATE_PER_SECOND"] = str(EMAIL_BUDGET_PER_S)
    # Small shards, one at a time per replica: every replica sends (unsharded, one replica
    # can win all six starts, and its death stops everything until the takeover).
    w.env.update({"SHARD_SIZE": str(max(10, w.customers // 6)), "SHARD_CONCURRENCY": "1"})
    for name in ("a", "b", "c"):
        await w.spawn(name)
    await w.approve(6, start_in_s=1)

    async def emails_for(seconds: float) -> bool:  # a few seconds of the budget already sent
        return len(w.sink.messages) >= EMAIL_BUDGET_PER_S * seconds

    await until(lambda: emails_for(5), 60)
    owners = await w.client.marketing.campaign_shards.distinct(
        "owner", {"campaign": {"$in": [str(i) for i in w.campaign_ids]}, "state": "claimed"}
    )
    victim = next(r for r in w.reactors if r.name in owners)
    victim.kill()
    killed_at = time.monotonic()
    done_at = await until(w.all_sent, 180)
    arrivals = sorted(m.received_at for m in w.sink.messages)
    first, last = arrivals[0], arrivals[-1]
    before = _rate(arrivals, first + 1, killed_at)
    # From the kill on: the seconds while the dead replica's leased tokens and campaigns are
    # not yet taken over count too.
    after = _rate(arrivals, killed_at, last - 1)
    worst = max(abs(before - EMAIL_BUDGET_PER_S), abs(after - EMAIL_BUDGET_PER_S))
    return {
        **await account(w, crashes=1),
        "owners_before_kill": len(owners),
        "rate_before_per_s": round(before, 1),
        "rate_after_per_s": round(after, 1),
        "rate_within_5pct": worst <= 0.05 * EMAIL_BUDGET_PER_S,
        "recovery_s": round(done_at - killed_at, 2),
    }


async def shard_owner_killed(w: World, quick: bool) -> dict[str, Any]:
    """One campaign cut into shards and sent by three replicas; a replica sending shards (not
    the campaign's owner) is SIGKILLed mid-shard. Its shards are taken over, each from the
    ledger, while the other two go on sending theirs."""
    shard_size = max(10, w.customers // 6)
    w.env.update(
        {"SHARD_SIZE": str(shard_size), "EMAIL_RATE_PER_SECOND": "30", "SMS_RATE_PER_SECOND": "30"}
    )
    for name in ("a", "b", "c"):
        await w.spawn(name)
    (campaign_id,) = await w.approve(1, start_in_s=1)
    shards = w.client.marketing.campaign_shards

    async def spread() -> bool:  # shards claimed by all three, and some sent already
        owners = await shards.distinct("owner", {"campaign": str(campaign_id), "state": "claimed"})
        return len(owners) >= 2 and await at_least(w, 30)

    await until(spread, 60)
    coordinator = await w.owner(campaign_id)
    owners = await shards.distinct("owner", {"campaign": str(campaign_id), "state": "claimed"})
    victim = next(r for r in w.reactors if r.name in owners and r is not coordinator)
    victim.kill()
    killed_at = time.monotonic()
    done_at = await until(w.all_sent, 180)
    rows = await shards.find({"campaign": str(campaign_id)}).to_list()
    return {
        **await account(w, crashes=1),
        "shards": len(rows),
        "shards_taken_over": sum(1 for r in rows if int(r.get("epoch", 0)) > 1),
        "senders": len({r.get("owner") for r in rows}),
        "recovery_s": round(done_at - killed_at, 2),
    }
