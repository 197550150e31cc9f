"""The dashboard's JSON API and pages over real counters: calls authorized and settled through a
metered engine on the real Redis, configuration in SQLite, read back by ``guard dashboard``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime

import pytest
from dashboard_support import PARIS, UK_MOBILE, Harness, client_of, harness, row, tenants_read
from prometheus_client.parser import text_string_to_metric_families

from guard.config import repository
from guard.domain import Reason, Result
from guard.money import call_cost, parse_money
from guard.schedule import tenant_day, zone


@pytest.fixture
async def env(sqlite_url: str, redis_url: str, key_prefix: str) -> AsyncIterator[Harness]:
    async with harness(sqlite_url, redis_url, key_prefix) as found:
        yield found


async def test_overview_shows_todays_spend_reservations_and_live_calls(env: Harness) -> None:
    first = await env.authorize(number=UK_MOBILE)
    second = await env.authorize(extension="1002", number=PARIS)
    assert first.allowed and second.allowed
    settled = await env.engine.settle("acme", first.call_id, 61)
    async with client_of(env.dashboard()) as client:
        response = await client.get("/api/overview")
        assert response.status == 200
        body = await response.json()
    acme = row(body["tenants"], name="acme")
    assert acme["spent"] == settled.cost == parse_money("0.20")
    assert acme["reserved"] == second.reserved
    assert acme["live_calls"] == 1 and acme["concurrent_limit"] == 10
    assert acme["daily_limit"] == parse_money("50") and acme["currency"] == "GBP"
    assert acme["day"] == tenant_day("Europe/London", time.time())
    assert body["status"]["config_version"] == env.snapshots.current.version


async def test_tenant_page_data_per_extension_sorted_with_locks_and_agents(env: Harness) -> None:
    await env.authorize(number=UK_MOBILE)
    await env.authorize(extension="1002", number=PARIS)
    stolen = await env.authorize(user_agent="MicroSIP/3.21")
    assert stolen.reason is Reason.USER_AGENT_MISMATCH
    async with client_of(env.dashboard()) as client:
        body = await (await client.get("/api/tenants/acme?sort=reserved&order=desc")).json()
        ascending = await (await client.get("/api/tenants/acme?sort=reserved")).json()
        missing = await client.get("/api/tenants/nobody")
    # 1001 reserved its whole 5.00; 1002's hour to Paris at 0.08/min reserves 4.80.
    assert [e["name"] for e in body["extensions"]] == ["1001", "1002"]
    assert [e["name"] for e in ascending["extensions"]] == ["1002", "1001"]
    first = row(body["extensions"], name="1001")
    assert first["locked"] and first["lock_reason"] == "user_agent_mismatch"
    assert first["learned_user_agent"] == "Yealink SIP-T46S 66.86.0.15"
    assert first["ua_mode"] == "learn" and first["live_calls"] == 1
    assert body["tenant"]["refusals_last_hour"] == {"user_agent_mismatch": 1}
    assert body["tenant"]["alerts_today"] == {"locked": 1}
    assert [e["kind"] for e in body["events"]][:2] == ["refused", "locked"]
    assert missing.status == 404


async def test_hourly_spend_lands_in_the_tenants_local_hour(env: Harness) -> None:
    decision = await env.authorize(number=UK_MOBILE)
    settled = await env.engine.settle("acme", decision.call_id, 125)
    assert decision.destination is not None
    hour = datetime.now(zone("Europe/London")).hour
    async with client_of(env.dashboard()) as client:
        body = await (await client.get("/api/tenants/acme/hourly")).json()
        bad = await client.get("/api/tenants/acme/hourly?day=yesterday")
    assert body["hours"][hour]["spent"] == settled.cost == call_cost(decision.destination, 125)
    assert body["hours"][23]["cumulative"] == settled.cost
    assert body["extensions"] == {"1001": {str(hour): settled.cost}}
    assert bad.status == 400


async def test_live_calls_list_the_reservations(env: Harness) -> None:
    decision = await env.authorize(number=UK_MOBILE, channel="PJSIP/1001-00000abc")
    async with client_of(env.dashboard()) as client:
        body = await (await client.get("/api/calls")).json()
        page = await (await client.get("/calls")).text()
    call = row(body["calls"], call_id=decision.call_id)
    assert call["channel"] == "PJSIP/1001-00000abc" and call["extension"] == "1001"
    assert call["number"] == "447700900123" and call["destination"] == "UK mobile"
    assert call["reserved"] == decision.reserved and call["max_seconds"] == decision.max_seconds
    assert call["rate_per_minute"] == parse_money("0.10") and call["running_seconds"] >= 0
    assert "PJSIP/1001-00000abc" in page and "0.1000 GBP" in page


async def test_security_shows_scanners_refused_ips_and_recent_events(env: Harness) -> None:
    scanner = await env.authorize(user_agent="friendly-scanner", source_ip="203.0.113.7")
    assert scanner.reason is Reason.SCANNER_USER_AGENT
    for _ in range(2):
        await env.authorize(tenant="nobody", source_ip="198.51.100.9")
    async with client_of(env.dashboard()) as client:
        body = await (await client.get("/api/security")).json()
        events = await (await client.get("/api/events?tenant=acme&limit=5")).json()
    assert body["scanner_user_agents"] == [{"name": "friendly-scanner", "count": 1}]
    assert body["scanner_ips"] == [{"name": "203.0.113.7", "count": 1}]
    assert {"name": "198.51.100.9", "count": 2} in body["top_refused_ips"]
    assert any(event["reason"] == "unknown_tenant" for event in body["events"])
    assert all(event["tenant"] == "acme" for event in events["events"])


async def test_hostile_network_values_are_rendered_escaped(env: Harness) -> None:
    hostile = '<script>alert("ua")</script><img src=x onerror=alert(1)>'
    await env.authorize(user_agent=hostile)
    await env.authorize(user_agent=f"friendly-scanner {hostile}", source_ip="203.0.113.8")
    await env.authorize(number=f"0{hostile}")
    async with client_of(env.dashboard()) as client:
        pages = [await (await client.get(path)).text() for path in ("/tenants/acme", "/security")]
        stream = await client.get("/stream?view=tenant&tenant=acme")
        fragments = json.loads(
            (await stream.content.readuntil(b"\n\n")).decode().split("data: ")[1]
        )
        stream.close()
    for html in [*pages, *fragments.values()]:
        assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;ua&#34;)&lt;/script&gt;" in pages[0]
    assert "&lt;script&gt;" in pages[1]


async def test_pages_render_and_update_through_the_stream(env: Harness) -> None:
    async with client_of(env.dashboard(stream_interval=0.05)) as client:
        for path in ("/", "/tenants/acme", "/calls", "/security"):
            response = await client.get(path)
            assert response.status == 200, path
            assert "text/html" in response.headers["Content-Type"]
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        stream = await client.get("/stream?view=overview")
        assert stream.headers["Content-Type"] == "text/event-stream"
        before = (await stream.content.readuntil(b"\n\n")).decode()
        await env.authorize(number=UK_MOBILE)
        after = (await stream.content.readuntil(b"\n\n")).decode()
        stream.close()
    assert before.startswith("event: update\ndata: ") and after.startswith("event: update\n")
    tenants = json.loads(after.split("data: ", 1)[1])["tenants"]
    assert "5.0000 GBP" in tenants  # the mobile call's reservation, shown live


async def test_store_down_shows_an_error_not_a_crash(
    sqlite_url: str, key_prefix: str, redis_url: str
) -> None:
    async with (
        harness(sqlite_url, "redis://127.0.0.1:1/0", key_prefix) as dead,
        client_of(dead.dashboard()) as client,
    ):
        overview = await (await client.get("/api/overview")).json()
        page = await client.get("/tenants/acme")
        assert page.status == 200
    assert "counter store" in overview["store_error"]


async def test_metrics_export_spend_per_tenant_with_a_bounded_label_set(env: Harness) -> None:
    repository.add_tenant(env.sql, "zeta", actor="test", currency="EUR")
    env.reload()
    await env.authorize(number=UK_MOBILE)
    async with client_of(env.dashboard(metrics_max_tenants=1)) as client:
        response = await client.get("/metrics")
        text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    reserved = families["guard_tenant_reserved_today"].samples
    assert [(s.labels, s.value) for s in reserved] == [({"tenant": "acme", "currency": "GBP"}, 5.0)]
    assert families["guard_tenants"].samples[0].value == 2
    assert families["guard_live_calls"].samples[0].value == 1
    assert families["guard_blocked_ips"].samples[0].value == 0
    assert families["guard_dashboard_store_up"].samples[0].value == 1


async def test_a_refused_call_still_counts_in_decision_metrics(env: Harness) -> None:
    allowed = await env.authorize(number=UK_MOBILE)
    refused = await env.authorize(tenant="nobody")
    assert (allowed.result, refused.result) == (Result.ALLOW, Result.DENY)
    text = env.metrics.render().decode()
    assert 'guard_decisions_total{reason="allowed",result="ALLOW"} 1.0' in text
    assert 'guard_decisions_total{reason="unknown_tenant",result="DENY"} 1.0' in text


def _shadow_part(html: str, name: str) -> str:
    """The element a page marks as ``name``'s shadow counters (a table row or a summary)."""
    start = html.index(f'data-shadow-of="{name}"')
    ends = [html.find(tag, start) for tag in ("</tr>", "</dl>")]
    return html[start : min(end for end in ends if end >= 0)]


