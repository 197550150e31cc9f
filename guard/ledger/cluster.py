"""The ledger's scripts on a Redis Cluster: one multiplexed connection per master.

Why: redis-py's cluster client costs about as much CPU per script call as its single-Redis
client (~130 µs), which ``guard.ledger.multiplex`` replaced for the other stores. Each of the
ledger's scripts touches the keys of one hash slot (``guard.ledger.keys``: a tenant's keys share
``{t:T}``), so a call goes whole to the master of its first key's slot, on that master's
:class:`MultiplexedConnection`.

The slot map is ``CLUSTER SLOTS``, asked of the masters already known and the startup nodes in
turn (a different one first each time, so a dead node does not stall every refresh). It is read
before the first call, and again before the next call after anything went wrong:

- ``MOVED`` (the slot lives elsewhere now: a failover or a resharding): the script did not run,
  so the call is sent once more, after the map is read again, to the new owner.
- A lost connection, a timeout, a cancellation: the call is *not* sent again (it may have run);
  the error goes to the ledger, which reports ``StorageError``.
- ``ASK``, ``TRYAGAIN`` (the slot is being migrated) and ``CLUSTERDOWN``: the script did not
  run; the error goes to the ledger (a migration of a tenant's slot refuses its calls with
  ``store_unavailable`` while it lasts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisError, ResponseError

from guard.aio import cancel_and_wait
from guard.ledger.multiplex import STALE_AFTER, Argument, MultiplexedConnection

Node = tuple[str, int]
#: Error replies that say the map is out of date (the script did not run).
_REDIRECTIONS = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")


def _owners(reply: Sequence[Any], asked: Node) -> list[Node | None]:
    """Slot -> master address from a ``CLUSTER SLOTS`` reply (an empty host is ``asked``'s)."""
    owners: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    for start, end, master, *_ in reply:
        node = (str(master[0]) or asked[0], int(master[1]))
        owners[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
    return owners


class ClusterScripts:
    """Scripts to the master of their slot, each master over one multiplexed connection."""

    def __init__(
        self,
        startup: Sequence[Node],
        *,
        username: str | None = None,
        password: str | None = None,
        stale_after: float = STALE_AFTER,
    ) -> None:
        if not startup:
            raise ValueError("a cluster needs at least one startup node")
        self._startup = list(startup)
        self._username = username
        self._password = password
        self._stale_after = stale_after
        self._connections: dict[Node, MultiplexedConnection] = {}
        self._owners: list[Node | None] = []
        self._turn = 0
        self._refreshing: asyncio.Task[None] | None = None

    async def evalsha(
        self, sha: str, source: str, keys: Sequence[str], args: Sequence[Argument]
    ) -> Any:
        """Run a script on the master of ``keys[0]``'s slot (see the module for redirections)."""
        slot = key_slot(keys[0].encode("utf-8", "replace"))
        moved = False
        while True:
            node = await self._owner(slot)
            try:
                return await self._connection(node).evalsha(sha, source, keys, args)
            except ResponseError as exc:
                message = str(exc)
                if message.startswith(_REDIRECTIONS):
                    self._forget_map()
                if not message.startswith("MOVED ") or moved:
                    raise
                moved = True  # it did not run: once more, on the owner the new map names
            except BaseException:
                # A timeout too: a master that stopped answering keeps its TCP connections (and
                # a new one is accepted by its kernel), so only a new map finds its replacement.
                self._forget_map()
                raise

    async def aclose(self) -> None:
        """Close every connection; calls still waiting fail."""
        refreshing, self._refreshing = self._refreshing, None
        await cancel_and_wait(refreshing)
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            await connection.aclose()

    def _forget_map(self) -> None:
        self._owners = []

    def _connection(self, node: Node) -> MultiplexedConnection:
        connection = self._connections.get(node)
        if connection is None:
            connection = MultiplexedConnection(
                *node,
                username=self._username,
                password=self._password,
                stale_after=self._stale_after,
            )
            self._connections[node] = connection
        return connection

    async def _owner(self, slot: int) -> Node:
        if not self._owners:
            await self._refresh()
        owner = self._owners[slot] if self._owners else None
        if owner is None:
            self._forget_map()
            raise ConnectionError(f"slot {slot} is not covered by the cluster")
        return owner

    async def _refresh(self) -> None:
        """Read the slot map; callers that need it at the same time share one reading."""
        loop = asyncio.get_running_loop()
        refreshing = self._refreshing
        if refreshing is None or refreshing.done() or refreshing.get_loop() is not loop:
            refreshing = self._refreshing = loop.create_task(self._read_map())
        # shield: a caller that times out must not cancel the reading others wait for.
        await asyncio.shield(refreshing)

    async def _read_map(self) -> None:
        known = [node for node in dict.fromkeys(self._owners) if node is not None]
        candidates = list(dict.fromkeys([*known, *self._startup]))
        self._turn = (self._turn + 1) % len(candidates)
        candidates = candidates[self._turn :] + candidates[: self._turn]
        failures: list[str] = []
        for node in candidates:
            try:
                reply = await self._connection(node).execute("CLUSTER", "SLOTS")
            except (OSError, RedisError) as exc:
                failures.append(f"{node[0]}:{node[1]}: {exc}")
                continue
            self._owners = _owners(reply, node)
            return
        raise ConnectionError("no cluster node answered CLUSTER SLOTS: " + "; ".join(failures))
