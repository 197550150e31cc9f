"""The perimeter as the engine sees it: blocked IPs, allow-lists, threat lists and GeoIP.

``Perimeter`` holds the in-process state (``BlockList``, the compiled ``ThreatIndex``, the GeoIP
database) and answers the engine's questions on the hot path without I/O: is this address
blocked (checked before any other check), how may a refusal from it block it (the thresholds of
the tenant, else the global settings; never for an allow-listed address), and which
``extra_checks`` to give ``policy.evaluate``. ``refresh_forever`` keeps the state in step with
Redis (see ``guard.perimeter.blocks`` for why a copy, refreshed every second).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from guard.aio import honour_cancellation
from guard.domain import Reason
from guard.errors import StorageError
from guard.ledger.types import BlockRule, IpBlock, RefusalCounts, ThreatKind
from guard.logs import log_fields
from guard.perimeter.blocks import BlockList
from guard.perimeter.geoip import GeoIPDatabase, country_check
from guard.perimeter.threats import ThreatIndex, threat_ip_check, threat_number_check
from guard.policy import Check
from guard.snapshot import IPNetwork, Snapshot, TenantConfig

log = logging.getLogger("guard.perimeter")

IPAddress = IPv4Address | IPv6Address


class PerimeterStore(Protocol):
    """What the perimeter reads from Redis (``RedisLedger`` implements it)."""

    async def perimeter_versions(self) -> tuple[int, int]: ...

    async def ip_blocks(self, now: float) -> list[IpBlock]: ...

    async def threat_entries(self, kind: ThreatKind) -> dict[str, set[str]]: ...


@dataclass(frozen=True, slots=True)
class PerimeterSettings:
    """Global defaults; a tenant's own thresholds (SQL) win over them."""

    #: Refused attempts from one IP in the window that block it (0: never).
    block_threshold: int = 20
    #: Length of such a block, in seconds.
    block_seconds: int = 3600
    window_minutes: int = 10
    #: Addresses never blocked, whatever the tenant (the PBX itself, the office).
    allow: tuple[IPNetwork, ...] = ()
    #: Seconds between polls of the perimeter versions in Redis.
    refresh_interval: float = 1.0


def _inside(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in networks)


class Perimeter:
    """The in-process perimeter state and the answers the engine needs (module docstring)."""

    def __init__(
        self,
        store: PerimeterStore | None = None,
        settings: PerimeterSettings | None = None,
        *,
        geoip: GeoIPDatabase | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings or PerimeterSettings()
        self.geoip = geoip
        self.clock = clock
        self.blocks = BlockList()
        self.threats = ThreatIndex()
        self.threats_version: int | None = None
        self.last_error = ""
        checks: list[Check] = [threat_ip_check(lambda: self.threats)]
        if geoip is not None:
            checks.append(country_check(lambda: geoip.country))
        checks.append(threat_number_check(lambda: self.threats))
        #: The ``extra_checks`` of ``policy.evaluate``: threat IP, country, threat number.
        self.checks: tuple[Check, ...] = tuple(checks)

    def is_allowed(
        self, address: IPAddress, tenant: TenantConfig | None, snapshot: Snapshot
    ) -> bool:
        """Whether ``address`` is on an allow-list: the settings', the global SQL one, or the
        tenant's. Such an address is never blocked, nor refused as ``ip_blocked``."""
        return (
            _inside(address, self.settings.allow)
            or _inside(address, snapshot.ip_allow)
            or (tenant is not None and _inside(address, tenant.ip_allow))
        )

    def blocked(
        self,
        address: IPAddress | None,
        tenant: TenantConfig | None,
        snapshot: Snapshot,
        now: float,
    ) -> IpBlock | None:
        """The block that refuses a call from ``address`` now, else ``None`` (no I/O)."""
        if address is None:
            return None
        block = self.blocks.get(address, now)
        if block is None or self.is_allowed(address, tenant, snapshot):
            return None
        return block

    def block_rule(
        self,
        address: IPAddress | None,
        reason: Reason,
        tenant: TenantConfig | None,
        snapshot: Snapshot,
    ) -> BlockRule | None:
        """How a refusal from ``address`` may block it; ``None``: it may not (not an address, or
        allow-listed). A scanner User-Agent blocks at once, until an admin unblocks."""
        if address is None or self.is_allowed(address, tenant, snapshot):
            return None
        settings = self.settings
        threshold = settings.block_threshold
        seconds = settings.block_seconds
        if tenant is not None:
            if tenant.block_threshold is not None:
                threshold = tenant.block_threshold
            if tenant.block_seconds is not None:
                seconds = tenant.block_seconds
        return BlockRule(threshold, seconds, immediate=reason is Reason.SCANNER_USER_AGENT)

    def note(self, counts: RefusalCounts) -> None:
        """Take the block a refusal reported, so this guard refuses the IP from now on."""
        if counts.block is not None:
            self.blocks.add(counts.block)

    async def refresh(self) -> None:
        """Re-read what changed in Redis (blocks, threat lists) and a replaced GeoIP file."""
        if self.geoip is not None:
            await asyncio.to_thread(self.geoip.reload_if_changed)
        if self.store is None:
            return
        blocks_version, threats_version = await self.store.perimeter_versions()
        if blocks_version != self.blocks.version:
            self.blocks.replace(await self.store.ip_blocks(self.clock()), blocks_version)
        if threats_version != self.threats_version:
            ips = await self.store.threat_entries(ThreatKind.IP)
            numbers = await self.store.threat_entries(ThreatKind.NUMBER)
            self.threats = await asyncio.to_thread(ThreatIndex, ips, numbers)
            self.threats_version = threats_version
            log.info(
                "threat lists loaded",
                extra=log_fields(
                    version=threats_version,
                    ip_entries=self.threats.ip_entries,
                    number_entries=self.threats.number_entries,
                ),
            )

    async def refresh_forever(self) -> None:
        """``refresh`` every ``refresh_interval`` until cancelled; a failure keeps the old state
        and is logged once until it changes."""
        while True:
            try:
                await self.refresh()
            except StorageError as exc:
                if str(exc) != self.last_error:
                    log.warning(
                        "perimeter refresh failed; the previous state keeps serving",
                        extra=log_fields(error=str(exc)[:300]),
                    )
                self.last_error = str(exc)
            else:
                self.last_error = ""
            honour_cancellation()
            await asyncio.sleep(self.settings.refresh_interval)
