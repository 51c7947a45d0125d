"""A tracked email in a real browser: Debian's chromium, headless, driven by Playwright (as in
test_unsubscribe_browser.py). The sent message's HTML, taken from the SMTP sink, is opened as a
mail client shows it (its images load: the pixel), a link is clicked as a person would, and the
browser must land on the destination with one human open and one human click recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web
from playwright.async_api import async_playwright
from pymongo import AsyncMongoClient

from reactor.embedded.smtp_sink import SmtpSink
from reactor.http import start_site

from .conftest import MongoTarget
from .helpers import campaign, eventually, running, seed_customers, settings
from .test_consent import public
from .test_tracking import CHROME, counters, delivered_an_hour_ago, events, sent
from .test_unsubscribe_browser import CHROMIUM_ARGS, chromium, shot

Client = AsyncMongoClient[dict[str, Any]]


async def shop() -> tuple[web.AppRunner, int]:
    """The destination: a shop page on this machine."""

    async def landing(request: web.Request) -> web.Response:
        return web.Response(
            text="<!doctype html><title>Spring sale</title><h1 id=shop>Welcome to the sale</h1>",
            content_type="text/html",
        )

    app = web.Application()
    app.router.add_get("/spring", landing)
    return await start_site(app, "127.0.0.1", 0, logger="tests.shop")


async def test_a_person_opens_a_tracked_email_and_clicks_a_link(
    mongo: MongoTarget, client: Client, sink: SmtpSink, tmp_path: Path
) -> None:
    runner, port = await shop()
    destination = f"http://127.0.0.1:{port}/spring"
    html = (
        "<!doctype html><html><body style='font-family:sans-serif'><h1>Spring is here</h1>"
        f'<p><a id=cta href="{destination}">Shop the spring sale</a></p>'
        '<p><a href="https://shop.example/summer">Summer preview</a></p></body></html>'
    )
    try:
        cfg = settings(mongo, sink, **public(tracking="opens_and_clicks"))
        async with running(cfg):
            ids = await seed_customers(client, mongo, 1)
            doc = campaign(
                "spring", 0.3, 60, ids, channels=["email"], email={"subject": "Hi", "html": html}
            )
            cid = (await client[mongo.campaigns_db].campaigns.insert_one(doc)).inserted_id
            await eventually(lambda: sent(client, mongo, cid, 1), 15)
            message = next(m for m in sink.messages if m.to == "c0@example.com")
            assert message.html is not None
            assert destination not in message.html  # the link goes through the tracker
            await delivered_an_hour_ago(client, mongo, cid)  # read later, as people do

            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
                try:
                    # Headless Chromium says "HeadlessChrome" in its agent, which the
                    # classifier rightly takes for a bot; this one is a person's Chrome.
                    page = await browser.new_page(
                        viewport={"width": 640, "height": 480}, user_agent=CHROME
                    )
                    page.set_default_timeout(10_000)
                    await page.set_content(message.html, wait_until="load")
                    await shot(page, tmp_path / "1-message.png")
                    await page.click("#cta")
                    await page.wait_for_url(destination)
                    assert await page.inner_text("#shop") == "Welcome to the sale"
                    await shot(page, tmp_path / "2-landed.png")
                finally:
                    await browser.close()

            async def recorded() -> bool:
                return len(await events(client, mongo)) >= 2

            await eventually(recorded, 5)
            found = await events(client, mongo)
            assert sorted((e["kind"], e["class"]) for e in found) == [
                ("click", "human"),
                ("open", "human"),
            ]
            perf = await counters(client, mongo, cid)
            assert (perf["opens"], perf["clicks"], perf["links"]) == (1, 1, {"0": 1})
    finally:
        await runner.cleanup()
