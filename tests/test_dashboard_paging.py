"""Paging of the dashboard's long listings (tenants, a tenant's extensions, live calls) over the
real Redis: every row exactly once in a fixed order, the counter reads still one batch per page,
bad ``offset``/``limit`` refused with a 400, and previous/next links that keep the page's other
parameters, on the page and on its live stream.

Thousands of tenants or extensions are put straight into the configuration snapshot (what the
dashboard reads), not through SQL one by one; live calls are real reservations in Redis.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from html import unescape
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from dashboard_support import RATES, UK_MOBILE, Harness, client_of, harness, tenants_read
from prometheus_client.parser import text_string_to_metric_families

from guard.config import repository
from guard.dashboard.data import MAX_ROWS
from guard.ledger.redis_ledger import RedisLedger
from guard.ledger.types import ReserveRequest
from guard.schedule import tenant_day

Client = TestClient[Any, Any]


@pytest.fixture
async def env(sqlite_url: str, redis_url: str, key_prefix: str) -> AsyncIterator[Harness]:
    async with harness(sqlite_url, redis_url, key_prefix) as found:
        yield found


async def _walk(
    client: Client, path: str, key: str, **query: str
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Every row of the listing at ``path``, page after page by ``next_offset``, and each
    page's ``page`` object."""
    rows: list[Mapping[str, Any]] = []
    pages: list[Mapping[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        response = await client.get(path, params={**query, "offset": str(offset)})
        assert response.status == 200, await response.text()
        body = await response.json()
        rows.extend(body[key])
        pages.append(body["page"])
        offset = body["page"]["next_offset"]
        assert len(pages) <= 10, pages
    return rows, pages


def _add_tenants(env: Harness, names: list[str]) -> None:
    """Tenants ``names`` in the snapshot, configured like ``acme``."""
    snapshot = env.snapshots.current
    tenants = dict(snapshot.tenants)
    tenants.update({name: replace(snapshot.tenants["acme"], name=name) for name in names})
    env.snapshots.current = replace(snapshot, tenants=tenants)


def _add_extensions(env: Harness, names: list[str]) -> None:
    """Extensions ``names`` of ``acme`` in the snapshot, configured like ``1002``."""
    snapshot = env.snapshots.current
    extensions = dict(snapshot.extensions)
    model = snapshot.extensions[("acme", "1002")]
    extensions.update({("acme", name): replace(model, name=name) for name in names})
    env.snapshots.current = replace(snapshot, extensions=extensions)


async def _reserve(
    ledger: RedisLedger, tenant: str, count: int, start: float, *, per_second: int = 3
) -> list[str]:
    """``count`` open calls of ``tenant`` (extension ``2001``), ``per_second`` of them started in
    each second from ``start``; their call ids."""
    ids = [f"{tenant}-{n:05d}" for n in range(count)]
    requests = [
        ReserveRequest(
            tenant=tenant,
            extension="2001",
            call_id=call_id,
            day=tenant_day("UTC", start),
            now=start + n // per_second,
            rate=RATES[0],
            number="442079460000",
            ext_daily_limit=None,
            tenant_daily_limit=None,
            ext_concurrent_limit=None,
            tenant_concurrent_limit=None,
            max_call_seconds=3600,
            channel=f"PJSIP/2001-{n:08x}",
        )
        for n, call_id in enumerate(ids)
    ]
    for first in range(0, count, 200):
        await asyncio.gather(*(ledger.reserve(r) for r in requests[first : first + 200]))
    return ids


def _pager_links(html: str) -> dict[str, set[str]]:
    """The previous/next links of a page's pagers (above and below its table), unescaped."""
    return {
        rel: {unescape(link) for link in re.findall(rf'rel="{rel}" href="([^"]*)"', html)}
        for rel in ("prev", "next")
    }


def _call_ids(html: str) -> list[str]:
    """The call ids of a live-calls table's rows, unescaped."""
    return [unescape(call_id) for call_id in re.findall(r'<tr data-call="([^"]*)"', html)]


def _rows_shown(html: str) -> set[str]:
    """The texts of the pagers' "rows first to last of total"."""
    return set(re.findall(r'<span class="rows">([^<]*)</span>', html))


async def _first_update(client: Client, html: str) -> dict[str, str]:
    """The fragments of the first update of the live stream that page ``html`` names."""
    stream_url = unescape(re.findall(r'data-stream="([^"]*)"', html)[0])
    stream = await client.get(stream_url)
    assert stream.status == 200, await stream.text()
    event = (await stream.content.readuntil(b"\n\n")).decode()
    stream.close()
    fragments: dict[str, str] = json.loads(event.split("data: ", 1)[1])
    return fragments


async def test_paging_walks_every_extension_once_with_one_state_read_per_page(
    env: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"ext{n}" for n in range(2_500)]  # ext10 sorts before ext2: names sort as text
    _add_extensions(env, names)
    locked = ["ext7", "ext1500", "ext2499"]
    for name in locked:
        await env.ledger.lock_extension("acme", name, "test")
    everyone = sorted([*names, "1001", "1002"])
    reads: list[int] = []
    real = env.ledger.extension_states

    async def counting(tenant: str, extensions: Any) -> Any:
        reads.append(len(extensions))
        return await real(tenant, extensions)

    monkeypatch.setattr(env.ledger, "extension_states", counting)
    async with client_of(env.dashboard()) as client:
        rows, pages = await _walk(client, "/api/tenants/acme", "extensions")
        by_lock, lock_pages = await _walk(
            client, "/api/tenants/acme", "extensions", sort="locked", order="desc", limit="700"
        )
    assert [row["name"] for row in rows] == everyone
    assert [(p["first"], p["last"], p["total"]) for p in pages] == [
        (1, 1000, 2502),
        (1001, 2000, 2502),
        (2001, 2502, 2502),
    ]
    assert pages[0]["previous_offset"] is None and pages[-1]["next_offset"] is None
    assert [p["previous_offset"] for p in pages[1:]] == [0, 1000]
    assert {p["limit"] for p in pages} == {MAX_ROWS}
    # Locked first (names descending, as the whole key is reversed), then the rest, each once.
    assert [row["name"] for row in by_lock] == sorted(
        everyone, key=lambda name: (name in locked, name), reverse=True
    )
    assert [row["locked"] for row in by_lock[:4]] == [True, True, True, False]
    assert len(lock_pages) == 4 and lock_pages[-1]["last"] == 2502
    # One batched read of every extension's state per page asked for, never one per row.
    assert reads == [2502] * (len(pages) + len(lock_pages))


async def test_paging_walks_every_live_call_once_oldest_first(
    env: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository.set_tenant(env.sql, "acme", actor="test", shadow=True)
    repository.add_tenant(env.sql, "zeta", actor="test", currency="GBP", country_code="44")
    env.reload()
    start = float(int(time.time()) - 3_000)
    # Calls of both tenants start in the same seconds: ties go by tenant, then call id.
    shadowed = await _reserve(env.shadow_ledger, "acme", 300, start, per_second=1)
    live = await _reserve(env.ledger, "zeta", 1_200, start)
    reads = tenants_read(monkeypatch, env.ledger, "live_calls")
    async with client_of(env.dashboard()) as client:
        rows, pages = await _walk(client, "/api/calls", "calls", limit="500")
        zeta, zeta_pages = await _walk(client, "/api/calls", "calls", tenant="zeta")
        first = await (await client.get("/api/calls")).json()
    keys = [(row["tenant"], row["call_id"], row["shadow"]) for row in rows]
    assert len(keys) == len(set(keys)) == 1_500
    assert set(keys) == {("acme", i, True) for i in shadowed} | {("zeta", i, False) for i in live}
    assert keys == [
        (row["tenant"], row["call_id"], row["shadow"])
        for row in sorted(rows, key=lambda row: (row["started"], row["tenant"], row["call_id"]))
    ]
    assert [(p["first"], p["last"]) for p in pages] == [(1, 500), (501, 1000), (1001, 1500)]
    assert {p["total"] for p in pages} == {1_500}
    assert [row["call_id"] for row in zeta] == live
    assert [(p["first"], p["last"], p["total"]) for p in zeta_pages] == [
        (1, 1000, 1200),
        (1001, 1200, 1200),
    ]
    # The default page is the first MAX_ROWS; the counts are of every call, not of the page.
    assert len(first["calls"]) == MAX_ROWS and first["page"]["next_offset"] == MAX_ROWS
    assert (first["call_count"], first["shadow_call_count"]) == (1_500, 300)
    # One read of each tenant's calls per page asked for, never one per row.
    assert sorted(reads) == sorted(["acme", "zeta"] * (len(pages) + 1) + ["zeta"] * 2)


async def test_tenants_page_by_name_and_metrics_still_rank_all_of_them_by_spend(
    env: Harness,
) -> None:
    assert (await env.authorize(number=UK_MOBILE)).allowed
    names = [f"a{n:04d}" for n in range(1_100)]  # all sort before "acme"
    _add_tenants(env, names)
    async with client_of(env.dashboard(metrics_max_tenants=1)) as client:
        rows, pages = await _walk(client, "/api/overview", "tenants")
        metrics = await (await client.get("/metrics")).text()
    assert [row["name"] for row in rows] == [*names, "acme"]
    assert [(p["first"], p["last"], p["total"]) for p in pages] == [
        (1, 1000, 1101),
        (1001, 1101, 1101),
    ]
    assert rows[-1]["reserved"] == 50_000  # acme, the only one spending, on the second page
    families = {family.name: family for family in text_string_to_metric_families(metrics)}
    reserved = families["guard_tenant_reserved_today"].samples
    assert [(s.labels["tenant"], s.value) for s in reserved] == [("acme", 5.0)]
    assert families["guard_tenants"].samples[0].value == 1_101


@pytest.mark.parametrize("path", ["/api/overview", "/api/tenants/acme", "/api/calls"])
async def test_bad_offset_or_limit_is_a_400_with_a_json_error(env: Harness, path: str) -> None:
    bad = [
        *({"offset": text} for text in ("-1", "abc", "1.5", " 1", "+1", "1_0", "١", "9" * 5000)),
        *({"limit": text} for text in ("0", "-5", "x", "1e3", "00")),
    ]
    async with client_of(env.dashboard()) as client:
        for query in bad:
            response = await client.get(path, params=query)
            assert response.status == 400, (query, await response.text())
            assert response.content_type == "application/json"
            (name,) = query
            assert (await response.json())["error"].startswith(f"{name} must be a whole number")
        capped = await (await client.get(path, params={"limit": "5000"})).json()
        empty = await (await client.get(path, params={"offset": "10", "limit": "3"})).json()
    assert capped["page"]["limit"] == MAX_ROWS
    assert (empty["page"]["first"], empty["page"]["last"]) == (0, 0)
    assert empty["page"]["next_offset"] is None
    assert empty["page"]["previous_offset"] == max(0, empty["page"]["total"] - 3)


async def test_bad_paging_on_a_page_or_its_stream_is_a_400_not_a_500(env: Harness) -> None:
    async with client_of(env.dashboard()) as client:
        page = await client.get("/calls?offset=-1")
        page_text = await page.text()
        stream = await client.get("/stream?view=tenant&tenant=acme&limit=0")
        stream_error = (await stream.json())["error"]
        tenant = await client.get("/tenants/acme?limit=x")
    assert page.status == tenant.status == stream.status == 400
    assert page_text.startswith("offset must be a whole number")
    assert stream_error.startswith("limit must be a whole number")


async def test_page_links_keep_the_tenant_filter_and_limit_also_on_the_live_stream(
    env: Harness,
) -> None:
    hostile = 'r&d "<lab>"'
    _add_tenants(env, [hostile])
    calls = await _reserve(env.ledger, hostile, 5, time.time() - 60, per_second=1)
    await _reserve(env.ledger, "acme", 2, time.time() - 60)
    kept = "tenant=r%26d+%22%3Clab%3E%22&limit=2"
    seen: list[str] = []
    pages: list[str] = []
    async with client_of(env.dashboard(stream_interval=0.05)) as client:
        link: str | None = f"?{kept}"
        while link is not None:
            response = await client.get(f"/calls{link}")
            assert response.status == 200
            html = await response.text()
            pages.append(html)
            seen.extend(_call_ids(html))
            (link,) = _pager_links(html)["next"] or {None}
        live = await _first_update(client, pages[1])
    assert seen == calls  # oldest first, every one once, none of acme's
    assert [_rows_shown(html) for html in pages] == [
        {"rows 1–2 of 5"},
        {"rows 3–4 of 5"},
        {"rows 5–5 of 5"},
    ]
    assert _pager_links(pages[0]) == {"prev": set(), "next": {f"?{kept}&offset=2"}}
    assert _pager_links(pages[1]) == {"prev": {f"?{kept}&offset=0"}, "next": {f"?{kept}&offset=4"}}
    assert _pager_links(pages[2]) == {"prev": {f"?{kept}&offset=2"}, "next": set()}
    assert 'r&d "<lab>"' not in "".join(pages) and "r&amp;d &#34;&lt;lab&gt;&#34;" in pages[0]
    # The live update of page 2 redraws page 2: the same rows, the same links.
    assert _call_ids(live["calls"]) == calls[2:4]
    assert _pager_links(live["calls"]) == _pager_links(pages[1])


async def test_tenant_page_links_keep_sort_order_and_limit_and_overview_pages_too(
    env: Harness,
) -> None:
    repository.add_tenant(env.sql, "zeta", actor="test", currency="GBP")
    env.reload()
    async with client_of(env.dashboard(stream_interval=0.05)) as client:
        tenant = await (await client.get("/tenants/acme?sort=spent&order=desc&limit=1")).text()
        second = await (
            await client.get("/tenants/acme?sort=spent&order=desc&limit=1&offset=1")
        ).text()
        live = await _first_update(client, second)
        overview = await (await client.get("/?limit=1")).text()
        api = await (await client.get("/api/tenants/acme?sort=spent&order=desc&limit=1")).json()
    kept = "sort=spent&order=desc&limit=1"
    # Equal spend: the names break the tie, reversed with the order.
    assert [e["name"] for e in api["extensions"]] == ["1002"]
    assert _rows_shown(tenant) == {"rows 1–1 of 2"}
    assert _pager_links(tenant) == {"prev": set(), "next": {f"?{kept}&offset=1"}}
    assert _pager_links(second) == {"prev": {f"?{kept}&offset=0"}, "next": set()}
    assert 'href="?sort=name&amp;order=asc&amp;limit=1"' in tenant  # sorting keeps the limit
    assert 'data-extension="1001"' in live["extensions"]
    assert _pager_links(live["extensions"]) == _pager_links(second)
    assert _rows_shown(overview) == {"rows 1–1 of 2"}
    assert _pager_links(overview) == {"prev": set(), "next": {"?limit=1&offset=1"}}
