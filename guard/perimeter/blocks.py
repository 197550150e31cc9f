"""The in-process copy of the IP blocks that the engine checks before anything else.

Why a copy and not a Redis read: the block check runs for every call, allowed ones included, and
DESIGN.md wants one Redis round trip per authorize (the reservation). Measured on this machine
(loopback Redis, redis-py asyncio): an ``HEXISTS`` round trip costs about 290 µs; a dict probe
with the parsed address (``parse_source_ip`` is cached) about 0.3 µs, three orders of magnitude
less. Blocks cannot share the reservation's script either: they are global keys in the
``{perimeter}`` slot, and no script may touch that slot and a tenant's together (Cluster).

So Redis stays authoritative (``refusal.lua`` counts and blocks atomically; ``guard ip`` edits
there) and every guard polls the blocks' version once a second (one ``MGET`` with the threat
lists' version), re-reading the blocks only when it moved. Polling was chosen over pub/sub: it
needs no dedicated connection per guard, cannot miss a message across a reconnect or a
failover, and works the same on Redis, Sentinel and Cluster; a block reaches every guard within
about a second, and the guard whose refusal made the block knows it at once. Timed blocks
expire locally at their end, without waiting for a refresh.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address

from guard.ledger.types import IpBlock
from guard.policy import parse_source_ip

IPAddress = IPv4Address | IPv6Address


class BlockList:
    """Blocked addresses -> their block; replaced whole on refresh, added to on a new block."""

    __slots__ = ("_blocks", "version")

    def __init__(self) -> None:
        self._blocks: dict[IPAddress, IpBlock] = {}
        #: The blocks version this copy reflects; ``None`` before the first refresh.
        self.version: int | None = None

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, address: IPAddress, now: float) -> IpBlock | None:
        """The active block of ``address``, else ``None``: one dict probe."""
        block = self._blocks.get(address)
        if block is None or not block.active(now):
            return None
        return block

    def add(self, block: IpBlock) -> None:
        """Remember a block this guard just learned of (its own refusal made it)."""
        address = parse_source_ip(block.ip)
        if address is not None:
            self._blocks[address] = block

    def replace(self, blocks: Iterable[IpBlock], version: int) -> None:
        """Take the blocks read from Redis at ``version``."""
        fresh: dict[IPAddress, IpBlock] = {}
        for block in blocks:
            address = parse_source_ip(block.ip)
            if address is not None:
                fresh[address] = block
        self._blocks, self.version = fresh, version

    def active(self, now: float) -> list[IpBlock]:
        """Every active block, for the dashboard and ``guard check``."""
        return sorted((b for b in self._blocks.values() if b.active(now)), key=lambda b: b.ip)
