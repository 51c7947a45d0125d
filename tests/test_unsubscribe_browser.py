"""The unsubscribe page in a real browser: Debian's chromium, headless, driven by Playwright
(pointed at that binary; Playwright's own browser download is not used). Each path is clicked
through as a person would, and after each click the database is checked, and what the page
paints: the state line and the buttons are decoded from element screenshots and must show
drawn text (not a blank box), different text painting differently."""

from __future__ import annotations

import collections
import shutil
import struct
import zlib
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


def decode_png(data: bytes) -> list[list[tuple[int, ...]]]:
    """The pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what chromium writes), as rows
    of (r, g, b[, a]) tuples: enough to check what a screenshot shows, not only its size."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, colour, interlace) in ((8, 2, 0), (8, 6, 0)), (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    previous = bytearray(stride)
    rows = []
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append([tuple(line[x * bpp : x * bpp + 3]) for x in range(width)])
        previous = line
    return rows


def ink(rows: list[list[tuple[int, ...]]]) -> float:
    """The share of pixels that stand out from the background (the commonest colour)."""
    pixels = [px for row in rows for px in row]
    background = collections.Counter(pixels).most_common(1)[0][0]
    far = sum(
        1 for px in pixels if sum(abs(v - w) for v, w in zip(px, background, strict=True)) > 96
    )
    return far / len(pixels)


async def painted(page: Page, selector: str) -> list[list[tuple[int, ...]]]:
    """What the element shows on screen: visible, and with text drawn in it (ink, not a blank
    or a same-colour box), so the screenshot says what its DOM text says."""
    element = page.locator(selector)
    assert await element.is_visible(), selector
    rows = decode_png(await element.screenshot())
    assert len(rows) >= 10, selector
    assert len(rows[0]) >= 40, selector
    assert 0.01 < ink(rows) < 0.7, (selector, ink(rows))
    return rows


async def shot(page: Page, path: Path) -> bytes:
    """The whole page, kept for a person to look at (tmp_path); its content is checked by
    `painted` on the elements that matter."""
    data: bytes = await page.screenshot(path=str(path), full_page=True)
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
                await shot(page, tmp_path / "1-landing.png")
                await painted(page, "[data-testid=unsub]")
                await painted(page, "[data-testid=unsub-all]")
                assert await ids(client, mongo) == set()

                # Unsubscribe from emails.
                await page.click("[data-testid=unsub]")
                assert await page.inner_text("[data-testid=state]") == "You are unsubscribed"
                await shot(page, tmp_path / "2-unsubscribed.png")
                unsubscribed = await painted(page, "[data-testid=state]")
                await painted(page, "[data-testid=undo]")
                assert await ids(client, mongo) == email_scope

                # Undo.
                await page.click("[data-testid=undo]")
                assert await page.inner_text("[data-testid=state]") == "You are subscribed again"
                await shot(page, tmp_path / "3-undone.png")
                # Another sentence painted where the state is: the pixels differ too.
                assert await painted(page, "[data-testid=state]") != unsubscribed
                assert await ids(client, mongo) == set()

                # From everything, starting over from the link.
                await page.goto(url)
                await page.click("[data-testid=unsub-all]")
                assert await page.inner_text("[data-testid=state]") == "You are unsubscribed"
                assert "all our marketing messages" in await page.inner_text("main")
                await shot(page, tmp_path / "4-everything.png")
                await painted(page, "[data-testid=state]")
                assert await ids(client, mongo) == all_scope

                # A forged link: the neutral page, and nothing changes.
                forged = url[:-6] + ("AAAAAA" if not url.endswith("AAAAAA") else "BBBBBB")
                response = await page.goto(forged)
                assert response is not None
                assert response.status == 400
                assert await page.inner_text("[data-testid=state]") == "This link is not valid"
                assert await page.locator("button").count() == 0
                await shot(page, tmp_path / "5-forged.png")
                await painted(page, "[data-testid=state]")
                assert await ids(client, mongo) == all_scope
            finally:
                await browser.close()
        doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": cid})
        assert doc is not None
        assert doc["performance"]["unsubscribes"] == 1  # unsubscribed, undone, unsubscribed
