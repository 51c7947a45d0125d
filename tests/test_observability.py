"""Metrics, alerts, dashboards and deployment files, checked with the real tools (.ci/install
puts promtool, amtool, prometheus, docker-compose and hadolint on the machine) and, end to end,
by a real Prometheus scraping a running reactor."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import generate_latest
from pymongo import AsyncMongoClient

from reactor.metrics import Metrics

from .conftest import MongoTarget
from .helpers import campaign, eventually, has_status, running, seed_customers, settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = ROOT / "grafana" / "dashboards" / "campaign-reactor.json"
Client = AsyncMongoClient[dict[str, Any]]


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed: run `bash .ci/install` first"
    return found


def run_tool(*args: str, cwd: Path | None = None, stdin: bytes | None = None) -> str:
    proc = subprocess.run(
        [tool(args[0]), *args[1:]],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, output
    return output


def test_alert_rules_are_valid_and_every_alert_is_unit_tested() -> None:
    assert "SUCCESS: 18 rules found" in run_tool(
        "promtool", "check", "rules", "alerts.yml", cwd=DEPLOY
    )
    assert "SUCCESS" in run_tool("promtool", "test", "rules", "alerts.test.yml", cwd=DEPLOY)
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    tests = yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())["tests"]
    tested: dict[str, set[bool]] = {}
    for case in tests:
        for check in case["alert_rule_test"]:
            tested.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    for rule in rules:
        assert tested.get(rule["alert"]) == {True, False}, (
            f"{rule['alert']} needs a firing and a silent case"
        )
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["runbook"].startswith("docs/")
    for rule in rules:
        # A runbook is a section of docs/operations.md, or of the page the alert belongs to.
        page, anchor = rule["annotations"]["runbook"].split("#", 1)
        text = (ROOT / page).read_text().lower()
        assert f"### {anchor}" in text, f"{page} has no runbook section for {rule['alert']}"


def test_prometheus_and_alertmanager_configs() -> None:
    assert "SUCCESS" in run_tool("promtool", "check", "config", "prometheus.yml", cwd=DEPLOY)
    out = run_tool("amtool", "check-config", "alertmanager.yml", cwd=DEPLOY)
    assert "SUCCESS" in out
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["reactor-1:9464", "reactor-2:9464"]


SECRETS = {
    "MONGO_KEYFILE": "a2V5ZmlsZS1mb3ItdGhlLXRlc3Q=",
    "MONGO_ROOT_PASSWORD": "root-secret-for-the-test",
    "MONGO_REACTOR_PASSWORD": "reactor-secret-for-the-test",
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret-for-the-test",
}


def render_compose(
    tmp: Path, secrets: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], Any]:
    shutil.copytree(DEPLOY, tmp / "deploy", dirs_exist_ok=True)
    shutil.copytree(ROOT / "grafana", tmp / "grafana", dirs_exist_ok=True)
    shutil.copy(tmp / "deploy" / ".env.example", tmp / "deploy" / ".env")
    example = (tmp / "deploy" / "secrets.env.example").read_text()
    for key, value in secrets.items():
        example = re.sub(rf"^{key}=.*$", f"{key}={value}", example, flags=re.M)
    (tmp / "deploy" / "secrets.env").write_text(example)
    args = ["docker-compose", "-f", "deploy/docker-compose.yml", "--env-file", "deploy/secrets.env"]
    proc = subprocess.run(
        [*args, "config"], cwd=tmp, capture_output=True, text=True, check=False, timeout=60
    )
    return proc, yaml.safe_load(proc.stdout) if proc.returncode == 0 else None


@pytest.mark.tools
def test_compose_file_validates_and_is_safe_to_copy() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, rendered = render_compose(Path(tmp), SECRETS)
    assert proc.returncode == 0, proc.stderr
    services = rendered["services"]
    assert {
        "mongo",
        "mongo-init",
        "reactor-1",
        "reactor-2",
        "prometheus",
        "alertmanager",
        "grafana",
        "mailcatcher",
        "public-proxy",
    } <= set(services)
    # MongoDB: a replica set with authentication, its keyfile from the secrets file.
    command = services["mongo"]["command"]
    assert "--replSet" in command
    assert "--auth" in command
    assert "--keyFile" in command
    assert "rs.initiate" in " ".join(services["mongo-init"]["command"])
    assert "createUser" in " ".join(services["mongo-init"]["command"])
    # Only Grafana (on loopback, with its admin password set; no anonymous access) and the
    # public TLS proxy are published; the proxy passes only the public listener's paths on.
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"grafana", "public-proxy"}
    caddyfile = Path("deploy/Caddyfile").read_text()
    assert "@public path /u/* /webhooks/* /healthz" in caddyfile
    assert "reactor-1:8080 reactor-2:8080" in caddyfile
    assert "9464" not in caddyfile
    (port,) = published["grafana"]
    # docker-compose 1.x renders the short form, 2.x the long one.
    host_ip = port.split(":", 1)[0] if isinstance(port, str) else port["host_ip"]
    assert host_ip == "127.0.0.1"
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert rendered["networks"]["backend"]["internal"] is True
    assert services["mongo"]["networks"].keys() == {"backend"}
    for name in ("reactor-1", "reactor-2"):
        env = services[name]["environment"]
        assert env["REACTOR_INSTANCE_ID"] == name
        assert "replicaSet=rs0" in env["MONGO_URI"]
        assert SECRETS["MONGO_REACTOR_PASSWORD"] in env["MONGO_URI"]
        # The reactors never get the root credentials or the keyfile.
        assert SECRETS["MONGO_ROOT_PASSWORD"] not in json.dumps(env)
        assert SECRETS["MONGO_KEYFILE"] not in json.dumps(env)
    # Every image is pinned to a release.
    for name, service in services.items():
        image = service.get("image", "")
        tag = image.rsplit(":", 1)[-1]
        assert tag != "latest", name
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), (name, image)


@pytest.mark.tools
def test_compose_refuses_to_start_with_a_secret_left_empty() -> None:
    for missing in SECRETS:
        with tempfile.TemporaryDirectory() as tmp:
            proc, _ = render_compose(Path(tmp), {k: v for k, v in SECRETS.items() if k != missing})
        assert proc.returncode != 0, missing
        assert missing in proc.stderr + proc.stdout


def test_alertmanager_receivers_are_all_defined_locally() -> None:
    config = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    names = {r["name"] for r in config["receivers"]}
    routed = {config["route"]["receiver"]} | {r["receiver"] for r in config["route"]["routes"]}
    assert routed <= names
    # No receiver posts to a service the compose file does not define.
    assert "alert-webhook" not in (DEPLOY / "alertmanager.yml").read_text()


def test_plaintext_smtp_with_credentials_is_refused() -> None:
    from pydantic import ValidationError

    from reactor.config import Settings

    with pytest.raises(ValidationError, match="clear text"):
        Settings(mongo_uri="mongodb://x/", smtp_tls="none", smtp_username="u", smtp_password="p")
    Settings(mongo_uri="mongodb://x/", smtp_tls="none")  # the mail catcher: no credentials


def test_dockerfile_passes_hadolint_and_is_non_root() -> None:
    run_tool("hadolint", str(DEPLOY / "Dockerfile"))
    text = (DEPLOY / "Dockerfile").read_text()
    final = text.rsplit("FROM ", 1)[1]
    assert "USER 10001" in final
    assert "HEALTHCHECK" in final
    assert 'ENTRYPOINT ["reactor"]' in final
    assert "gcc" not in final
    assert "build-essential" not in final


def test_env_example_and_docs_document_every_setting() -> None:
    from reactor.config import Settings

    example = (DEPLOY / ".env.example").read_text()
    docs = "\n".join(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))
    for name in Settings.model_fields:
        var = name.upper()
        assert re.search(rf"^#? ?{var}=", example, re.M), f"{var} missing from .env.example"
        assert f"`{var}`" in docs, f"{var} is documented on no page of docs/"


def _metric_names() -> set[str]:
    """Every series name the registry can expose, including those of label sets not yet
    observed (a histogram with labels has no samples until its first observation)."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gauge": [""],
        "info": ["_info"],
    }
    names = set()
    for family in Metrics().registry.collect():
        for suffix in suffixes.get(family.type, [""]):
            names.add(family.name + suffix)
    return names


