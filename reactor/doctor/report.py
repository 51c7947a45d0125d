"""What `reactor doctor` found, and how it is shown: the report, the redaction of secrets, and
a rendering in which user-supplied text is always plain text."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..config import Settings

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    configuration: dict[str, Any] = field(default_factory=dict)
    waiting: list[dict[str, Any]] = field(default_factory=list)
    running: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def healthy(self) -> bool:
        return all(c.status != FAIL for c in self.checks)


REDACTED = "********"


_SECRET_OPTIONS = {
    "password",
    "tlscertificatekeyfilepassword",
    "sslclientcertificatekeypassword",
    "sslpemkeypassword",
    "authmechanismproperties",  # AWS_SESSION_TOKEN:..., and other mechanisms' secrets
}


_SECRET_WORDS = ("password", "secret", "token", "apikey", "api_key", "signature", "sig")


def redacted_configuration(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            # A notification URL held as a secret (a Slack hook) is secret in its path too.
            url = "://" in secret and not name.startswith("notify_")
            out[name.upper()] = redact_url(secret) if url else REDACTED
        elif isinstance(value, str) and "://" in value:
            out[name.upper()] = redact_url(value)
        else:
            out[name.upper()] = value
    return out


def redact_url(url: str) -> str:
    """A URL with every secret it carries replaced: the password in its userinfo, and the value
    of every query option that holds one (`tlsCertificateKeyFilePassword`,
    `authMechanismProperties=AWS_SESSION_TOKEN:…`, `token=`…)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        creds, _, hosts = authority.rpartition("@")
        user = creds.split(":", 1)[0]
        authority = f"{user}:{REDACTED}@{hosts}" if ":" in creds else f"{REDACTED}@{hosts}"
    path, qmark, query = tail.partition("?")
    if qmark:
        options = []
        for option in query.split("&"):
            key, eq, _value = option.partition("=")
            lowered = key.lower()
            if eq and (lowered in _SECRET_OPTIONS or any(w in lowered for w in _SECRET_WORDS)):
                option = f"{key}={REDACTED}"
            options.append(option)
        query = "&".join(options)
    return f"{scheme}://{authority}{slash}{path}{qmark}{query}"


def printable(value: Any) -> str:
    """User-supplied text made safe for a terminal: control characters (escape sequences
    included) shown as escapes, never interpreted."""
    text = str(value)
    return "".join(
        ch if ch == "\t" or unicodedata.category(ch) not in ("Cc", "Cf") else ascii(ch)[1:-1]
        for ch in text
    )


def _cell(value: Any) -> Text:
    # Text, not a markup string: a campaign named "[/bold]" or "[link=…]" is shown as written.
    return Text(printable(value))


def render(report: Report, console: Console) -> None:
    colours = {OK: "green", WARN: "yellow", FAIL: "red"}
    checks = Table(title="Checks", show_lines=False)
    for col in ("check", "status", "detail"):
        checks.add_column(col)
    for c in report.checks:
        checks.add_row(_cell(c.name), Text(c.status, style=colours[c.status]), _cell(c.detail))
    console.print(checks)
    config = Table(title="Configuration (secrets redacted)")
    config.add_column("variable")
    config.add_column("value")
    for key, value in report.configuration.items():
        config.add_row(_cell(key), _cell(value))
    console.print(config)
    if report.waiting:
        waiting = Table(title="Approved campaigns waiting")
        for col in ("name", "id", "start", "state", "note"):
            waiting.add_column(col)
        for w in report.waiting:
            waiting.add_row(*(_cell(w.get(k)) for k in ("name", "id", "start", "state", "note")))
        console.print(waiting)
    if report.running:
        running = Table(title="Running and paused campaigns")
        for col in ("name", "status", "owner", "lease", "progress", "shards"):
            running.add_column(col)
        for r in report.running:
            progress = ", ".join(f"{k}={v}" for k, v in r["progress"].items())
            shards = ", ".join(f"{k} {v}" for k, v in sorted(r.get("shards", {}).items()))
            running.add_row(
                *(_cell(r.get(k)) for k in ("name", "status", "owner", "lease")),
                _cell(progress),
                _cell(shards or "—"),
            )
        console.print(running)
    if report.failures:
        failures = Table(title="Recent failures")
        for col in ("name", "status", "problem"):
            failures.add_column(col)
        for f in report.failures:
            failures.add_row(*(_cell(f.get(k)) for k in ("name", "status", "problem")))
        console.print(failures)
    console.print(Text("Recommendations", style="bold"))
    for rec in report.recommendations:
        console.print(Text("  • ") + _cell(rec))
    console.print(
        Text("healthy", style="green")
        if report.healthy
        else Text("something is wrong", style="red")
    )


def ago(seconds: float) -> str:
    """A duration as people read it: 45s, 12m, 5h, 3d."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
