"""Consent only gets stronger: on the real store (through the driver), a complaint, a hard bounce
or a STOP recorded after a link's unsubscribe survives that link's undo; an undo lifts only what
the same link (campaign and channel) added, never an operator's or an imported entry, and counts
back only on its own campaign; a START lifts only the STOPs from replies older than itself;
entries written before claims keep working. A hypothesis property test drives random
interleavings of all of these against a reference model."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import AsyncMongoClient

from reactor.adapters.clock import SystemClock
from reactor.adapters.mongo import MongoSuppressions
from reactor.adapters.mongo.feedback import MongoFeedback
from reactor.domain.consent import (
    ALL_CHANNELS,
    Kind,
    LinkScope,
    Purpose,
    Reason,
    Suppression,
    rank,
    start_lift,
    suppression_id,
)
from reactor.domain.feedback import Feedback, FeedbackEvent
from reactor.embedded.mongo import MongoEmulator
from reactor.metrics import Metrics
from reactor.public.feedback import FeedbackConfig, FeedbackSink
from reactor.public.unsubscribe import Unsubscribes
from reactor.suppress_cli import entry as import_entry
from reactor.suppression import SuppressionList

from .conftest import MongoTarget
from .fakes import FakeClock
from .helpers import eventually, holds

T = TypeVar("T")
Client = AsyncMongoClient[dict[str, Any]]
CUSTOMER = "1"
EMAIL = "ana@example.com"
PHONE = "+14155550100"
T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


class Actions:
    """The campaigns a link may name, in memory: each delivered to the one customer."""

    def __init__(self) -> None:
        self.unsubscribes: dict[str, int] = {}

    async def campaign_name(self, campaign_key: str) -> str | None:
        return campaign_key

    async def delivered_to(self, campaign_key: str, channel: str, customer: str) -> str | None:
        return EMAIL if channel == "email" else PHONE

    async def add_unsubscribes(self, campaign_key: str, delta: int) -> bool:
        self.unsubscribes[campaign_key] = max(0, self.unsubscribes.get(campaign_key, 0) + delta)
        return True


@dataclass
class World:
    store: MongoSuppressions
    unsubscribes: Unsubscribes
    sink: FeedbackSink
    actions: Actions
    clock: FakeClock
    sids: itertools.count[int]

    async def unsubscribe(self, campaign: str, channel: str, everything: bool = False) -> None:
        await self.unsubscribes.unsubscribe(
            self.scope(campaign, channel), everything=everything, via="page"
        )

    async def undo(self, campaign: str, channel: str) -> None:
        await self.unsubscribes.undo(self.scope(campaign, channel))

    def scope(self, campaign: str, channel: str) -> LinkScope:
        return LinkScope(campaign, CUSTOMER, channel, Purpose.UNSUBSCRIBE, self.clock.now())

    async def email_event(self, kind: Feedback) -> None:
        sid = f"e{next(self.sids)}"
        await self.sink.emails([FeedbackEvent("generic", sid, kind, EMAIL, None, "")])

    async def sms(self, word: str) -> None:
        stop = word == "STOP"
        await self.sink.sms_reply(f"SM{next(self.sids)}", PHONE, word, stop=stop)


def world(db: Any, clock: FakeClock) -> World:
    store = MongoSuppressions(db)
    actions = Actions()
    metrics = Metrics()
    sink = FeedbackSink(MongoFeedback(db, "campaigns"), store, clock, metrics, FeedbackConfig())
    return World(
        store, Unsubscribes(store, actions, clock, metrics), sink, actions, clock, itertools.count()
    )


def every_id() -> list[str]:
    return [
        suppression_id(k, v, ch)
        for k, v in ((Kind.CUSTOMER, CUSTOMER), (Kind.EMAIL, EMAIL), (Kind.PHONE, PHONE))
        for ch in ("email", "sms", ALL_CHANNELS)
    ]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.mark.parametrize(
    ("channel", "stronger", "reason"),
    [
        ("email", "complaint", "complaint"),
        ("email", "bounce", "hard_bounce"),
        ("sms", "stop", "sms_stop"),
    ],
)
async def test_a_stronger_event_after_an_unsubscribe_survives_its_undo(
    mongo: MongoTarget,
    client: Client,
    clock: FakeClock,
    channel: str,
    stronger: str,
    reason: str,
) -> None:
    w = world(client[mongo.campaigns_db], clock)
    address_id = suppression_id(
        Kind.EMAIL if channel == "email" else Kind.PHONE,
        EMAIL if channel == "email" else PHONE,
        channel,
    )
    await w.unsubscribe("c1", channel)
    await clock.advance(1)
    if stronger == "complaint":
        await w.email_event(Feedback.COMPLAINT)
    elif stronger == "bounce":
        await w.email_event(Feedback.HARD_BOUNCE)
    else:
        await w.sms("STOP")
    assert (await w.store.find([address_id]))[address_id] == reason  # the strongest wins
    await clock.advance(1)
    await w.undo("c1", channel)
    found = await w.store.find(every_id())
    assert found == {address_id: reason}  # the link's own entries lifted, the stronger one not
    assert w.actions.unsubscribes == {"c1": 0}


async def test_an_undo_never_lifts_an_operator_or_imported_entry(
    mongo: MongoTarget, client: Client, clock: FakeClock
) -> None:
    w = world(client[mongo.campaigns_db], clock)
    imported = import_entry(
        {"kind": "email", "value": EMAIL, "channel": "email", "reason": "unsubscribed"},
        region="US",
        source="import",
    )
    operator = Suppression(Kind.CUSTOMER, CUSTOMER, "email", Reason.MANUAL, "cli")
    await w.store.add([imported, operator], now=clock.now())
    await w.unsubscribe("c1", "email")
    await w.undo("c1", "email")
    assert await w.store.find(every_id()) == {imported.id: "unsubscribed", operator.id: "manual"}
    # An import's `unsubscribed` outranks a link's.
    assert rank("unsubscribed", "import") > rank("unsubscribed", "link:c1")


async def test_an_undo_is_scoped_to_its_link_and_counts_back_on_its_campaign(
    mongo: MongoTarget, client: Client, clock: FakeClock
) -> None:
    w = world(client[mongo.campaigns_db], clock)
    await w.unsubscribe("c1", "email")
    await w.unsubscribe("c1", "email", everything=True)  # the same link again: one unsubscribe
    await w.unsubscribe("c2", "sms", everything=True)
    assert w.actions.unsubscribes == {"c1": 1, "c2": 1}
    # Another campaign's valid link undoes nothing of c1's, and counts nothing back.
    await w.undo("c3", "email")
    # An email link's undo does not half-lift an SMS link's "unsubscribe from everything".
    await w.undo("c1", "email")
    assert w.actions.unsubscribes == {"c1": 0, "c2": 1}
    assert await w.store.find(every_id()) == {
        suppression_id(Kind.CUSTOMER, CUSTOMER, ALL_CHANNELS): "unsubscribed",
        suppression_id(Kind.PHONE, PHONE, ALL_CHANNELS): "unsubscribed",
    }
    await w.undo("c2", "sms")
    assert await w.store.find(every_id()) == {}
    assert w.actions.unsubscribes == {"c1": 0, "c2": 0}


async def test_an_undo_lifts_only_unsubscribes_inside_its_window_and_says_what_stands(
    mongo: MongoTarget, client: Client, clock: FakeClock
) -> None:
    w = world(client[mongo.campaigns_db], clock)
    await w.unsubscribe("c1", "email")
    await clock.advance(8 * 86400)  # past the default 7-day undo window
    result = await w.unsubscribes.undo(w.scope("c1", "email"))
    assert (result.new, result.still_suppressed) == (False, True)
    assert set(await w.store.find(every_id())) == set(link_ids("email")[::2])
    assert w.actions.unsubscribes == {"c1": 1}
    # Inside the window, the same link's undo lifts it, and nothing else stands.
    await w.unsubscribe("c2", "email")
    result = await w.unsubscribes.undo(w.scope("c2", "email"))
    assert (result.new, result.still_suppressed) == (True, True)  # c1's older one stands
    await w.store.remove(link_ids("email"))
    await w.unsubscribe("c2", "email")
    result = await w.unsubscribes.undo(w.scope("c2", "email"))
    assert (result.new, result.still_suppressed) == (True, False)


async def test_a_start_lifts_only_reply_stops_older_than_itself(
    mongo: MongoTarget, client: Client, clock: FakeClock
) -> None:
    w = world(client[mongo.campaigns_db], clock)
    phone_sms = suppression_id(Kind.PHONE, PHONE, "sms")
    stop = Suppression(Kind.PHONE, PHONE, "sms", Reason.SMS_STOP, "twilio", note="STOP")
    # A STOP recorded after the instant a START was received (e.g. by another replica).
    await w.store.add([stop], now=clock.now() + dt.timedelta(seconds=5))
    assert await w.store.lift([phone_sms], start_lift(clock.now()), now=clock.now()) == 0
    assert phone_sms in await w.store.find([phone_sms])
    await clock.advance(10)
    await w.sms("START")
    assert await w.store.find([phone_sms]) == {}
    # An imported STOP list is the operator's: a START does not lift it.
    imported = Suppression(Kind.PHONE, PHONE, "sms", Reason.SMS_STOP, "import")
    await w.store.add([imported], now=clock.now())
    await clock.advance(1)
    await w.sms("START")
    assert await w.store.find([phone_sms]) == {phone_sms: "sms_stop"}


async def test_a_replayed_start_never_lifts_a_later_stop(
    mongo: MongoTarget, client: Client, clock: FakeClock
) -> None:
    db = client[mongo.campaigns_db]
    w = world(db, clock)
    phone_sms = suppression_id(Kind.PHONE, PHONE, "sms")
    assert await w.sink.sms_reply("SMstop1", PHONE, "STOP", stop=True)
    await clock.advance(60)
    assert await w.sink.sms_reply("SMstart1", PHONE, "START", stop=False)
    assert await w.store.find([phone_sms]) == {}
    await clock.advance(60)
    assert await w.sink.sms_reply("SMstop2", PHONE, "STOP", stop=True)
    # The captured START, replayed a year on: refused as seen, the later STOP stands.
    await clock.advance(365 * 86400)
    assert not await w.sink.sms_reply("SMstart1", PHONE, "START", stop=False)
    assert await w.store.find([phone_sms]) == {phone_sms: "sms_stop"}
    # Replies are kept for good: their record has no field the expiry index reads.
    seen = await db.webhook_events.find_one({"_id": "twilio:inbound:SMstart1"})
    assert seen is not None
    assert "receivedAt" not in seen


async def test_entries_written_before_claims_keep_working(
    mongo: MongoTarget, client: Client, clock: FakeClock
) -> None:
    db = client[mongo.campaigns_db]
    w = world(db, clock)
    customer_email = suppression_id(Kind.CUSTOMER, CUSTOMER, "email")
    email_email = suppression_id(Kind.EMAIL, EMAIL, "email")
    legacy = {"createdAt": T0 - dt.timedelta(days=3)}
    await db.suppressions.insert_many(
        [
            {
                "_id": customer_email,
                "kind": "customer",
                "value": CUSTOMER,
                "channel": "email",
                "reason": "unsubscribed",
                "source": "link:c1",
                "campaign": "c1",
                **legacy,
            },
            {
                "_id": email_email,
                "kind": "email",
                "value": EMAIL,
                "channel": "email",
                "reason": "unsubscribed",
                "source": "import",
                **legacy,
            },
        ]
    )
    assert await w.store.find(every_id()) == {
        customer_email: "unsubscribed",
        email_email: "unsubscribed",
    }
    # A complaint on the old imported entry converts it and wins; the old link unsubscribe is
    # the same link's (campaign c1, email): its undo lifts it; the import stays.
    await w.email_event(Feedback.COMPLAINT)
    doc = await db.suppressions.find_one({"_id": email_email})
    assert doc is not None
    assert doc["reason"] == "complaint"
    assert [c["key"] for c in doc["claims"]] == ["unsubscribed:import", "complaint:generic"]
    await w.undo("c1", "email")
    assert await w.store.find(every_id()) == {email_email: "complaint"}
    await w.store.remove([email_email])
    assert await w.store.find(every_id()) == {}


# ---- the property: random interleavings against a reference model ----------------------------

CAMPAIGNS = ("c1", "c2")
LINK_CHANNELS = ("email", "sms")
IMPORT_IDS = [
    (Kind.EMAIL, EMAIL, "email"),
    (Kind.CUSTOMER, CUSTOMER, ALL_CHANNELS),
    (Kind.PHONE, PHONE, "sms"),
]


class Model:
    """What the list must say: per entry id, its claims (key -> reason, source, at)."""

    def __init__(self) -> None:
        self.claims: dict[str, dict[str, tuple[str, str, dt.datetime]]] = {}
        self.counts: dict[str, int] = {}

    def add(self, ids: list[str], key: str, reason: str, source: str, at: dt.datetime) -> bool:
        new = False
        for i in ids:
            held = self.claims.setdefault(i, {})
            if key not in held:
                held[key] = (reason, source, at)
                new = True
        return new

    def lift(self, ids: list[str], lifts: Any) -> int:
        n = 0
        for i in ids:
            held = self.claims.get(i, {})
            for key in [k for k, v in held.items() if lifts(k, *v)]:
                del held[key]
                n += 1
        return n

    def expected(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i, held in self.claims.items():
            if held:
                out[i] = max(held.values(), key=lambda v: rank(v[0], v[1]))[0]
        return out


def link_ids(channel: str) -> list[str]:
    kind, value = (Kind.EMAIL, EMAIL) if channel == "email" else (Kind.PHONE, PHONE)
    return [
        suppression_id(k, v, ch)
        for k, v in ((Kind.CUSTOMER, CUSTOMER), (kind, value))
        for ch in (channel, ALL_CHANNELS)
    ]


async def step(w: World, m: Model, op: tuple[Any, ...]) -> None:
    await w.clock.advance(1)
    now = w.clock.now()
    name = op[0]
    if name == "unsubscribe":
        _, campaign, channel, everything = op
        key = f"link:{campaign}:{channel}"
        held_before = any(key in m.claims.get(i, {}) for i in link_ids(channel))
        scope = ALL_CHANNELS if everything else channel
        ids = [i for i in link_ids(channel) if i.split(":")[1] == scope]
        if m.add(ids, key, "unsubscribed", f"link:{campaign}", now) and not held_before:
            m.counts[campaign] = m.counts.get(campaign, 0) + 1
        await w.unsubscribe(campaign, channel, everything)
    elif name == "undo":
        _, campaign, channel = op
        key = f"link:{campaign}:{channel}"
        if m.lift(link_ids(channel), lambda k, *_: k == key):
            m.counts[campaign] = max(0, m.counts.get(campaign, 0) - 1)
        await w.undo(campaign, channel)
    elif name in ("complaint", "bounce"):
        reason = "complaint" if name == "complaint" else "hard_bounce"
        m.add([suppression_id(Kind.EMAIL, EMAIL, "email")], f"{reason}:generic", reason, "", now)
        await w.email_event(Feedback.COMPLAINT if name == "complaint" else Feedback.HARD_BOUNCE)
    elif name == "stop":
        m.add([suppression_id(Kind.PHONE, PHONE, "sms")], "sms_stop:twilio", "sms_stop", "", now)
        await w.sms("STOP")
    elif name == "start":
        ids = [suppression_id(Kind.PHONE, PHONE, ch) for ch in ("sms", ALL_CHANNELS)]
        m.lift(ids, lambda k, r, s, at: k == "sms_stop:twilio" and at < now)
        await w.sms("START")
    elif name == "import":
        _, which, reason = op
        kind, value, channel = IMPORT_IDS[which]
        e = Suppression(kind, value, channel, Reason(reason), "import")
        m.add([e.id], f"{reason}:import", reason, "import", now)
        await w.store.add([e], now=now)
    elif name == "remove":
        _, which = op
        kind, value, channel = IMPORT_IDS[which]
        i = suppression_id(kind, value, channel)
        m.claims.pop(i, None)
        await w.store.remove([i])


OPS = st.one_of(
    st.tuples(
        st.just("unsubscribe"),
        st.sampled_from(CAMPAIGNS),
        st.sampled_from(LINK_CHANNELS),
        st.booleans(),
    ),
    st.tuples(st.just("undo"), st.sampled_from(CAMPAIGNS), st.sampled_from(LINK_CHANNELS)),
    st.tuples(st.sampled_from(["complaint", "bounce", "stop", "start"])),
    st.tuples(
        st.just("import"),
        st.integers(0, len(IMPORT_IDS) - 1),
        st.sampled_from([r.value for r in Reason]),
    ),
    st.tuples(st.just("remove"), st.integers(0, len(IMPORT_IDS) - 1)),
)


class _Server:
    """One emulator for the property test's examples, on a loop of its own in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.emulator = MongoEmulator()
        threading.Thread(target=self._serve, daemon=True).start()
        self.ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.emulator.start())
        self.ready.set()
        self.loop.run_forever()