def _expressions() -> dict[str, str]:
    exprs: dict[str, str] = {}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            exprs[f"panel {panel['title']} {target['refId']}"] = target["expr"]
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        exprs[f"alert {rule['alert']}"] = rule["expr"]
    return exprs


def test_metrics_pass_promtool_and_every_used_metric_exists() -> None:
    text = generate_latest(Metrics().registry)
    subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        check=True,
        capture_output=True,
        timeout=60,
    )
    names = _metric_names()
    for where, expr in _expressions().items():
        for metric in set(re.findall(r"\breactor_[a-z_]+", expr)):
            assert metric in names, f"{where} uses {metric}, which the reactor does not export"
    text_s = text.decode()
    assert "campaign_id" not in text_s  # no id labels
    assert "customer" not in text_s


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "campaign-reactor"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in (
        "Sends by channel and outcome",
        "Failure ratio",
        "Start lateness",
        "Timers armed",
        "Campaign transitions",
        "Change stream",
        "Sweep repairs",
        "Lease takeovers",
        "Send retries",
    ):
        assert wanted in titles
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    provisioning = yaml.safe_load(
        (ROOT / "grafana" / "provisioning" / "dashboards" / "campaign-reactor.yml").read_text()
    )
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _grafana_to_promql(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "20s")
        .replace("$__range", "5m")
        .replace('instance=~"$instance"', 'instance=~".*"')
    )


