"""Shared fixtures. Every MongoDB test talks to a server through the real driver: the embedded
emulator by default, or a real replica set when REACTOR_TEST_MONGO_URI is set (each test then
works in databases of its own, dropped afterwards)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from reactor.embedded.mongo import MongoEmulator
from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.twilio_fake import TwilioFake

REAL_MONGO_URI = os.environ.get("REACTOR_TEST_MONGO_URI")


@dataclass
class MongoTarget:
    uri: str
    emulator: MongoEmulator | None
    campaigns_db: str
    segmentation_db: str

    def require_emulator(self) -> MongoEmulator:
        if self.emulator is None:
            pytest.skip("needs the embedded emulator's own controls")
        return self.emulator


@pytest.fixture
async def mongo() -> AsyncIterator[MongoTarget]:
    suffix = uuid.uuid4().hex[:8]
    if REAL_MONGO_URI:
        target = MongoTarget(REAL_MONGO_URI, None, f"marketing_{suffix}", f"retail_{suffix}")
        yield target
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(REAL_MONGO_URI)
        await client.drop_database(target.campaigns_db)
        await client.drop_database(target.segmentation_db)
        await client.close()
        return
    async with MongoEmulator() as emulator:
        yield MongoTarget(emulator.uri, emulator, "marketing", "retail_db")


@pytest.fixture
async def client(mongo: MongoTarget) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    c: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo.uri, tz_aware=True)
    yield c
    await c.close()


@pytest.fixture
async def emulator() -> AsyncIterator[MongoEmulator]:
    async with MongoEmulator() as emu:
        yield emu


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    async with SmtpSink(seed=1) as s:
        yield s


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioFake]:
    async with TwilioFake(seed=1) as t:
        yield t
