"""Review findings on notification destinations: a string `error` on a destination document
must not break the reload, and the address policy must refuse loopback, NAT64- and
6to4-embedded private addresses unless a setting allows them."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from reactor.config import Settings
from reactor.metrics import Metrics
from reactor.notify.config import NotifyConfig
from reactor.notify.destinations import RefusedAddress, address_problem, vet_host
from reactor.notify.notifier import Notifier

from .conftest import MongoTarget
from .fakes import FakeClock

Client = AsyncMongoClient[dict[str, Any]]


async def test_a_string_error_field_is_replaced_and_the_others_stay(
    client: Client, mongo: MongoTarget
) -> None:
    db = client[mongo.campaigns_db]
    await db.notification_destinations.insert_many(
        [
            {"_id": "bad", "kind": "json", "url": "http://x.example.com/", "error": "old text"},
            {"_id": "good", "kind": "json", "url": "https://x.example.com", "error": "stale"},
        ]
    )
    n = Notifier(
        db,
        campaigns_collection="campaigns",
        clock=FakeClock(dt.datetime.now(dt.UTC)),
        metrics=Metrics(),
        config=NotifyConfig(),
        instance_id="a",
    )
    try:
        found = await n.destinations.reload()
    finally:
        await n.aclose()
    assert list(found) == ["good"]
    bad = await db.notification_destinations.find_one({"_id": "bad"})
    assert bad is not None
    assert "must be https" in bad["error"]["detail"]
    good = await db.notification_destinations.find_one({"_id": "good"})
    assert good is not None
    assert "error" not in good


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
        ("64:ff9b:1::a00:1", "private"),  # local-use NAT64 prefix (RFC 8215)
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", "private"),  # 6to4 of 192.168.1.1
    ],
)
def test_loopback_and_embedded_private_addresses_are_refused(address: str, refused: str) -> None:
    found = address_problem(address, allow_private=False)
    assert found is not None
    assert refused in found
    assert address_problem(address, allow_private=True) is None


def test_nat64_of_a_public_address_is_judged_as_that_address() -> None:
    assert address_problem("64:ff9b::5db8:d822", allow_private=False) is None  # 93.184.216.34


def test_loopback_alone_is_allowed_by_its_own_setting() -> None:
    assert address_problem("127.0.0.1", allow_private=False, allow_loopback=True) is None
    assert address_problem("64:ff9b::7f00:1", allow_private=False, allow_loopback=True) is None
    found = address_problem("10.0.0.1", allow_private=False, allow_loopback=True)
    assert found is not None
    assert "private" in found


async def test_a_name_resolving_to_loopback_is_refused_by_default() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    with pytest.raises(RefusedAddress, match="NOTIFY_ALLOW_LOOPBACK"):
        await vet_host("sidecar.example.com", 443, resolve, allow_private=False)
    assert await vet_host(
        "sidecar.example.com", 443, resolve, allow_private=False, allow_loopback=True
    ) == ["127.0.0.1"]


def test_the_setting_reaches_the_notify_config() -> None:
    assert (
        Settings(mongo_uri="mongodb://localhost", notify_allow_loopback=True)
        .notify_config()
        .allow_loopback
        is True
    )
    assert Settings(mongo_uri="mongodb://localhost").notify_config().allow_loopback is False
