"""One multiplexed, auto-pipelined Redis connection for the ledger's scripts.

Why it exists: redis-py's asyncio client spends about 130 µs of CPU on each script call (pool
checkout and release, a retry wrapper, per-argument encoding, a timeout per read); the same
``EVALSHA`` costs about 12 µs here, 16 calls in flight (``python -m bench.bench_redis_client``).
Guard runs a script per authorize and per settle: that difference was most of its own CPU.

How: every command a turn of the event loop issues goes out in one write on one socket, and
the replies come back in the order sent (Redis answers a connection's commands in order), so
each is handed to its caller from a FIFO; hiredis parses them. A caller bounds its own wait (the
ledger's timeout); one that gave up leaves its reply to be read and dropped, keeping the order.

Failures: a refused or lost connection fails every waiting caller with ``ConnectionError`` and
the next command connects again. A peer that vanished without closing (no reply for
``stale_after`` seconds while commands wait) is treated as lost. ``NOSCRIPT`` (after ``SCRIPT
FLUSH``, a restart or a failover) is answered by ``EVAL`` with the source, which caches it again.
Nothing is retried otherwise: a script sent twice could run twice.

Scope: a single Redis over TCP (``redis://``), TLS (``rediss://``, with the TLS context redis-py
builds from the URL's ``ssl_*`` options) or a Unix socket (``unix://``), with ``AUTH`` and
``SELECT``; or the master of a Sentinel set (``redis+sentinel://``, :meth:`following`), asked
of the Sentinels at every connection. A ``READONLY`` reply (the server became a replica, as the
old master does after a failover) drops the connection, so the next command finds the new
master; no command has any effect on a replica, so failing the others then loses nothing.
Cluster keeps using redis-py (``guard.ledger.storage``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import (
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from guard.aio import cancel_and_wait

#: Default seconds a command may wait for its reply before the connection counts as lost.
STALE_AFTER = 2.0

Argument = str | int
#: ``(host, port)`` of a TCP server, or the path of a Unix socket.
Address = tuple[str, int] | str
#: Where the server is now, asked at every connection (a Sentinel set's current master).
Locate = Callable[[], Awaitable[tuple[str, int]]]
#: hiredis's own stub types it as taking a 1-tuple.
_pack_command = cast("Callable[[tuple[Argument | bytes, ...]], bytes]", hiredis.pack_command)


def _error(reply: hiredis.ReplyError) -> RedisError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("READONLY"):
        return ReadOnlyError(message)
    if message.startswith(("NOAUTH", "WRONGPASS")):
        return AuthenticationError(message)
    if "Protocol error: unauthenticated" in message:
        # Redis's answer to a long command (a script call) from a client that has not
        # authenticated, sent before it would say NOAUTH: the URL has no password.
        return AuthenticationError(f"{message} (Redis requires a password; the URL gives none)")
    return ResponseError(message)


def _ssl_context(options: Mapping[str, Any]) -> RedisSSLContext:
    """The TLS context redis-py's ``SSLConnection`` makes of the URL's ``ssl_*`` options, with its
    defaults: the server's certificate required, verified against ``ssl_ca_certs`` (or the
    system's store) and its host name checked (not with ``ssl_cert_reqs=none``). Its files are
    read when it is first used (``get()``), at the first connection, as redis-py does."""
    ssl_options = {name: value for name, value in options.items() if name.startswith("ssl_")}
    return SSLConnection(**ssl_options).ssl_context


def _pack(args: Sequence[Argument]) -> bytes:
    """The command in RESP; text that is not valid UTF-8 (lone surrogates) is replaced, as
    redis-py does, rather than refused."""
    try:
        return _pack_command(tuple(args))
    except UnicodeEncodeError:
        return _pack_command(
            tuple(a.encode("utf-8", "replace") if isinstance(a, str) else a for a in args)
        )


class _RespProtocol(asyncio.Protocol):
    """The socket's two ends: buffered writes, replies matched to waiting futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP and Unix transports have Transport's methods without being its subclass.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("connection closed by the peer")
        self._fail_all(self.lost)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        demoted: ReadOnlyError | None = None
        try:
            while (reply := self._reader.gets()) is not False:
                future, _ = self._waiting.popleft()
                error: Exception | None = None
                if isinstance(reply, hiredis.ReplyError):
                    error = _error(reply)
                if isinstance(error, ReadOnlyError):
                    demoted = error
                    error = ConnectionError(f"redis server is a replica: {error}")
                if future.done():  # its caller gave up (timeout or cancellation)
                    continue
                if error is None:
                    future.set_result(reply)
                else:
                    future.set_exception(error)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked
            self.abort(ConnectionError(f"redis protocol error: {exc!r}"))
        if demoted is not None:
            self.abort(ConnectionError(f"redis server is a replica: {demoted}"))

    def overdue(self, now: float, stale_after: float) -> bool:
        """Whether the oldest waiting command has had no reply for ``stale_after`` seconds."""
        return bool(self._waiting) and now - self._waiting[0][1] > stale_after

    def request(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue ``packed`` (sent with the rest of this loop turn's commands); its reply."""
        if self.lost is not None:
            raise ConnectionError(f"redis connection lost: {self.lost}")
        future = self._loop.create_future()
        self._waiting.append((future, self._loop.time()))
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(packed)
        return future

    def _flush(self) -> None:
        if self._transport is None or self.lost is not None:
            self._outgoing.clear()
            return
        self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def abort(self, reason: BaseException) -> None:
        """Drop the connection now: every waiting caller gets ``reason``."""
        if self.lost is None:
            self.lost = reason
        self._fail_all(reason)
        if self._transport is not None:
            self._transport.abort()

    def _fail_all(self, reason: BaseException) -> None:
        self._outgoing.clear()
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"redis connection lost: {reason}"))


