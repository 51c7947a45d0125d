"""The benches' loads do the work their figures claim: the webhook load is one state change
per event (each SMS receipt for its own sent message, each hard bounce and complaint for a
distinct address the campaign sent to) plus a stated minority of replays that come after their
first time; a process's CPU is read from its own /proc stat."""

from __future__ import annotations

import collections
import os
import time

import pytest

from reactor.bench.common import process_cpu_s
from reactor.bench.webhooks import PATTERN, REPLAY_GAP, Sent, needed, plan
from reactor.embedded.twilio_fake import TwilioFake


def _sent(n_sms: int, n_bounces: int, n_complaints: int) -> Sent:
    return Sent(
        sms=[(f"SM{i:032x}", f"http://x/webhooks/twilio/status?d=row{i}") for i in range(n_sms)],
        bounces=[f"b{i}@example.com" for i in range(n_bounces)],
        complaints=[f"c{i}@example.com" for i in range(n_complaints)],
    )


def test_every_event_of_the_webhook_load_is_one_change_or_a_stated_replay() -> None:
    events = 2_000
    counts = needed(events)
    assert counts == {
        "sms": 1_200,
        "hard_bounce": 200,
        "soft_bounce": 300,
        "complaint": 200,
        "replay": 100,
    }
    twilio = TwilioFake()
    requests = plan(events, _sent(1_200, 500, 200), twilio, "http://r", "tok")
    assert len(requests) == events
    kinds = collections.Counter(r[4] for r in requests)
    # Replays are 5 %, less those too early to have a first time (sent as soft bounces).
    early = sum(1 for i in range(REPLAY_GAP) if PATTERN[i % len(PATTERN)] == "replay")
    assert kinds["replay"] == counts["replay"] - early
    assert kinds["soft_bounce"] == counts["soft_bounce"] + early

    sms = [r for r in requests if r[4] == "sms"]
    sids = [r[2]["MessageSid"] for r in sms]
    assert len(set(sids)) == len(sids) == 1_200  # one receipt per sent message
    for url, kind, params, headers, _ in sms:
        assert kind == "form"
        assert url.endswith(f"row{int(params['MessageSid'][2:], 16)}")  # its own callback
        assert params["MessageStatus"] in {"delivered", "undelivered", "failed"}
        assert headers["X-Twilio-Signature"] == twilio.signature(url, params)

    first_seen: dict[str, int] = {}
    for i, r in enumerate(requests):
        if r[4] in ("sms",):
            continue
        (event,) = r[2]["events"]
        if r[4] == "replay":
            assert event["id"] in first_seen, event
            assert i - first_seen[event["id"]] >= REPLAY_GAP
        else:
            assert event["id"] not in first_seen  # a first time
            first_seen[event["id"]] = i
            assert event["type"] == r[4]
    hard = [r[2]["events"][0]["email"] for r in requests if r[4] == "hard_bounce"]
    complaints = [r[2]["events"][0]["email"] for r in requests if r[4] == "complaint"]
    assert len(set(hard)) == len(hard)
    assert len(set(complaints)) == len(complaints)
    assert set(complaints) <= {f"c{i}@example.com" for i in range(200)}
    soft = collections.Counter(
        r[2]["events"][0]["email"] for r in requests if r[4] == "soft_bounce"
    )
    assert not set(soft) & set(hard)  # soft bounces go to other addresses of the campaign
    assert max(soft.values()) <= 3


def test_the_webhook_load_refuses_to_run_on_too_few_sends() -> None:
    with pytest.raises(ValueError, match="too few"):
        plan(2_000, _sent(1_199, 500, 200), TwilioFake(), "http://r", "tok")
    with pytest.raises(ValueError, match="too few"):
        plan(2_000, _sent(1_200, 500, 199), TwilioFake(), "http://r", "tok")


def test_process_cpu_is_read_from_the_process_own_stat() -> None:
    before = process_cpu_s(os.getpid())
    assert before is not None
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 0.2 s of this process's CPU
        pass
    after = process_cpu_s(os.getpid())
    assert after is not None
    assert after - before >= 0.1
    assert process_cpu_s(2**22 + 7) is None  # no such process


def test_the_on_off_interval_is_students_t_on_the_rounds_log_ratios() -> None:
    import math
    import statistics

    from scipy import stats  # type: ignore[import-untyped]

    from reactor.bench.engagement_load import ratio_interval

    assert ratio_interval([0.93] * 5) == pytest.approx((0.93, 0.93))
    ratios = [0.946, 0.973, 0.94, 0.913, 0.948, 1.046, 0.986, 0.817]
    logs = [math.log(r) for r in ratios]
    low, high = stats.t.interval(
        0.95, len(logs) - 1, loc=statistics.fmean(logs), scale=stats.sem(logs)
    )
    assert ratio_interval(ratios) == pytest.approx((math.exp(low), math.exp(high)))
    # Narrower with more rounds of the same spread, and holding their geometric mean.
    few, more = ratio_interval(ratios[:4]), ratio_interval(ratios[:4] * 3)
    assert more[1] - more[0] < few[1] - few[0]
    assert ratio_interval(ratios)[0] < math.exp(statistics.fmean(logs)) < ratio_interval(ratios)[1]
