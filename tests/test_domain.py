"""Pure domain logic, as tables."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest
from bson import ObjectId

from reactor.domain.errors import InvalidCampaign
from reactor.domain.ids import id_variants, normalise_id
from reactor.domain.models import Channel, Status, parse_campaign
from reactor.domain.retry import RetryPolicy
from reactor.domain.schedule import (
    StartDecision,
    TimerKind,
    desired_timers,
    start_decision,
    wants_takeover,
)
from reactor.domain.templates import compile_part, render_context

T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def doc(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "_id": ObjectId(),
        "name": "Summer sale",
        "status": "approved",
        "startDate": T0,
        "endDate": T0 + dt.timedelta(hours=2),
        "email": {"subject": "Hi {{name}}", "text": "Hello {{name}}"},
        "sms": {"body": "Sale! {{name}}"},
        "targetedCustomerIds": ["1", 2],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _MISSING}


_MISSING = object()


def test_parse_valid_campaign_defaults_channels_to_those_with_content() -> None:
    c = parse_campaign(doc())
    assert c.channels == {Channel.EMAIL, Channel.SMS}
    assert c.status is Status.APPROVED
    assert c.start_at.tzinfo is dt.UTC
    only_email = parse_campaign(doc(sms=_MISSING))
    assert only_email.channels == {Channel.EMAIL}


def test_naive_dates_are_read_as_utc() -> None:
    c = parse_campaign(doc(startDate=T0.replace(tzinfo=None)))
    assert c.start_at == T0


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"startDate": _MISSING}, "bad_startDate"),
        ({"startDate": "2026-06-01"}, "bad_startDate"),
        ({"endDate": 5}, "bad_endDate"),
        ({"endDate": T0}, "bad_window"),
        ({"endDate": T0 - dt.timedelta(seconds=1)}, "bad_window"),
        ({"status": "launched"}, "bad_status"),
        ({"status": None}, "bad_status"),
        ({"channels": ["email", "fax"]}, "bad_channels"),
        ({"channels": "email"}, "bad_channels"),
        ({"channels": ["sms"], "sms": _MISSING}, "bad_content"),
        ({"email": {"text": "no subject"}, "channels": ["email"]}, "bad_content"),
        ({"email": {"subject": "   ", "text": "x"}}, "bad_content"),
        ({"email": {"subject": "s"}}, "bad_content"),
        ({"email": {"subject": "a\r\nBcc: x@y", "text": "x"}}, "bad_content"),
        ({"email": {"subject": "s", "html": "x" * (1024 * 1024)}}, "bad_content"),
        ({"sms": {"body": ""}}, "bad_content"),
        ({"sms": {"body": "x" * 2000}}, "bad_content"),
        ({"sms": "text"}, "bad_content"),
        ({"email": None, "sms": None}, "bad_channels"),
        ({"name": ""}, "bad_name"),
        ({"name": 3}, "bad_name"),
        ({"targetedCustomerIds": "1,2"}, "bad_targets"),
        ({"targetedCustomerIds": [1.5]}, "bad_targets"),
        ({"targetedCustomerIds": [True]}, "bad_targets"),
    ],
)
def test_malformed_campaigns_are_rejected_with_a_reason(
    overrides: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidCampaign) as info:
        parse_campaign(doc(**overrides))
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("status", "start_offset_s", "end_offset_s", "horizon_s", "expected"),
    [
        ("approved", 60, 3600, 86400, [(TimerKind.START, 60)]),
        ("approved", -30, 3600, 86400, [(TimerKind.START, -30)]),  # overdue: due at once
        ("approved", 90000, 99999, 86400, []),  # beyond the horizon: a later sweep arms it
        ("running", -60, 3600, 86400, [(TimerKind.END, 3600)]),
        ("paused", -60, 3600, 86400, [(TimerKind.END, 3600)]),
        ("running", -60, 90000, 86400, []),
        ("draft", 60, 3600, 86400, []),
        ("completed", -60, -1, 86400, []),
    ],
)
def test_desired_timers(
    status: str,
    start_offset_s: int,
    end_offset_s: int,
    horizon_s: int,
    expected: list[tuple[TimerKind, int]],
) -> None:
    c = parse_campaign(
        doc(
            status=status,
            startDate=T0 + dt.timedelta(seconds=start_offset_s),
            endDate=T0 + dt.timedelta(seconds=end_offset_s),
        )
    )
    timers = desired_timers(c, T0, horizon_s)
    assert [(t.key.kind, (t.due_at - T0).total_seconds()) for t in timers] == expected


@pytest.mark.parametrize(
    ("now_offset_s", "end_offset_s", "grace_s", "expected"),
    [
        (-1, 3600, 60, StartDecision.NOT_DUE),
        (0, 3600, 60, StartDecision.RUN),
        (59, 3600, 60, StartDecision.RUN),
        (61, 3600, 60, StartDecision.MISSED),
        (30, 20, 60, StartDecision.MISSED),
        (3600, 3600, 99999, StartDecision.MISSED),
    ],
)
def test_start_decision(
    now_offset_s: int, end_offset_s: int, grace_s: int, expected: StartDecision
) -> None:
    assert (
        start_decision(
            T0,
            T0 + dt.timedelta(seconds=end_offset_s),
            T0 + dt.timedelta(seconds=now_offset_s),
            grace_s,
        )
        is expected
    )


def test_takeover_only_for_expired_leases_with_work_left() -> None:
    def running(**execution: Any) -> Any:
        return parse_campaign(
            doc(status="running", startDate=T0 - dt.timedelta(minutes=5), execution=execution)
        )

    now = T0
    assert wants_takeover(
        running(owner="a", epoch=1, leaseUntil=now - dt.timedelta(seconds=1)), now
    )
    assert wants_takeover(running(owner=None, epoch=1, leaseUntil=now), now)
    assert not wants_takeover(
        running(owner="a", epoch=1, leaseUntil=now + dt.timedelta(seconds=5)), now
    )
    assert not wants_takeover(
        running(owner="a", epoch=1, leaseUntil=now - dt.timedelta(seconds=1), sendsDone=True), now
    )


def test_retry_backoff_grows_is_capped_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_attempts=4, base_s=1, max_s=8)
    rng = random.Random(3)
    delays = [policy.delay_s(a, rng=rng) for a in range(1, 7)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(8, 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert policy.delay_s(1, retry_after_s=5, rng=rng) >= 5
    assert policy.should_retry(3)
    assert not policy.should_retry(4)


@pytest.mark.parametrize(
    ("template", "html", "expected"),
    [
        ("Hi {{name}}!", False, "Hi Ann <3!"),
        ("Hi {{ name }} at {{email}}", False, "Hi Ann <3 at ann@x.io"),
        ("<p>{{name}}</p>", True, "<p>Ann &lt;3</p>"),
        # Jinja2 now (issue 24): expressions evaluate, in the sandbox; what it refuses or does
        # not know is a bad_template when the campaign is armed (tests/test_templates.py).
        ("{{ 7*7 }} {{phone}}", False, "49 +1555"),
        ("{{name.__class__}}", False, InvalidCampaign),
        ("{{unknown}} {{phone}}", False, InvalidCampaign),
        ("{% if x %}", False, InvalidCampaign),
    ],
)
def test_old_placeholders_render_as_before_and_the_rest_is_jinja(
    template: str, html: bool, expected: str | type[Exception]
) -> None:
    context = render_context(
        name="Ann <3",
        email="ann@x.io",
        phone="+1555",
        unsubscribe_url="",
        row={},
        campaign_name="c",
        campaign_id="c",
        channel="email",
    )
    part = "html" if html else "text"
    if isinstance(expected, str):
        assert compile_part(part, template).render(context) == expected
        return
    with pytest.raises(expected, match="bad_template"):
        compile_part(part, template)


@pytest.mark.parametrize(
    ("value", "normal", "variants"),
    [
        ("42", "42", ["42", 42, "42.0"]),
        (42, "42", ["42", 42, "42.0"]),
        (42.0, "42", ["42", "42.0", 42]),
        ("42.0", "42", ["42", "42.0", 42]),
        ("007", "007", ["007"]),
        ("abc-1", "abc-1", ["abc-1"]),
        (" 9 ", "9", ["9", 9, "9.0"]),
    ],
)
def test_customer_ids_match_across_spellings(value: Any, normal: str, variants: list[Any]) -> None:
    assert normalise_id(value) == normal
    assert id_variants(value) == variants