class MultiplexedConnection:
    """Commands to one Redis over one shared socket, connected on first use (see the module)."""

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        *,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | RedisSSLContext | None = None,
        stale_after: float = STALE_AFTER,
    ) -> None:
        """To ``host``:``port`` over TCP (over TLS with ``ssl_context``, the server's name being
        ``host``; redis-py's ``RedisSSLContext`` is built at the first connection), or to the
        Unix socket ``path`` if one is given."""
        if path is not None and ssl_context is not None:
            raise ValueError("TLS over a Unix socket is not supported")
        self._address: Address = (host, port) if path is None else path
        self._ssl_context = ssl_context
        self._db = db
        self._username = username
        self._password = password
        self._stale_after = stale_after
        self._locate: Locate | None = None
        self._protocol: _RespProtocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[_RespProtocol] | None = None

    @classmethod
    def from_url(cls, url: str, *, stale_after: float = STALE_AFTER) -> MultiplexedConnection:
        """From a ``redis://``, ``rediss://`` or ``unix://`` URL (redis-py's syntax, ``ssl_*``
        options included); ``ValueError`` for any other scheme, or a ``unix://`` URL without a
        socket path."""
        options = parse_url(url)
        path: str | None = None
        ssl_context: RedisSSLContext | None = None
        connection_class = options.get("connection_class")
        if connection_class is UnixDomainSocketConnection:
            path = options.get("path")
            if not path:
                raise ValueError("the Unix socket path is missing (unix:///path/to/redis.sock)")
        elif connection_class is SSLConnection:
            ssl_context = _ssl_context(options)
        elif connection_class is not None:
            raise ValueError("only redis://, rediss:// and unix:// URLs can be multiplexed")
        return cls(
            options.get("host", "localhost"),
            int(options.get("port", 6379)),
            path=path,
            db=int(options.get("db", 0)),
            username=options.get("username"),
            password=options.get("password"),
            ssl_context=ssl_context,
            stale_after=stale_after,
        )

    @classmethod
    def following(
        cls,
        locate: Locate,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        stale_after: float = STALE_AFTER,
    ) -> MultiplexedConnection:
        """To the TCP server ``locate`` names, asked again at every connection: the current
        master of a Sentinel set (its ``discover_master``), so that a reconnection after a
        failover reaches the new one."""
        connection = cls(db=db, username=username, password=password, stale_after=stale_after)
        connection._locate = locate
        return connection

    async def execute(self, *args: Argument) -> Any:
        """Send one command; its reply (``ResponseError`` for an error reply)."""
        protocol = await self._ready()
        return await protocol.request(_pack(args))

    async def evalsha(
        self, sha: str, source: str, keys: Sequence[str], args: Sequence[Argument]
    ) -> Any:
        """Run a script by its SHA1, or by its source if Redis does not have it cached."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", source, len(keys), *keys, *args)

    async def _ready(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        if protocol is not None and protocol.lost is None and self._loop is loop:
            if not protocol.overdue(loop.time(), self._stale_after):
                return protocol
            protocol.abort(TimeoutError(f"no reply for {self._stale_after:g} s"))
        if self._connecting is None or self._loop is not loop or self._connecting.done():
            self._loop = loop
            self._connecting = loop.create_task(self._connect(loop))
        connecting = self._connecting
        try:
            # shield: a caller that times out must not cancel the connection others wait for.
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # aclose() cancelled the attempt, not this caller: a failure, not a cancellation.
            task = asyncio.current_task()
            if connecting.cancelled() and task is not None and not task.cancelling():
                raise ConnectionError("redis connection closed while connecting") from None
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _RespProtocol:
        self._drop()
        try:
            # A peer that accepts but never answers AUTH or SELECT is lost too (``stale_after``).
            async with asyncio.timeout(self._stale_after):
                return await self._open(loop)
        except TimeoutError:
            raise ConnectionError(
                f"redis connection set-up: no reply for {self._stale_after:g} s"
            ) from None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _RespProtocol:
        def factory() -> _RespProtocol:
            return _RespProtocol(loop)

        address = self._address if self._locate is None else await self._locate()
        if isinstance(address, str):
            _, protocol = await loop.create_unix_connection(factory, address)
        else:
            host, port = address
            tls = self._ssl_context
            if isinstance(tls, RedisSSLContext):
                tls = tls.get()  # cached: the files are read once
            _, protocol = await loop.create_connection(
                factory, host, port, ssl=tls, server_hostname=host if tls is not None else None
            )
        try:
            if self._password is not None:
                user = (self._username,) if self._username else ()
                await protocol.request(_pack(("AUTH", *user, self._password)))
            if self._db:
                await protocol.request(_pack(("SELECT", self._db)))
        except BaseException:
            protocol.abort(ConnectionError("connection set-up failed"))
            raise
        self._protocol = protocol
        return protocol

    def _drop(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                protocol.abort(ConnectionError("connection replaced"))

    async def aclose(self) -> None:
        """Close the connection; commands still waiting fail."""
        connecting, self._connecting = self._connecting, None
        await cancel_and_wait(connecting)
        self._drop()