async def test_a_tenant_in_shadow_mode_shows_its_shadow_counters_beside_the_live_ones(
    env: Harness,
) -> None:
    repository.set_tenant(env.sql, "acme", actor="test", shadow=True)
    env.reload()
    first = await env.authorize(number=UK_MOBILE)
    second = await env.authorize(extension="1002", number=PARIS)
    refused = await env.authorize(number=PARIS)  # 1001 is domestic: a would-be refusal
    assert first.allowed and second.allowed and refused.reason is Reason.SHADOW
    settled = await env.engine.settle("acme", first.call_id, 61)
    assert settled.cost == parse_money("0.20")
    async with client_of(env.dashboard()) as client:
        overview = await (await client.get("/api/overview")).json()
        tenant = await (await client.get("/api/tenants/acme")).json()
        overview_html = await (await client.get("/")).text()
        tenant_html = await (await client.get("/tenants/acme")).text()
    acme = row(overview["tenants"], name="acme")
    # Nothing reached the live counters; the shadow ones hold the spend and the open call.
    assert (acme["spent"], acme["reserved"], acme["live_calls"]) == (0, 0, 0)
    shadow = {"spent": parse_money("0.20"), "reserved": parse_money("4.80"), "live_calls": 1}
    assert {key: acme["shadow"][key] for key in shadow} == shadow
    assert acme["shadow"]["tenant"] is True and acme["shadow"]["extensions"] == []
    assert acme["shadow"]["used"] == 0.1  # 5.00 of the tenant's 50.00
    assert tenant["tenant"]["shadow"] == acme["shadow"]
    mobile, paris = row(tenant["extensions"], name="1001"), row(tenant["extensions"], name="1002")
    assert (mobile["spent"], paris["reserved"]) == (0, 0)
    assert mobile["shadow"] == {
        "spent": parse_money("0.20"),
        "reserved": 0,
        "used": 0.04,
        "live_calls": 0,
    }
    assert paris["shadow"]["reserved"] == parse_money("4.80") and paris["shadow"]["live_calls"] == 1
    assert [event["kind"] for event in tenant["events"]] == ["shadow_refused"]
    for html, name in ((overview_html, "acme"), (tenant_html, "acme"), (tenant_html, "1001")):
        part = _shadow_part(html, name)
        assert "SHADOW" in part and "0.2000 GBP" in part, (name, part)
    assert "4.8000 GBP" in _shadow_part(overview_html, "acme")
    assert "4.8000 GBP" in _shadow_part(tenant_html, "1002")
    assert "shadow_refused" in tenant_html


