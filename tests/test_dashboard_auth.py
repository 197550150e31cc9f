"""Who may use the dashboard: logins, tokens, cookies, CSRF, rate limits, safe binding, actions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient
from dashboard_support import PARIS, UK_MOBILE, Harness, client_of, csrf_of, harness
from sqlalchemy.orm import Session as SqlSession

from guard.ari.testing import AriStandIn
from guard.config import repository
from guard.config.audit import audit_writer
from guard.config.models import AuditEvent
from guard.dashboard.app import DashboardConfig, is_loopback
from guard.dashboard.auth import LoginLimiter, Sessions, hash_password, verify_password
from guard.dashboard.server import ari_hangup, run_dashboard
from guard.domain import Reason
from guard.errors import ConfigurationError
from guard.events import EventKind
from guard.schedule import tenant_day
from guard.settings import load_settings

PASSWORD = "correct horse battery staple"
TOKEN = "t0ken-" + "x" * 40
HASH = hash_password(PASSWORD)


@pytest.fixture
async def env(sqlite_url: str, redis_url: str, key_prefix: str) -> AsyncIterator[Harness]:
    async with harness(sqlite_url, redis_url, key_prefix) as found:
        yield found


def test_password_hashes_verify_and_never_contain_the_password() -> None:
    assert PASSWORD not in HASH and HASH.startswith("scrypt:")
    assert verify_password(PASSWORD, HASH)
    assert not verify_password(PASSWORD + "!", HASH)
    assert not verify_password(PASSWORD, "scrypt:1:1:1:AA:AA")
    assert not verify_password(PASSWORD, "not a hash")
    with pytest.raises(ConfigurationError):
        hash_password("short")


def test_sessions_are_signed_expire_and_end_when_the_password_changes() -> None:
    sessions = Sessions("secret", HASH, lifetime=60)
    cookie, session = sessions.issue("admin", now=1000)
    assert sessions.check(cookie, now=1010) == session
    assert sessions.check(cookie, now=1061) is None
    assert sessions.check(cookie.replace(".", "x."), now=1010) is None
    payload, signature = cookie.split(".")
    assert sessions.check(f"{payload[:-2]}AA.{signature}", now=1010) is None
    assert Sessions("secret", hash_password("another password"), 60).check(cookie, 1010) is None
    assert sessions.csrf_ok(session, sessions.csrf_token(session))
    assert not sessions.csrf_ok(session, "")
    sessions.revoke(session, now=1010)
    assert sessions.check(cookie, now=1011) is None


def test_login_limiter_blocks_one_client_then_forgives() -> None:
    limiter = LoginLimiter(attempts=3, window=60, global_attempts=5)
    for at in range(3):
        assert limiter.retry_after("a", now=at) == 0
        limiter.failed("a", now=at)
    assert limiter.retry_after("a", now=10) == pytest.approx(50)
    assert limiter.retry_after("b", now=10) == 0
    limiter.failed("b", now=11)
    limiter.failed("c", now=12)
    assert limiter.retry_after("d", now=13) == pytest.approx(47)  # everyone: 5 in the window
    assert limiter.retry_after("a", now=61) == 0


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_refuses_a_public_address_without_a_login() -> None:
    with pytest.raises(ConfigurationError, match=r"0\.0\.0\.0:8080 without a login"):
        DashboardConfig(listen=("0.0.0.0", 8080)).check_listen()
    DashboardConfig(listen=("0.0.0.0", 8080), password_hash=HASH).check_listen()
    DashboardConfig(listen=("0.0.0.0", 8080), token=TOKEN).check_listen()
    DashboardConfig(listen=("127.0.0.1", 8080)).check_listen()


async def test_guard_dashboard_refuses_to_start_public_without_auth() -> None:
    settings = load_settings({"GUARD_DASHBOARD_LISTEN": "0.0.0.0:8080"})
    with pytest.raises(ConfigurationError, match="without a login"):
        await run_dashboard(settings)


def test_secrets_never_show_in_the_public_settings() -> None:
    settings = load_settings(
        {
            "GUARD_DASHBOARD_PASSWORD_HASH": HASH,
            "GUARD_DASHBOARD_TOKEN": TOKEN,
            "GUARD_DASHBOARD_SESSION_SECRET": "s3cret-key",
        }
    )
    shown = str(settings.public())
    assert HASH not in shown and TOKEN not in shown and "s3cret-key" not in shown
    with pytest.raises(ConfigurationError, match="GUARD_DASHBOARD_PASSWORD_HASH"):
        load_settings({"GUARD_DASHBOARD_PASSWORD_HASH": PASSWORD})
    with pytest.raises(ConfigurationError, match="GUARD_DASHBOARD_TOKEN"):
        load_settings({"GUARD_DASHBOARD_TOKEN": "short"})


async def test_without_a_login_pages_redirect_and_the_api_answers_401(env: Harness) -> None:
    async with client_of(env.dashboard(password_hash=HASH, token=TOKEN)) as client:
        page = await client.get("/tenants/acme?sort=spent", allow_redirects=False)
        api = await client.get("/api/overview")
        metrics = await client.get("/metrics")
        stream = await client.get("/stream?view=overview")
        wrong = await client.get("/api/overview", headers={"Authorization": "Bearer nope"})
        static = await client.get("/static/dashboard.js")
    assert page.status == 302
    location = urlsplit(page.headers["Location"])
    assert location.path == "/login"
    assert parse_qs(location.query) == {"next": ["/tenants/acme?sort=spent"]}
    assert api.status == metrics.status == stream.status == wrong.status == 401
    assert api.headers["WWW-Authenticate"].startswith("Bearer")
    assert static.status == 200


async def test_bearer_token_opens_the_api(env: Harness) -> None:
    async with client_of(env.dashboard(token=TOKEN)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/api/overview", headers=auth)).status == 200
        assert (await client.get("/metrics", headers=auth)).status == 200


async def test_login_with_password_sets_a_hardened_cookie(env: Harness) -> None:
    async with client_of(env.dashboard(password_hash=HASH)) as client:
        form = await client.get("/login?next=/security")
        assert form.status == 200 and 'value="/security"' in await form.text()
        bad = await client.post("/login", data={"user": "admin", "password": "guess"})
        assert bad.status == 401 and "Wrong user or password" in await bad.text()
        assert "guard_session" not in bad.cookies
        wrong_user = await client.post("/login", data={"user": "root", "password": PASSWORD})
        assert wrong_user.status == 401
        good = await client.post(
            "/login",
            data={"user": "admin", "password": PASSWORD, "next": "https://evil.example/"},
            allow_redirects=False,
        )
        assert good.status == 303 and good.headers["Location"] == "/"
        cookie = good.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        assert PASSWORD not in cookie
        page = await client.get("/")
        assert page.status == 200 and "Log out" in await page.text()
        logout = await client.post(
            "/logout", data={"csrf": csrf_of(await page.text())}, allow_redirects=False
        )
        assert logout.status == 303
        client.session.cookie_jar.update_cookies({"guard_session": cookie.split(";")[0][14:]})
        after = await client.get("/", allow_redirects=False)
        assert after.status == 302  # the logged-out session is refused even if replayed


async def test_secure_cookies_behind_tls(env: Harness) -> None:
    async with client_of(env.dashboard(token=TOKEN, secure_cookies=True)) as client:
        good = await client.post(
            "/login", data={"user": "", "password": TOKEN}, allow_redirects=False
        )
    cookie = good.headers["Set-Cookie"]
    assert good.status == 303 and cookie.startswith("__Host-guard_session=")
    assert "Secure" in cookie and "HttpOnly" in cookie


async def test_login_is_rate_limited(env: Harness) -> None:
    async with client_of(env.dashboard(password_hash=HASH)) as client:
        for _ in range(5):
            bad = await client.post("/login", data={"user": "admin", "password": "guess"})
            assert bad.status == 401
        limited = await client.post("/login", data={"user": "admin", "password": PASSWORD})
    assert limited.status == 429 and int(limited.headers["Retry-After"]) > 0


async def _logged_in(client: TestClient[Any, Any]) -> str:
    """Log in and return the CSRF token of the session."""
    await client.post("/login", data={"user": "admin", "password": PASSWORD})
    return csrf_of(await (await client.get("/tenants/acme")).text())


async def test_posts_without_the_csrf_token_are_refused(env: Harness) -> None:
    async with client_of(env.dashboard(password_hash=HASH, actions=True)) as client:
        csrf = await _logged_in(client)
        for data in ({}, {"csrf": "forged"}):
            refused = await client.post(
                "/actions/unblock", data={"ip": "192.0.2.1", **data}, allow_redirects=False
            )
            assert refused.status == 403
        header = await client.post(
            "/api/actions/unblock", json={"ip": "192.0.2.1"}, headers={"X-CSRF-Token": csrf}
        )
        assert header.status == 409  # accepted; nothing was blocked
        logout = await client.post("/logout", allow_redirects=False)
        assert logout.status == 403


async def test_actions_are_off_by_default(env: Harness) -> None:
    async with client_of(env.dashboard(password_hash=HASH)) as client:
        csrf = await _logged_in(client)
        form = await client.post(
            "/actions/unlock",
            data={"csrf": csrf, "tenant": "acme", "extension": "1001"},
            headers={"Referer": "/tenants/acme"},
            allow_redirects=False,
        )
        api = await client.post(
            "/api/actions/hangup",
            json={"tenant": "acme", "call_id": "x"},
            headers={"X-CSRF-Token": csrf},
        )
        page = await (await client.get("/tenants/acme?error=actions_disabled")).text()
        api_body = await api.json()
    assert form.status == 303
    assert form.headers["Location"] == "/tenants/acme?error=actions_disabled"
    assert api.status == 403 and api_body["result"] == "actions_disabled"
    assert "Actions are off" in page and "/actions/unlock" not in page


async def test_unlock_is_audited_and_clears_the_runtime_lock(env: Harness) -> None:
    await env.authorize()
    locked = await env.authorize(user_agent="MicroSIP/3.21")
    assert locked.reason is Reason.USER_AGENT_MISMATCH
    async with client_of(env.dashboard(password_hash=HASH, actions=True)) as client:
        csrf = await _logged_in(client)
        page = await (await client.get("/tenants/acme")).text()
        assert 'action="/actions/unlock"' in page
        done = await client.post(
            "/actions/unlock",
            data={"csrf": csrf, "tenant": "acme", "extension": "1001"},
            headers={"Referer": "/tenants/acme?sort=spent"},
            allow_redirects=False,
        )
        again = await client.post(
            "/api/actions/unlock",
            json={"tenant": "acme", "extension": "1001"},
            headers={"X-CSRF-Token": csrf},
        )
        again_body = await again.json()
    assert done.headers["Location"] == "/tenants/acme?sort=spent&done=unlocked"
    assert again.status == 409 and again_body["result"] == "not_locked"
    assert not (await env.ledger.extension_state("acme", "1001")).locked
    admin = [e for e in env.seen if e.kind == EventKind.ADMIN]
    assert [(e.reason, e.detail["result"], e.detail["actor"]) for e in admin] == [
        ("dashboard.unlock", "unlocked", "dashboard:admin"),
        ("dashboard.unlock", "not_locked", "dashboard:admin"),
    ]
    await env.events.flush(audit_writer(env.sql))
    with SqlSession(env.sql) as session:
        rows = session.scalars(
            sa.select(AuditEvent).where(AuditEvent.kind == EventKind.ADMIN)
        ).all()
    assert [(r.reason, r.tenant, r.extension, r.actor) for r in rows][:1] == [
        ("dashboard.unlock", "acme", "1001", "dashboard:admin")
    ]


async def test_config_lock_is_lifted_through_sql(env: Harness) -> None:
    repository.lock_extension(env.sql, "acme", "1002", actor="test")
    env.reload()
    async with client_of(env.dashboard(token=TOKEN, actions=True)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        done = await client.post(
            "/api/actions/unlock", json={"tenant": "acme", "extension": "1002"}, headers=auth
        )
    assert done.status == 200
    assert not repository.get_extension(env.sql, "acme", "1002").locked
    assert await env.ledger.config_version() == repository.read_version(env.sql)


async def test_unblock_lifts_an_ip_block(env: Harness) -> None:
    await env.ledger.block_ip("203.0.113.9", seconds=None, reason="manual", by="test", now=1.0)
    async with client_of(env.dashboard(token=TOKEN, actions=True)) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        security = await (await client.get("/api/security", headers=auth)).json()
        assert [b["ip"] for b in security["blocked_ips"]] == ["203.0.113.9"]
        bad = await client.post("/api/actions/unblock", json={"ip": "not-an-ip"}, headers=auth)
        done = await client.post("/api/actions/unblock", json={"ip": "203.0.113.9"}, headers=auth)
    assert bad.status == 400 and done.status == 200
    assert await env.ledger.ip_blocks(time.time()) == []


async def test_hang_up_needs_ari_and_a_live_call(env: Harness) -> None:
    decision = await env.authorize(number=UK_MOBILE)
    hung: list[str] = []

    async def hangup(channel_id: str) -> bool:
        hung.append(channel_id)
        return True

    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"tenant": "acme", "call_id": decision.call_id}
    async with client_of(env.dashboard(token=TOKEN, actions=True)) as client:
        no_ari = await client.post("/api/actions/hangup", json=body, headers=auth)
        no_ari_body = await no_ari.json()
    async with client_of(env.dashboard(hangup, token=TOKEN, actions=True)) as client:
        page = await (await client.get("/calls", headers=auth)).text()
        unknown = await client.post(
            "/api/actions/hangup", json={**body, "call_id": "gone"}, headers=auth
        )
        done = await client.post("/api/actions/hangup", json=body, headers=auth)
    assert no_ari.status == 503 and no_ari_body["result"] == "ari_not_configured"
    assert "Hang up" in page
    assert unknown.status == 404 and done.status == 200
    assert hung == [decision.call_id]


async def test_hang_up_reaches_live_calls_only_and_changes_no_counters(env: Harness) -> None:
    repository.set_extension(env.sql, "acme", "1002", actor="test", shadow=True)
    env.reload()
    live = await env.authorize(number=UK_MOBILE)
    shadowed = await env.authorize(extension="1002", number=PARIS)
    day = tenant_day("Europe/London", time.time())
    before = (
        await env.ledger.counters("acme", day),
        await env.shadow_ledger.counters("acme", day),
        await env.ledger.live_calls("acme"),
        await env.shadow_ledger.live_calls("acme"),
    )
    assert [call.call_id for call in before[3]] == [shadowed.call_id]
    hung: list[str] = []

    async def hangup(channel_id: str) -> bool:
        hung.append(channel_id)
        return True

    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with client_of(env.dashboard(hangup, token=TOKEN, actions=True)) as client:
        page = await (await client.get("/calls", headers=auth)).text()
        refused = await client.post(
            "/api/actions/hangup",
            json={"tenant": "acme", "call_id": shadowed.call_id},
            headers=auth,
        )
        refused_body = await refused.json()
        done = await client.post(
            "/api/actions/hangup", json={"tenant": "acme", "call_id": live.call_id}, headers=auth
        )
    assert page.count("Hang up") == 1 and page.count('data-shadow="true"') == 1
    assert refused.status == 404 and refused_body["result"] == "not_found"
    assert done.status == 200 and hung == [live.call_id]
    # Hanging up settles nothing: the call's own settle does, on the counters that hold it.
    after = (
        await env.ledger.counters("acme", day),
        await env.shadow_ledger.counters("acme", day),
        await env.ledger.live_calls("acme"),
        await env.shadow_ledger.live_calls("acme"),
    )
    assert after == before


async def test_open_mode_on_loopback_still_checks_csrf(env: Harness) -> None:
    await env.ledger.block_ip("192.0.2.1", seconds=None, reason="manual", by="test", now=1.0)
    async with client_of(env.dashboard(actions=True)) as client:
        page = await (await client.get("/security")).text()
        assert "Log out" not in page
        refused = await client.post("/api/actions/unblock", json={"ip": "192.0.2.1"})
        done = await client.post(
            "/api/actions/unblock",
            json={"ip": "192.0.2.1"},
            headers={"X-CSRF-Token": csrf_of(page)},
        )
    assert refused.status == 403 and done.status == 200


async def test_hang_up_over_ari_when_it_is_configured(env: Harness) -> None:
    decision = await env.authorize(number=UK_MOBILE)
    async with AriStandIn(username="guard", password="ari-secret") as ari:
        ari.add_channel(channel_id=decision.call_id)
        settings = replace(
            load_settings({}), ari_url=ari.base_url, ari_user="guard", ari_password="ari-secret"
        )
        async with ari_hangup(settings) as hangup, ari_hangup(load_settings({})) as none:
            assert none is None and hangup is not None
            dashboard = env.dashboard(hangup, token=TOKEN, actions=True)
            async with client_of(dashboard) as client:
                auth = {"Authorization": f"Bearer {TOKEN}"}
                body = {"tenant": "acme", "call_id": decision.call_id}
                done = await client.post("/api/actions/hangup", json=body, headers=auth)
                gone = await client.post("/api/actions/hangup", json=body, headers=auth)
        deletes = [c.path for c in ari.calls if c.method == "DELETE"]
    assert done.status == 200
    assert gone.status == 404  # the stand-in forgot the channel: already gone
    assert deletes == [f"/channels/{decision.call_id}"] * 2