_server: _Server | None = None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _example(ops: list[tuple[Any, ...]], db_name: str) -> None:
    assert _server is not None
    client: Client = AsyncMongoClient(_server.emulator.uri, tz_aware=True)
    try:
        await client.drop_database(db_name)
        w = world(client[db_name], FakeClock(T0))
        m = Model()
        for op in ops:
            await step(w, m, op)
            # After every step: suppressed exactly where the strongest live claim says so.
            assert await w.store.find(every_id()) == m.expected(), op
        assert {c: n for c, n in w.actions.unsubscribes.items() if n} == {
            c: n for c, n in m.counts.items() if n
        }
    finally:
        await client.close()


_examples = itertools.count()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(OPS, min_size=1, max_size=14))
def test_consent_follows_its_strongest_live_claim_after_any_interleaving(
    ops: list[tuple[Any, ...]],
) -> None:
    global _server
    if _server is None:
        _server = _Server()
    _run(_example(ops, f"consent_{next(_examples)}"))


async def test_an_array_literal_in_a_pipeline_update_is_evaluated_as_mongod_does(
    mongo: MongoTarget, client: Client
) -> None:
    coll = client[mongo.campaigns_db].arrays
    await coll.insert_one({"_id": 1, "x": "a"})
    await coll.update_one(
        {"_id": 1}, [{"$set": {"y": ["$x", {"$add": [1, 2]}, "$missing", {"k": "$x"}]}}]
    )
    doc = await coll.find_one({"_id": 1})
    assert doc is not None
    assert doc["y"] == ["a", 3, None, {"k": "a"}]


async def test_every_replica_learns_an_entry_s_strongest_reason_as_it_changes(
    mongo: MongoTarget, client: Client, clock: FakeClock
) -> None:
    w = world(client[mongo.campaigns_db], clock)
    follower = SuppressionList(w.store, SystemClock(), Metrics(), max_await_ms=50)
    email_id = suppression_id(Kind.EMAIL, EMAIL, "email")
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower.follow)
        await follower.opened.wait()
        await w.unsubscribe("c1", "email")
        await eventually(lambda: holds(follower.live.get(email_id) == "unsubscribed"), 5)
        await w.email_event(Feedback.COMPLAINT)  # a claim added to the entry: an update
        await eventually(lambda: holds(follower.live.get(email_id) == "complaint"), 5)
        await w.store.remove([email_id])
        await eventually(lambda: holds(email_id not in follower.live), 5)
        tg.cancel_scope.cancel()
