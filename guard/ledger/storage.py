"""Choose the ledger's store by URL, as the ``limits`` library does.

``ledger_from_url`` maps a URL scheme to a client factory and wraps the client in a
``RedisLedger``; the ledger's logic is the same on every backend:

- ``redis://[[user]:password@]host[:port][/db][?options]`` and ``rediss://`` (TLS); options as
  in redis-py's ``from_url`` (e.g. ``ssl_ca_certs``).
- ``unix://[[user]:password@]/path/to/redis.sock[?db=N][&password=…]``: a Redis on this host,
  through its Unix socket (for a Redis that listens on no TCP port).
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service_name[/db]``: the
  master of ``service_name`` as the Sentinels report it (port 26379 by default); the password is
  the master's.
- ``redis+cluster://[[user]:password@]host[:port][,host[:port]…]``: a Redis Cluster, found from
  these startup nodes.
- ``memory://``: an in-process fake Redis (fakeredis with Lua), shared by every ledger of the
  process. For a first run and for tests only: counters are neither shared between processes nor
  durable, which is logged loudly (once per process).

With every scheme but ``memory://`` the Lua scripts run on multiplexed connections
(``guard.ledger.multiplex``, with the same TLS options as redis-py; under Sentinel to the master
the Sentinels name at each connection; on a Cluster one per master, ``guard.ledger.cluster``), the
rest on redis-py.

A URL this module cannot use raises ``ConfigurationError`` naming it, password masked. Building a
ledger does no I/O: the first operation connects.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from guard.errors import ConfigurationError
from guard.ledger.cluster import ClusterScripts
from guard.ledger.keys import check_prefix
from guard.ledger.multiplex import MultiplexedConnection
from guard.ledger.redis_ledger import (
    DEFAULT_TIMEOUT,
    Closable,
    RedisClient,
    RedisLedger,
    ScriptRunner,
)
from guard.settings import Settings, mask_url
from guard.shadow import shadow_prefix

if TYPE_CHECKING:
    from fakeredis import FakeServer

logger = logging.getLogger(__name__)

MEMORY_WARNING = (
    "ledger store memory:// keeps spend counters inside this process only: they are NOT shared "
    "between processes (limits do not hold across several guards) and NOT durable (a restart "
    "forgets every reservation and all spend). Use redis://, redis+sentinel:// or "
    "redis+cluster:// in production."
)

_SENTINEL_PORT = 26379
#: ``host``, ``host:port``, ``[ipv6]`` or ``[ipv6]:port``.
_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]/@,]+))(?::(?P<port>[0-9]+))?")
_REDIS_PORT = 6379


@dataclass(frozen=True, slots=True)
class _Backend:
    client: RedisClient
    also_close: Sequence[Closable] = field(default_factory=tuple)
    #: Runs the Lua scripts on multiplexed connections (every scheme but ``memory://``).
    scripts: ScriptRunner | None = None


def _client_options(timeout: float) -> dict[str, Any]:
    """Options of every connection: bounded waits, no retry, text replies, RESP2."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
        "encoding_errors": "replace",
        "protocol": 2,
    }


def split_netloc(
    rest: str, default_port: int
) -> tuple[str | None, str | None, list[tuple[str, int]], str]:
    """Split ``[user[:password]@]host[:port][,…][/path]`` into credentials, hosts and path."""
    netloc, _, path = rest.partition("/")
    if "?" in path or "?" in netloc:
        raise ValueError("query options are not supported with this scheme")
    userinfo, _, hostlist = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        match = _HOST.fullmatch(item)
        if match is None:
            raise ValueError(f"not a host[:port]: {item!r}")
        host = match["ipv6"] or match["name"]
        hosts.append((host, int(match["port"]) if match["port"] else default_port))
    return username, password, hosts, path


def _redis(url: str, timeout: float) -> _Backend:
    return _Backend(Redis.from_url(url, **_client_options(timeout)))


def _redis_multiplexed(url: str, timeout: float) -> _Backend:
    """``_redis``, with the scripts on a multiplexed connection (TCP, TLS or Unix socket)."""
    return dataclasses.replace(_redis(url, timeout), scripts=MultiplexedConnection.from_url(url))


