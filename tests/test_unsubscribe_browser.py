"""The unsubscribe page in a real browser: Debian's chromium, headless, driven by Playwright
(pointed at that binary; Playwright's own browser download is not used). Each path is clicked
through as a person would, and the database and a screenshot are checked after each click."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

from playwright.async_api import Page, async_playwright
from pymongo import AsyncMongoClient

from reactor.domain.consent import suppression_id
from reactor.embedded.smtp_sink import SmtpSink

from .conftest import MongoTarget
from .helpers import eventually, running, settings
from .test_consent import done, public, sent_campaign, unsubscribe_url

Client = AsyncMongoClient[dict[str, Any]]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path is not None, "the browser test needs chromium (bash .ci/install installs it)"
    return path


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


async def shot(page: Page, path: Path) -> bytes:
    data = await page.screenshot(path=str(path), full_page=True)
    width, height = png_size(data)
    assert width >= 320
    assert height >= 200
    return data


async def ids(client: Client, mongo: MongoTarget) -> set[str]:
    return {d["_id"] for d in await client[mongo.campaigns_db].suppressions.find().to_list()}


async def test_a_person_unsubscribes_undoes_and_unsubscribes_from_everything(
    mongo: MongoTarget, client: Client, sink: SmtpSink, tmp_path: Path
) -> None:
    async with running(settings(mongo, sink, **public())):
        cid = await sent_campaign(client, mongo, 3)
        await eventually(lambda: done(client, mongo, cid), 15)
        url = unsubscribe_url(sink, "c1@example.com")
        email_scope = {
            suppression_id("customer", "1", "email"),
            suppression_id("email", "c1@example.com", "email"),
        }
        all_scope = {
            suppression_id("customer", "1", "all"),
            suppression_id("email", "c1@example.com", "all"),
        }
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 480, "height": 720})
                page.set_default_timeout(10_000)

                # The landing page changes nothing by being opened.
                await page.goto(url)
                assert await page.title() == "Unsubscribe"
                assert "spring" in await page.inner_text("main")
                landing = await shot(page, tmp_path / "1-landing.png")
                assert await ids(client, mongo) == set()

                # Unsubscribe from emails.
                await page.click("[data-testid=unsub]")
                assert await page.inner_text("[data-testid=state]") == "You are unsubscribed"
                unsubscribed = await shot(page, tmp_path / "2-unsubscribed.png")
                assert unsubscribed != landing
                assert await ids(client, mongo) == email_scope

                # Undo.
                await page.click("[data-testid=undo]")
                assert await page.inner_text("[data-testid=state]") == "You are subscribed again"
                await shot(page, tmp_path / "3-undone.png")
                assert await ids(client, mongo) == set()

                # From everything, starting over from the link.
                await page.goto(url)
                await page.click("[data-testid=unsub-all]")
                assert await page.inner_text("[data-testid=state]") == "You are unsubscribed"
                assert "all our marketing messages" in await page.inner_text("main")
                await shot(page, tmp_path / "4-everything.png")
                assert await ids(client, mongo) == all_scope

                # A forged link: the neutral page, and nothing changes.
                forged = url[:-6] + ("AAAAAA" if not url.endswith("AAAAAA") else "BBBBBB")
                response = await page.goto(forged)
                assert response is not None
                assert response.status == 400
                assert await page.inner_text("[data-testid=state]") == "This link is not valid"
                assert await page.locator("button").count() == 0
                await shot(page, tmp_path / "5-forged.png")
                assert await ids(client, mongo) == all_scope
            finally:
                await browser.close()
        doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
        assert doc is not None
        assert doc["performance"]["unsubscribes"] == 1  # unsubscribed, undone, unsubscribed