async def test_prometheus_scrapes_the_reactor_and_every_query_evaluates(
    mongo: MongoTarget, client: Client, sink: Any, twilio: Any, tmp_path: Path
) -> None:
    ids = await seed_customers(client, mongo, 30)
    cfg = settings(mongo, sink, twilio)
    async with running(cfg) as (reactor,):
        assert reactor.http is not None
        metrics_port = reactor.http.port
        prom_port = _free_port()
        (tmp_path / "alerts.yml").write_text((DEPLOY / "alerts.yml").read_text())
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": ["alerts.yml"],
                    "scrape_configs": [
                        {
                            "job_name": "campaign-reactor",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                        }
                    ],
                }
            )
        )
        prom = await asyncio.create_subprocess_exec(
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{prom_port}/api/v1"
            async with aiohttp.ClientSession() as http:

                async def query(expr: str) -> dict[str, Any]:
                    url = f"{base}/query?query={urllib.parse.quote(expr)}"
                    async with http.get(url) as resp:
                        body: dict[str, Any] = await resp.json()
                        return body

                async def scraped() -> bool:
                    try:
                        body = await query('up{job="campaign-reactor"}')
                    except aiohttp.ClientError:
                        return False
                    result = body.get("data", {}).get("result", [])
                    return bool(result) and result[0]["value"][1] == "1"

                await eventually(scraped, 30, 0.5)
                res = await client[mongo.campaigns_db].campaigns.insert_one(
                    campaign("observed", 0.5, 4, ids)
                )
                await eventually(has_status(client, mongo, res.inserted_id, "completed"), 20)
                await asyncio.sleep(4)  # a few more scrapes after the run

                results = {}
                for where, expr in _expressions().items():
                    body = await query(_grafana_to_promql(expr))
                    assert body["status"] == "success", f"{where}: {body}"
                    results[where] = body["data"]["result"]
                for must in (
                    "panel Sends by channel and outcome A",
                    "panel Start lateness A",
                    "panel Start lateness B",
                    "panel Campaign transitions A",
                ):
                    assert results[must], f"{must} returned no data"
                sends = {
                    (r["metric"]["channel"], r["metric"]["outcome"])
                    for r in results["panel Sends by channel and outcome A"]
                }
                assert ("email", "sent") in sends
                async with http.get(f"{base}/rules") as resp:
                    rules = (await resp.json())["data"]["groups"][0]["rules"]
                assert len(rules) == 18
                assert all(r["health"] == "ok" for r in rules), rules
        finally:
            prom.terminate()
            await prom.wait()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_formats(fmt: str) -> None:
    import io
    import logging

    from reactor import logsetup

    stream = io.StringIO()
    logsetup.configure(fmt, "INFO", stream=stream)
    logging.getLogger("reactor.test").info(
        "✉️ Emails sent: %d/%d", 3, 4, extra={"campaign_id": "c1", "channel": "email"}
    )
    line = stream.getvalue().strip()
    if fmt == "json":
        record = json.loads(line)
        assert record["message"] == "✉️ Emails sent: 3/4"
        assert record["campaign_id"] == "c1"
        assert record["channel"] == "email"
        assert record["level"] == "info"
    else:
        assert line.endswith("reactor.test: ✉️ Emails sent: 3/4")
    logsetup.configure("text", "WARNING")