async def test_one_extension_in_shadow_mode_marks_the_tenant_and_that_extension_only(
    env: Harness,
) -> None:
    repository.set_extension(env.sql, "acme", "1002", actor="test", shadow=True)
    env.reload()
    enforced = await env.authorize(number=UK_MOBILE)
    shadowed = await env.authorize(extension="1002", number=PARIS)
    assert enforced.allowed and shadowed.allowed
    async with client_of(env.dashboard()) as client:
        tenant = await (await client.get("/api/tenants/acme")).json()
        html = await (await client.get("/tenants/acme")).text()
    summary = tenant["tenant"]
    assert summary["reserved"] == parse_money("5") and summary["live_calls"] == 1
    assert summary["shadow"]["tenant"] is False and summary["shadow"]["extensions"] == ["1002"]
    assert summary["shadow"]["reserved"] == parse_money("4.80")
    assert row(tenant["extensions"], name="1001")["shadow"] is None
    assert row(tenant["extensions"], name="1002")["shadow"]["live_calls"] == 1
    assert 'data-shadow-of="1002"' in html and 'data-shadow-of="1001"' not in html


async def test_a_tenant_not_in_shadow_mode_shows_no_shadow_counters_and_reads_none(
    env: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shadow counters left over from an earlier trial are not shown once the tenant enforces.
    repository.set_tenant(env.sql, "acme", actor="test", shadow=True)
    env.reload()
    assert (await env.authorize(extension="1002", number=PARIS)).allowed
    repository.set_tenant(env.sql, "acme", actor="test", shadow=False)
    env.reload()
    assert (await env.authorize(number=UK_MOBILE)).allowed
    reads = tenants_read(monkeypatch, env.shadow_ledger, "counters")
    async with client_of(env.dashboard()) as client:
        overview = await (await client.get("/api/overview")).json()
        tenant = await (await client.get("/api/tenants/acme")).json()
        pages = [await (await client.get(path)).text() for path in ("/", "/tenants/acme")]
    acme = row(overview["tenants"], name="acme")
    assert acme["reserved"] == parse_money("5") and acme["shadow"] is None
    assert tenant["tenant"]["shadow"] is None
    assert all(extension["shadow"] is None for extension in tenant["extensions"])
    assert all("SHADOW" not in html and "data-shadow-of" not in html for html in pages)
    assert reads == []


def _add_zeta(env: Harness) -> None:
    """A second tenant, ``zeta`` (GBP, UK numbers), enforced, with extension ``2001``."""
    repository.add_tenant(env.sql, "zeta", actor="test", currency="GBP", country_code="44")
    repository.add_extension(env.sql, "zeta", "2001", actor="test")
    env.reload()


def _call_row(html: str, call_id: str) -> str:
    """The live-calls table row of ``call_id``."""
    start = html.index(f'<tr data-call="{call_id}"')
    return html[start : html.index("</tr>", start)]


async def test_live_calls_list_a_shadow_tenants_calls_marked_shadow(env: Harness) -> None:
    repository.set_tenant(env.sql, "acme", actor="test", shadow=True)
    _add_zeta(env)
    shadowed = await env.authorize(extension="1002", number=PARIS)
    enforced = await env.authorize(tenant="zeta", extension="2001", number=UK_MOBILE)
    assert shadowed.allowed and enforced.allowed
    assert await env.ledger.live_calls("acme") == []  # held by the shadow counters only
    async with client_of(env.dashboard(actions=True)) as client:
        body = await (await client.get("/api/calls")).json()
        acme_only = await (await client.get("/api/calls?tenant=acme")).json()
        zeta_only = await (await client.get("/api/calls?tenant=zeta")).json()
        page = await (await client.get("/calls")).text()
        metrics = await (await client.get("/metrics")).text()
    shadow_call = row(body["calls"], call_id=shadowed.call_id)
    assert shadow_call["shadow"] is True and shadow_call["tenant"] == "acme"
    assert shadow_call["extension"] == "1002" and shadow_call["destination"] == "France"
    assert shadow_call["reserved"] == parse_money("4.80")  # an hour to Paris at 0.08/min
    live_call = row(body["calls"], call_id=enforced.call_id)
    assert live_call["shadow"] is False and live_call["tenant"] == "zeta"
    assert set(shadow_call) == set(live_call)  # one shape, the mark aside
    assert (body["call_count"], body["shadow_call_count"]) == (2, 1)
    assert [c["call_id"] for c in acme_only["calls"]] == [shadowed.call_id]
    assert acme_only["shadow_call_count"] == 1
    assert [c["call_id"] for c in zeta_only["calls"]] == [enforced.call_id]
    assert zeta_only["shadow_call_count"] == 0
    shadow_html, live_html = _call_row(page, shadowed.call_id), _call_row(page, enforced.call_id)
    assert 'data-shadow="true"' in shadow_html and "SHADOW" in shadow_html
    assert "4.8000 GBP" in shadow_html and "Hang up" not in shadow_html
    assert "SHADOW" not in live_html and "data-shadow" not in live_html
    assert "Hang up" in live_html
    families = {family.name: family for family in text_string_to_metric_families(metrics)}
    assert families["guard_live_calls"].samples[0].value == 1  # the live one only


async def test_live_calls_read_no_shadow_counters_of_tenants_not_in_shadow_mode(
    env: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shadow call left over from an earlier trial is not listed once the tenant enforces.
    repository.set_tenant(env.sql, "acme", actor="test", shadow=True)
    env.reload()
    leftover = await env.authorize(extension="1002", number=PARIS)
    repository.set_tenant(env.sql, "acme", actor="test", shadow=False)
    _add_zeta(env)
    live = await env.authorize(number=UK_MOBILE)
    assert leftover.allowed and live.allowed
    reads = tenants_read(monkeypatch, env.shadow_ledger, "live_calls")
    async with client_of(env.dashboard(stream_interval=0.05)) as client:
        body = await (await client.get("/api/calls")).json()
        page = await (await client.get("/calls")).text()
        await client.get("/metrics")
        stream = await client.get("/stream?view=calls")
        fragment = json.loads(
            (await stream.content.readuntil(b"\n\n")).decode().split("data: ")[1]
        )["calls"]
        stream.close()
    assert reads == []
    assert [c["call_id"] for c in body["calls"]] == [live.call_id]
    assert body["calls"][0]["shadow"] is False and body["shadow_call_count"] == 0
    assert all("SHADOW" not in html and "data-shadow" not in html for html in (page, fragment))
    # Once one extension of acme is in shadow mode, acme's shadow calls are read; zeta's never.
    repository.set_extension(env.sql, "acme", "1002", actor="test", shadow=True)
    env.reload()
    async with client_of(env.dashboard()) as client:
        body = await (await client.get("/api/calls")).json()
    assert reads == ["acme"]
    assert row(body["calls"], call_id=leftover.call_id)["shadow"] is True
    assert row(body["calls"], call_id=live.call_id)["shadow"] is False