def _sentinel(url: str, timeout: float) -> _Backend:
    username, password, hosts, path = split_netloc(url.partition("://")[2], _SENTINEL_PORT)
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("the service name is missing (…/service_name[/db])")
    options = _client_options(timeout)
    sentinel = Sentinel(hosts, sentinel_kwargs=dict(options), **options)  # type: ignore[no-untyped-call]
    database = int(db) if db else 0
    client = sentinel.master_for(service, db=database, username=username, password=password)

    async def master() -> tuple[str, int]:
        host, port = await sentinel.discover_master(service)
        return str(host), int(port)

    scripts = MultiplexedConnection.following(
        master, db=database, username=username, password=password
    )
    return _Backend(client, also_close=(sentinel,), scripts=scripts)


def _cluster(url: str, timeout: float) -> _Backend:
    username, password, hosts, path = split_netloc(url.partition("://")[2], _REDIS_PORT)
    if path.strip("/"):
        raise ValueError("a cluster URL has no path (no database number in a cluster)")
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in hosts],
        username=username,
        password=password,
        **_client_options(timeout),
    )
    scripts = ClusterScripts(hosts, username=username, password=password)
    return _Backend(client, scripts=scripts)


# fakeredis is slow to import and only ``memory://`` and ``private_memory_ledger`` need it: it is
# imported by the first of them.


def _fake_server() -> FakeServer:
    """A new in-process fake Redis (7) server."""
    from fakeredis import FakeServer

    return FakeServer(version=(7,))


def _fake_redis(server: FakeServer, timeout: float) -> RedisClient:
    from fakeredis.aioredis import FakeRedis

    return FakeRedis(server=server, **_client_options(timeout))


@functools.cache
def _memory_server() -> FakeServer:
    return _fake_server()


@functools.cache
def warn_memory_store() -> None:
    """Log ``MEMORY_WARNING`` once per process, however many ``memory://`` ledgers it builds
    (``guard serve`` builds the live and the shadow counters). ``cache_clear()`` re-arms it."""
    logger.warning(MEMORY_WARNING)


def _memory(url: str, timeout: float) -> _Backend:
    if url.partition("://")[2].strip("/"):
        raise ValueError("memory:// takes no host, path or options")
    warn_memory_store()
    return _Backend(_fake_redis(_memory_server(), timeout))


#: URL scheme -> factory of the client that serves it.
BACKENDS: dict[str, Callable[[str, float], _Backend]] = {
    "redis": _redis_multiplexed,
    "rediss": _redis_multiplexed,
    "unix": _redis_multiplexed,
    "redis+sentinel": _sentinel,
    "redis+cluster": _cluster,
    "memory": _memory,
}


def ledger_from_url(
    url: str, *, prefix: str = "guard", timeout: float = DEFAULT_TIMEOUT
) -> RedisLedger:
    """The ledger on the store named by ``url`` (see the module docstring for the schemes).

    ``timeout`` (seconds) bounds every operation, connection included; ``prefix`` starts every
    key, so several Guard installations can share one Redis.
    """
    masked = mask_url(url)
    check_prefix(prefix)
    scheme, sep, _ = url.partition("://")
    factory = BACKENDS.get(scheme.lower()) if sep else None
    if factory is None:
        raise ConfigurationError(
            f"ledger URL {masked!r} is not supported: use one of "
            + ", ".join(f"{name}://" for name in BACKENDS)
        )
    if not timeout > 0:
        raise ConfigurationError(f"ledger timeout must be positive, not {timeout!r}")
    try:
        backend = factory(url, timeout)
    except (ValueError, TypeError, RedisError, RedisClusterException) as exc:
        raise ConfigurationError(f"ledger URL {masked!r} is invalid: {exc}") from exc
    return RedisLedger(
        backend.client,
        prefix=prefix,
        timeout=timeout,
        url=masked,
        also_close=backend.also_close,
        scripts=backend.scripts,
    )


def shadow_ledger_for(settings: Settings) -> RedisLedger:
    """The shadow counters (``guard.shadow``) of ``settings``' store: the same URL, the prefix
    ``<prefix>-shadow``."""
    return ledger_from_url(
        settings.redis_url,
        prefix=shadow_prefix(settings.redis_prefix),
        timeout=settings.redis_timeout,
    )


def private_memory_ledger(
    *, prefix: str = "guard", timeout: float = DEFAULT_TIMEOUT
) -> RedisLedger:
    """A ledger on an in-process fake Redis of its own, shared with nothing, gone with it.

    For throw-away counters (``guard replay``): unlike ``memory://``, which every ledger of the
    process shares, nothing counted here can reach another ledger.
    """
    client = _fake_redis(_fake_server(), timeout)
    return RedisLedger(client, prefix=check_prefix(prefix), timeout=timeout, url="memory (private)")
