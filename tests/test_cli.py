"""The command line as a user meets it: `reactor demo`, `reactor doctor`, `reactor run` and bad
usage, as real subprocesses."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sys
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from reactor.embedded.mongo import MongoEmulator
from reactor.embedded.smtp_sink import SmtpSink

from .helpers import campaign, eventually, has_status, holds, seed_customers

Client = AsyncMongoClient[dict[str, Any]]


async def reactor_cli(
    *args: str, env: dict[str, str] | None = None, limit_s: float = 90
) -> tuple[int, str, str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MONGO", "SMTP", "TWILIO", "SEGMENTATION", "CAMPAIGNS"))
    }
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reactor",
        *args,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_demo_small_runs_to_a_passing_summary() -> None:
    code, out, err = await reactor_cli(
        "demo",
        "--customers",
        "60",
        "--campaigns",
        "2",
        "--metrics-port",
        "0",
        "--failure-rate",
        "0.1",
    )
    assert code == 0, out + err
    assert "Approved too late" in out
    assert "missed" in out
    assert out.count("completed") >= 2
    assert "duplicates: 0" in out
    assert "demo passed" in out
    said = " ".join(out.split())
    assert "5 one-click unsubscribes, 1 bounce (webhook), 1 STOP reply (Twilio)" in said
    assert "messages to them after: 0" in said
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["run", "--bogus"], {}, "unrecognized arguments"),
        (["demo", "--customers", "many"], {}, "expected a whole number"),
        (["demo", "--failure-rate", "2"], {}, "between 0 and 1"),
        (["mongo-emulator", "--port", "70000"], {}, "port must be"),
        (["run"], {}, "MONGO_URI: required but not set"),
        (["run"], {"MONGO_URI": "http://nope"}, "MONGO_URI: not a valid MongoDB URI"),
        (
            ["run"],
            {"MONGO_URI": "mongodb://h/?replicaSet=rs0", "LEASE_SECONDS": "-1"},
            "LEASE_SECONDS",
        ),
        (
            ["run"],
            {"MONGO_URI": "mongodb://h/?replicaSet=rs0", "METRICS_PORT": "abc"},
            "METRICS_PORT",
        ),
        (
            ["doctor"],
            {"MONGO_URI": "mongodb://u:hunter2@h:1/?replicaSet=rs0", "SMTP_TLS": "sometimes"},
            "SMTP_TLS",
        ),
        ([], {}, "required"),
    ],
)
async def test_bad_usage_is_one_clear_line_and_exit_2(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    code, out, err = await reactor_cli(*args, env=env, limit_s=30)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("reactor: ")
    assert needle in lines[0]
    assert "Traceback" not in err
    assert "hunter2" not in err + out


async def _seed_segmentation(uri: str) -> None:
    client: Client = AsyncMongoClient(uri)
    await client.retail_db.newdatabase.insert_one(
        {"customer_id": 1, "email": "a@b.example", "phone": "+14155550100", "name": "A"}
    )
    await client.retail_db.newdatabase.create_index([("customer_id", 1), ("date", -1)])
    await client.close()


async def test_doctor_healthy(emulator: MongoEmulator, sink: SmtpSink) -> None:
    await _seed_segmentation(emulator.uri)
    client: Client = AsyncMongoClient(emulator.uri, tz_aware=True)
    coll = client.marketing.campaigns
    await coll.insert_one(campaign("soon", 600, 1200, ["1"]))
    await coll.insert_one(campaign("too-late", -7200, 600, ["1"]))
    sharded = await coll.insert_one(campaign("sharded", -60, 600, ["1"], status="running"))
    await client.marketing.campaign_shards.insert_many(
        [
            {"campaign": str(sharded.inserted_id), "index": i, "state": state}
            for i, state in enumerate(["done", "done", "claimed"])
        ]
    )
    env = {
        "MONGO_URI": emulator.uri,
        "SMTP_HOST": sink.host,
        "SMTP_PORT": str(sink.port),
        "SMTP_TLS": "none",
        "EMAIL_FROM": "x@y.example",
        "TWILIO_ACCOUNT_SID": "AC1",
        "TWILIO_AUTH_TOKEN": "tok-secret",
        "TWILIO_FROM_NUMBER": "+15005550006",
    }
    code, out, err = await reactor_cli("doctor", "--json", "--probe", env=env)
    report = json.loads(out)
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks["mongodb"] == "ok"
    assert checks["replica set"] == "ok"
    assert checks["change streams"] == "ok"
    assert checks["segmentation"] == "ok"
    assert checks["orders index"] == "ok"
    assert checks["email (SMTP)"] == "ok"  # probed: the sink answered
    assert checks["sms (Twilio)"] == "fail"  # probed: nothing at api.twilio.com from here
    states = {w["name"]: w["state"] for w in report["waiting"]}
    assert states == {"soon": "waiting", "too-late": "would be missed"}
    running = {r["name"]: r for r in report["running"]}
    assert running["sharded"]["shards"] == {"done": 2, "claimed": 1}
    assert report["configuration"]["TWILIO_AUTH_TOKEN"] == "********"
    assert "tok-secret" not in out + err
    assert any("misfire grace" in r for r in report["recommendations"])
    assert code == 1  # the failed Twilio probe is something wrong
    code_np, out_np, _ = await reactor_cli("doctor", env=env)
    assert code_np == 0
    assert "healthy" in out_np
    assert "Approved campaigns waiting" in out_np
    await client.close()


async def test_doctor_reports_broken_setups(emulator: MongoEmulator) -> None:
    await _seed_segmentation(emulator.uri)
    base = {
        "MONGO_URI": emulator.uri,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": "1",
        "SMTP_TLS": "none",
        "EMAIL_FROM": "x@y.example",
    }
    # Wrong database name for the orders.
    code, out, _ = await reactor_cli("doctor", "--json", env={**base, "SEGMENTATION_DB": "retail"})
    report = json.loads(out)
    seg = next(c for c in report["checks"] if c["name"] == "segmentation")
    assert code == 1
    assert seg["status"] == "fail"
    assert "no collection 'newdatabase' in database 'retail'" in seg["detail"]
    # Change streams unavailable (as on a standalone): the server refuses the aggregate.
    client: Client = AsyncMongoClient(emulator.uri)
    await client.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {"failCommands": ["aggregate"], "errorCode": 40573},
        }
    )
    code, out, _ = await reactor_cli("doctor", "--json", env=base)
    await client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    report = json.loads(out)
    streams = next(c for c in report["checks"] if c["name"] == "change streams")
    assert code == 1
    assert streams["status"] == "fail"
    assert "40573" in streams["detail"]
    # Unreachable SMTP with --probe.
    code, out, _ = await reactor_cli("doctor", "--json", "--probe", env=base)
    report = json.loads(out)
    smtp = next(c for c in report["checks"] if c["name"] == "email (SMTP)")
    assert code == 1
    assert smtp["status"] == "fail"
    assert "unreachable" in smtp["detail"]
    # The orders collection without an index on the customer id: a warning and the fix.
    await client.retail_db.newdatabase.drop_indexes()
    code, out, _ = await reactor_cli("doctor", "--json", env=base)
    report = json.loads(out)
    index = next(c for c in report["checks"] if c["name"] == "orders index")
    assert index["status"] == "warn"
    assert "'customer_id'" in index["detail"]
    assert any("createIndex({customer_id: 1})" in r for r in report["recommendations"])
    # MongoDB not there at all.
    code, out, _ = await reactor_cli(
        "doctor", "--json", env={"MONGO_URI": "mongodb://127.0.0.1:1/?replicaSet=rs0"}
    )
    report = json.loads(out)
    assert code == 1
    assert report["checks"][0]["name"] == "mongodb"
    assert report["checks"][0]["status"] == "fail"
    await client.close()


async def test_run_serves_then_drains_on_sigterm(emulator: MongoEmulator, sink: SmtpSink) -> None:
    client: Client = AsyncMongoClient(emulator.uri, tz_aware=True)

    class Target:
        uri = emulator.uri
        campaigns_db = "marketing"
        segmentation_db = "retail_db"

    ids = await seed_customers(client, Target(), 400)  # type: ignore[arg-type]
    env = {
        "MONGO_URI": emulator.uri,
        **{k: str(v) for k, v in sink.settings_env().items()},
        "METRICS_PORT": "0",
        "EMAIL_RATE_PER_SECOND": "50",
        "SEND_CONCURRENCY": "4",
        "REACTOR_INSTANCE_ID": "cli-run",
        "LOG_FORMAT": "json",
        "LEASE_SECONDS": "30",
    }
    full_env = {**os.environ, **env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reactor",
        "run",
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[dict[str, Any]] = []

    async def read_logs() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            lines.append(json.loads(raw))

    reader = asyncio.create_task(read_logs())

    async def logged(text: str) -> bool:
        return any(text in line["message"] for line in lines)

    await eventually(lambda: logged("ready: first sweep done"), 20)
    res = await client.marketing.campaigns.insert_one(
        campaign("drained", 0.3, 120, ids, channels=["email"])
    )
    await eventually(
        has_status(client, Target(), res.inserted_id, "running"),  # type: ignore[arg-type]
        10,
    )
    await eventually(lambda: holds(len(sink.messages) >= 20))
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 40) == 0
    await reader
    messages = [line["message"] for line in lines]
    assert any("📅 Campaign scheduler started" in m for m in messages)
    assert any("▶️ Started campaign: drained" in m for m in messages)
    assert any("shutdown requested" in m for m in messages)
    started = next(line for line in lines if "Started campaign" in line["message"])
    assert started["campaign_id"] == str(res.inserted_id)
    doc = await client.marketing.campaigns.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["execution"]["owner"] is None  # lease released for another replica
    assert doc["execution"]["leaseUntil"] <= dt.datetime.now(dt.UTC)
    assert doc["status"] == "running"
    state = await client.marketing.reactor_state.find_one({"_id": "resume_token:cli-run"})
    assert state is not None
    rows = await client.marketing.deliveries.count_documents(
        {"campaign": str(res.inserted_id), "state": "pending"}
    )
    assert rows == 0  # in-flight sends finished and were recorded before exit
    sent = await client.marketing.deliveries.count_documents(
        {"campaign": str(res.inserted_id), "state": "sent"}
    )
    assert sent == len(sink.messages) < 400
    await client.close()


async def test_run_waits_for_mongodb_with_clear_lines_and_no_traceback(sink: SmtpSink) -> None:
    """MongoDB is down when `reactor run` starts: it says so once per attempt (JSON, as
    configured), answers /healthz, keeps /readyz at 503, and becomes ready once MongoDB is up —
    no traceback, no exit (which under restart: unless-stopped is a crash loop)."""
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "MONGO_URI": f"mongodb://127.0.0.1:{port}/?replicaSet=rs0&serverSelectionTimeoutMS=500",
        **{k: str(v) for k, v in sink.settings_env().items()},
        "METRICS_PORT": "0",
        "LOG_FORMAT": "json",
        "REACTOR_INSTANCE_ID": "waiting",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reactor",
        "run",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,  # logs go to stderr; an unread pipe would leak
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []

    async def read_logs() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            lines.append(raw.decode())

    reader = asyncio.create_task(read_logs())

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    async def waiting_logged() -> bool:
        return sum("MongoDB is not reachable yet" in line for line in lines) >= 2

    await eventually(waiting_logged, 20)
    ops = next(json.loads(line) for line in lines if "metrics and health on" in line)
    ops_port = int(ops["message"].rsplit(":", 1)[-1])
    assert await asyncio.to_thread(status, "/healthz") == 200
    assert await asyncio.to_thread(status, "/readyz") == 503
    async with MongoEmulator(port=port):

        async def ready() -> bool:
            return await asyncio.to_thread(status, "/readyz") == 200

        await eventually(ready, 45)
    proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        await reader
        tail = "".join(lines[-25:])
        raise AssertionError(f"no exit 30 s after SIGTERM; its last log lines:\n{tail}") from None
    assert code == 0
    await reader
    assert proc.returncode == 0
    for line in lines:
        assert "Traceback" not in line
        json.loads(line)  # every line is one JSON object
