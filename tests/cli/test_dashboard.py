"""The admin dashboard (``GET /``, ``GET /stats``), in headless Chromium against a live gateway.

Chromium is driven through chromedriver with a tiny W3C WebDriver client over HTTP
(aiohttp, so the gateway keeps running on the same event loop). Needs the Debian
packages ``chromium`` and ``chromium-driver``: skipped without them, failed when
``CI=true``. The screenshot is saved to ``var/screenshots/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import fail_or_skip, free_port

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "var" / "screenshots" / "dashboard.png"
CHROME_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1050",
]


def config(app_url: str) -> str:
    return f"""
services:
  echo:
    instances: [{app_url}]
    breaker: {{failures: 3, reset_after: 10s}}
  billing:
    instances: [{app_url}]
routes:
  - name: items
    match: {{path: "/items/{{id}}", methods: [GET]}}
    service: echo
    timeout: {{total: 2s}}
  - name: billing
    match: {{prefix: /billing/}}
    service: billing
"""


# --- no browser needed -----------------------------------------------------------------


async def test_page_is_open_and_stats_are_guarded(start_gateway, make_upstream):
    up = await make_upstream()
    g = await start_gateway(config(up.url), admin_token="s3cret")
    async with g.session.get(f"{g.admin}/") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
        assert "script-src 'sha256-" in r.headers["Content-Security-Policy"]
        assert "<title>Gateway dashboard</title>" in await r.text()
    async with g.session.get(f"{g.admin}/stats") as r:
        assert r.status == 401
    async with g.session.get(f"{g.admin}/routes") as r:  # the guard still covers the rest
        assert r.status == 401
    for _ in range(3):
        async with g.session.get(f"{g.url}/items/1") as r:
            assert r.status == 200
    async with g.session.get(f"{g.url}/nowhere") as r:
        assert r.status == 404
    auth = {"Authorization": "Bearer s3cret"}
    async with g.session.get(f"{g.admin}/stats", headers=auth) as r:
        assert r.status == 200
        stats = await r.json()
    routes = {e["route"]: e for e in stats["routes"]}
    # the registry is process-wide, so other tests may have counted too: at least ours
    assert routes["items"]["requests"] >= 3 and routes["items"]["status"]["200"] >= 3
    assert "echo" in routes["items"]["services"]
    assert routes["items"]["latency_count"] >= 3 and routes["items"]["latency_sum"] > 0
    assert routes["-"]["status"]["404"] >= 1
    assert stats["time"] > 0


# --- in Chromium ---------------------------------------------------------------------------


def _browser() -> tuple[str, str]:
    chromium = next(
        (
            p
            for p in ("/usr/lib/chromium/chromium", shutil.which("chromium"))
            if p and Path(p).exists()
        ),
        None,
    )
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    if chromium and driver:
        return chromium, driver
    why = "headless Chromium is not installed (apt-get install -y chromium chromium-driver)"
    fail_or_skip(why)


class WebDriver:
    """Just enough of the W3C WebDriver protocol: navigate, run a script, screenshot."""

    def __init__(self, session: aiohttp.ClientSession, base: str, sid: str) -> None:
        self._http, self._base, self.sid = session, base, sid

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        url = f"{self._base}/session/{self.sid}{path}"
        async with self._http.request(method, url, json=body) as r:
            data = await r.json()
        if r.status != 200:
            raise AssertionError(f"webdriver {method} {path}: {data.get('value')}")
        return data["value"]

    async def get(self, url: str) -> None:
        await self._call("POST", "/url", {"url": url})

    async def js(self, script: str, *args: Any) -> Any:
        return await self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def wait_for(self, script: str, what: str, within: float = 15.0) -> Any:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            value = await self.js(script)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                body = await self.js("return document.body.innerText")
                raise AssertionError(f"timed out waiting for {what}; the page shows:\n{body}")
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path) -> None:
        png = base64.b64decode(await self._call("GET", "/screenshot"))

        def save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)

        await asyncio.to_thread(save)


@pytest.fixture
async def browser() -> AsyncIterator[WebDriver]:
    chromium, chromedriver = _browser()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        chromedriver,
        f"--port={port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="dashboard-chromium-") as profile:
        async with aiohttp.ClientSession() as http:
            try:
                for _ in range(100):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"{base}/status") as r:
                            if (await r.json())["value"]["ready"]:
                                break
                    await asyncio.sleep(0.1)
                caps = {
                    "capabilities": {
                        "alwaysMatch": {
                            "browserName": "chrome",
                            "goog:chromeOptions": {
                                "binary": chromium,
                                "args": [*CHROME_ARGS, f"--user-data-dir={profile}"],
                            },
                        }
                    }
                }
                async with http.post(f"{base}/session", json=caps) as r:
                    answer = await r.json()
                assert r.status == 200, f"chromedriver could not start Chromium: {answer}"
                driver = WebDriver(http, base, answer["value"]["sessionId"])
                try:
                    yield driver
                finally:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.delete(f"{base}/session/{driver.sid}"):
                            pass
            finally:
                proc.terminate()
                await proc.wait()


def breaker_is(state: str) -> str:
    """A script: is the echo breaker's row in the given state?"""
    return (
        "const r = document.querySelector('#breakers tr[data-service=\"echo\"]');"
        f"return !!r && r.dataset.state === '{state}';"
    )


