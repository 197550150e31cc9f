"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A browser logs in, opens a tenant's page, and sees its spend bar and amounts change while calls
are authorized and settled by the engine, without the page reloading (server-sent events). The
screenshot is kept as a test artifact (``artifacts/dashboard.png``; the README's
``docs/dashboard.png`` is a copy of one). A missing browser fails the test: CI installs it
(``.ci/run``).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from dashboard_support import PARIS, UK_MOBILE, Harness, harness
from playwright.async_api import Page, async_playwright

from guard.dashboard.auth import hash_password

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[1]
PASSWORD = "browser test password"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium; its absence is a failure (CI installs it), never a skip."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (see .ci/run)")
    return CHROMIUM


@pytest.fixture
async def env(sqlite_url: str, redis_url: str, key_prefix: str) -> AsyncIterator[Harness]:
    async with harness(sqlite_url, redis_url, key_prefix) as found:
        yield found


@pytest.fixture
async def served(env: Harness) -> AsyncIterator[str]:
    """The dashboard of ``env`` on a free loopback port, with a password; yields its base URL."""
    dashboard = env.dashboard(password_hash=hash_password(PASSWORD), stream_interval=0.2)
    runner = web.AppRunner(dashboard.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _text(page: Page, selector: str) -> str:
    return str(await page.locator(selector).first.inner_text())


async def test_a_browser_sees_the_spend_bar_move_without_reloading(
    env: Harness, served: str, chromium: str
) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            await page.goto(f"{served}/tenants/acme")
            assert "/login" in page.url
            await page.fill("input[name=user]", "admin")
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{served}/tenants/acme")

            summary = '[data-live="tenant_summary"]'
            reserved_bar = f"{summary} svg.bar rect.reserved"
            assert await page.get_attribute(reserved_bar, "width") == "0.0"
            await page.wait_for_selector("#live-state.on")
            await page.evaluate("window.guardMarker = 'not reloaded'")

            first = await env.authorize(number=UK_MOBILE)
            await env.authorize(extension="1002", number=PARIS)
            await page.wait_for_function(
                "sel => parseFloat(document.querySelector(sel).getAttribute('width')) > 0",
                arg=reserved_bar,
                timeout=10_000,
            )
            assert "9.8000 GBP" in await _text(page, summary)  # 5.00 + 4.80 reserved
            settled = await env.engine.settle("acme", first.call_id, 600)
            assert settled.cost == 10_000
            await page.wait_for_function(
                "sel => document.querySelector(sel).innerText.includes('1.0000 GBP')",
                arg=f"{summary} dd.spent",
                timeout=10_000,
            )
            await env.authorize(user_agent="<script>alert('stolen')</script>")
            await page.wait_for_selector('tr[data-extension="1001"].locked', timeout=10_000)
            assert await page.evaluate("window.guardMarker") == "not reloaded"
            assert "<script>alert('stolen')</script>" not in await page.content()
            assert await page.evaluate("typeof window.stolen") == "undefined"

            artifacts = REPO / "artifacts"
            artifacts.mkdir(exist_ok=True)
            shot = artifacts / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            await browser.close()


async def test_a_browser_pages_live_calls_keeping_the_filter_after_a_live_update(
    env: Harness, served: str, chromium: str
) -> None:
    calls = [await env.authorize(extension="1002", number=PARIS) for _ in range(3)]
    assert all(call.allowed for call in calls)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            await page.goto(f"{served}/calls?tenant=acme&limit=2")
            await page.fill("input[name=user]", "admin")
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{served}/calls?tenant=acme&limit=2")
            assert "rows 1–2 of 3" in await _text(page, "nav.pager")
            # The links the live stream redrew still lead to this filter's next page.
            await page.wait_for_function("document.body.dataset.updated", timeout=10_000)
            await page.click("nav.pager a[rel=next]")
            await page.wait_for_url(f"{served}/calls?tenant=acme&limit=2&offset=2")
            assert "rows 3–3 of 3" in await _text(page, "nav.pager")
            shown = await page.locator("tr[data-call]").get_attribute("data-call")
            assert shown == calls[2].call_id
        finally:
            await browser.close()
