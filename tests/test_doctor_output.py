"""`reactor doctor` shows what users and backends wrote exactly as written — never as markup or
terminal escapes — and never a secret, wherever in a URL it hides."""

from __future__ import annotations

import pytest
from rich.console import Console

from reactor.doctor import Check, Report, printable, redact_url, render


@pytest.mark.parametrize(
    ("url", "hidden", "kept"),
    [
        ("mongodb://app:s3cret@db:27017/?replicaSet=rs0", ["s3cret"], ["app", "db:27017", "rs0"]),
        (
            "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=hunter2&replicaSet=rs0",
            ["hunter2"],
            ["tls=true", "replicaSet=rs0"],
        ),
        (
            "mongodb://db/?authMechanism=MONGODB-AWS"
            "&authMechanismProperties=AWS_SESSION_TOKEN:FwoGZXIvYXdz",
            ["FwoGZXIvYXdz"],
            ["authMechanism=MONGODB-AWS"],
        ),
        ("https://AC123:authtoken99@proxy.example/twilio", ["authtoken99"], ["proxy.example"]),
        ("https://proxy.example/x?token=abc123&region=eu", ["abc123"], ["region=eu"]),
        ("mongodb://justhost:27017", [], ["justhost:27017"]),
    ],
)
def test_secrets_in_urls_are_redacted(url: str, hidden: list[str], kept: list[str]) -> None:
    shown = redact_url(url)
    for secret in hidden:
        assert secret not in shown
    for part in kept:
        assert part in shown


def rendered(report: Report) -> str:
    console = Console(record=True, width=200, color_system=None, force_terminal=False)
    render(report, console)
    return console.export_text()


def test_names_are_shown_as_written_not_as_markup_or_escapes() -> None:
    report = Report(
        checks=[Check("campaigns", "ok", "fine")],
        waiting=[
            {
                "name": "[/bold] [link=https://evil.example]click[/link] \x1b[2J\x1b]8;;x\x07",
                "id": "1",
                "start": "soon",
                "state": "ok",
                "note": "[red]not red[/red]",
            }
        ],
        recommendations=["check [bold]this[/bold]"],
    )
    text = rendered(report)  # "[/bold]" used to crash it with a MarkupError
    assert "[/bold]" in text
    assert "[link=https://evil.example]click[/link]" in text
    assert "[red]not red[/red]" in text
    assert "check [bold]this[/bold]" in text
    assert "\x1b" not in text
    assert "\\x1b[2J" in text


def test_printable_keeps_text_and_tabs() -> None:
    assert printable("Sommer-Sale\tü") == "Sommer-Sale\tü"
    assert printable("a\x00b\u200bc") == "a\\x00b\\u200bc"


def test_secret_settings_are_redacted_in_the_configuration() -> None:
    from reactor.config import Settings
    from reactor.doctor import redacted_configuration

    settings = Settings(
        mongo_uri="mongodb://app:mongo-pw@db/?replicaSet=rs0",
        smtp_password="smtp-pw",
        twilio_auth_token="twilio-token",
        twilio_api_base_url="https://AC1:proxy-pw@proxy.example",
    )
    shown = str(redacted_configuration(settings))
    for secret in ("mongo-pw", "smtp-pw", "twilio-token", "proxy-pw"):
        assert secret not in shown
    assert "app:********@db" in shown