async def test_dashboard_shows_an_open_breaker_and_live_rates(
    start_gateway, make_upstream, browser
):
    up = await make_upstream()
    g = await start_gateway(config(up.url))
    async with g.session.post(f"{g.admin}/breakers/echo/open") as r:
        assert r.status == 200

    await browser.get(f"{g.admin}/")
    await browser.wait_for(breaker_is("open"), "echo shown open")

    # traffic while the page polls: 503 from the open breaker, 200 through billing
    async def traffic() -> None:
        while True:
            for path in ("/items/1", "/billing/balance", "/billing/balance"):
                async with g.session.get(g.url + path):
                    pass
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(traffic())
    try:
        rate = (
            "const c = document.querySelector('tr[data-route=\"{}\"] [data-rate]');"
            "return c && parseFloat(c.textContent) > 0;"
        )
        await browser.wait_for(rate.format("items"), "a request rate on route items")
        await browser.wait_for(rate.format("billing"), "a request rate on route billing")
        await browser.wait_for(
            "return !!document.querySelector('tr[data-route=\"billing\"] svg.spark polyline');",
            "a sparkline of the rate",
        )
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    await browser.screenshot(SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 10_000

    text = await browser.js(
        "const t = (id) => document.getElementById(id).innerText;"
        "return {breakers: t('breakers'), routes: t('routes'), services: t('services'),"
        " open: t('c-open'), conn: t('conn'), err: t('c-err'),"
        " echo5xx: document.querySelector('tr[data-route=\"items\"]').cells[7].innerText,"
        " billing5xx: document.querySelector('tr[data-route=\"billing\"]').cells[7].innerText};"
    )
    assert "open (forced)" in text["breakers"] and "manual: forced open" in text["breakers"]
    assert "closed" in text["breakers"]  # billing
    assert "/items/{id}" in text["routes"] and "/billing/*" in text["routes"]
    assert up.url in text["services"] and "static" in text["services"]
    assert text["open"] == "1"
    assert text["conn"] == "live"
    assert text["echo5xx"] == "100 %"  # every request to the open breaker was refused
    assert text["billing5xx"] == "0 %"
    assert text["err"].endswith("%") and text["err"] != "0 %"

    # closing the breaker shows on the next poll, without reloading the page
    async with g.session.post(f"{g.admin}/breakers/echo/close") as r:
        assert r.status == 200
    await browser.wait_for(breaker_is("closed"), "echo closed")


async def test_dashboard_with_an_admin_token(start_gateway, make_upstream, browser):
    up = await make_upstream()
    g = await start_gateway(config(up.url), admin_token="s3cret")
    async with g.session.post(
        f"{g.admin}/breakers/echo/open", headers={"Authorization": "Bearer s3cret"}
    ) as r:
        assert r.status == 200

    # without a token the page loads and asks for one
    await browser.get(f"{g.admin}/")
    why = await browser.wait_for(
        "const l = document.getElementById('login');"
        "return !l.hidden && document.getElementById('login-why').innerText;",
        "the token form",
    )
    assert why == "This gateway's admin API requires a token."

    # ?token= is taken once, kept in sessionStorage and dropped from the address bar
    await browser.get(f"{g.admin}/?token=s3cret")
    await browser.wait_for(breaker_is("open"), "echo shown open")
    assert await browser.js("return location.search") == ""
    assert await browser.js("return sessionStorage.getItem('gateway.adminToken')") == "s3cret"
    assert await browser.js("return document.getElementById('login').hidden") is True

    # a wrong token typed in the form is refused, the right one works
    await browser.js(
        "document.getElementById('login-token').value = 'wrong';"
        "document.getElementById('login-form').requestSubmit();"
    )
    why = await browser.wait_for(
        "const l = document.getElementById('login');"
        "return !l.hidden && document.getElementById('login-why').innerText;",
        "the refusal",
    )
    assert why == "The admin API refused this token."
    await browser.js(
        "document.getElementById('login-token').value = 's3cret';"
        "document.getElementById('login-form').requestSubmit();"
    )
    await browser.wait_for(
        "return document.getElementById('login').hidden && "
        "document.getElementById('conn').innerText === 'live';",
        "the dashboard again",
    )
