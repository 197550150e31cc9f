"""The dashboard's ``/metrics``: today's money and live calls per tenant, and the IP blocks.

Read from Redis at each scrape (through ``DashboardData``'s short cache), so the values are the
shared truth of every guard, not one process's view. Per-tenant series are capped at the
``max_tenants`` that spent (and reserved) most today, so a platform with thousands of tenants
exports a bounded label set; ``guard_tenants`` still counts them all. Amounts are exported in
currency units (Prometheus values are floats; the ledger's integers stay exact in Redis).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from guard.dashboard.data import DashboardData
from guard.money import SUBUNITS


class _Families(Collector):
    """Hands out metric families computed beforehand (``collect`` cannot await Redis)."""

    def __init__(self, families: list[GaugeMetricFamily]) -> None:
        self._families = families

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families)


def _families(
    overview: dict[str, Any], calls: dict[str, Any], security: dict[str, Any], max_tenants: int
) -> list[GaugeMetricFamily]:
    labels = ["tenant", "currency"]
    spent = GaugeMetricFamily(
        "guard_tenant_spent_today", "Settled spend of the tenant's current day", labels=labels
    )
    reserved = GaugeMetricFamily(
        "guard_tenant_reserved_today",
        "Open reservations of the tenant's current day",
        labels=labels,
    )
    limit = GaugeMetricFamily(
        "guard_tenant_daily_limit", "The tenant's daily limit (absent: no limit)", labels=labels
    )
    live = GaugeMetricFamily(
        "guard_tenant_live_calls", "Live calls of the tenant", labels=["tenant"]
    )
    concurrent = GaugeMetricFamily(
        "guard_tenant_concurrent_limit", "The tenant's concurrent-call limit", labels=["tenant"]
    )
    ranked = sorted(
        overview["tenants"], key=lambda row: (-(row["spent"] + row["reserved"]), row["name"])
    )
    for row in ranked[:max_tenants]:
        money_labels = [row["name"], row["currency"]]
        spent.add_metric(money_labels, row["spent"] / SUBUNITS)
        reserved.add_metric(money_labels, row["reserved"] / SUBUNITS)
        if row["daily_limit"] is not None:
            limit.add_metric(money_labels, row["daily_limit"] / SUBUNITS)
        live.add_metric([row["name"]], row["live_calls"])
        if row["concurrent_limit"] is not None:
            concurrent.add_metric([row["name"]], row["concurrent_limit"])
    return [
        spent,
        reserved,
        limit,
        live,
        concurrent,
        GaugeMetricFamily(
            "guard_tenants", "Tenants in the configuration", value=overview["tenant_count"]
        ),
        GaugeMetricFamily(
            "guard_live_calls",
            "Live calls of every tenant together (not those of shadow mode)",
            value=calls["call_count"] - calls["shadow_call_count"],
        ),
        GaugeMetricFamily(
            "guard_blocked_ips", "Source IPs blocked right now", value=len(security["blocked_ips"])
        ),
        GaugeMetricFamily(
            "guard_config_version",
            "Configuration version the dashboard shows",
            value=overview["status"]["config_version"],
        ),
        GaugeMetricFamily(
            "guard_dashboard_store_up",
            "1 when the dashboard could read the counter store at this scrape",
            value=0 if overview["store_error"] or calls["store_error"] else 1,
        ),
    ]


async def scrape(data: DashboardData, max_tenants: int) -> bytes:
    """The exposition text of one scrape."""
    overview = await data.all_tenants()
    calls = await data.calls()
    security = await data.security()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(_families(overview, calls, security, max_tenants)))
    return generate_latest(registry)
