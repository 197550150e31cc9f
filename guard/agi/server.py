"""The FastAGI server: accepts Asterisk's connections and hands each session to a route handler.

A small router in the panoramisk style: ``app.add_route("authorize", handler)``, where a handler
is ``async def handler(request: AGIRequest) -> None`` that talks to Asterisk through
``request.send_command``. The server owns everything around it: the client allow-list, bounded
reads with timeouts, refusing malformed requests and unknown routes with a DENY the dialplan
understands, a bound on concurrent sessions, and a graceful shutdown.

Commands go one at a time, each after the previous reply, even in :meth:`AGIRequest.send_commands`.
Asterisk does not support pipelining: ``run_agi()`` waits with ``poll()`` on the socket and then
reads a command with ``fgets()`` from a stdio ``FILE``, which pulls every pipelined line into its
buffer at once; the second and later commands then sit there, unseen by ``poll()``, until more
bytes arrive, and the session stalls. :class:`guard.agi.testing.FakeAsterisk` reproduces this.

It must never crash on what a peer sends, spin on a dead peer, or log an untrusted value except
as a structured field.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Self, cast

from guard.agi.contract import OVERLOADED, refusal_commands
from guard.agi.protocol import (
    HANGUP_LINE,
    AGIProtocolError,
    AGIReply,
    EnvironmentLimits,
    EnvironmentParser,
    ReplyParser,
    agi_arguments,
    encode_command,
    parse_request_target,
)
from guard.domain import Reason
from guard.errors import ConfigurationError, GuardError
from guard.logs import log_fields

log = logging.getLogger("guard.agi")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = tuple[str, int]
Handler = Callable[["AGIRequest"], Awaitable[None]]

#: Longest wait for a closing connection to flush before it is aborted.
_CLOSE_TIMEOUT = 1.0
#: Peer addresses whose allow-list answer is remembered (then forgotten all at once).
_ALLOWED_HOSTS_MAX = 4096
#: Longest note about an unknown route written to the Asterisk log.
_NOTE_MAX_CHARS = 80


class AGIConnectionError(GuardError):
    """The peer closed or reset the connection, or did not answer in time."""


class _Connection:
    """One FastAGI connection: bounded line reads, one command/reply turn at a time."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reply_timeout: float,
        max_line_bytes: int,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._reply_timeout = reply_timeout
        self._max_line_bytes = max_line_bytes
        self._broken: str | None = None
        self.hung_up = False
        self._loop = asyncio.get_running_loop()
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._awaiting = ""
        #: Why the connection was aborted by its deadline (``None`` while it was not).
        self.expired: str | None = None

    def _arm(self, seconds: float, awaiting: str) -> None:
        """End the reads in progress unless they finish within ``seconds``.

        One timer per connection, moved forward rather than replaced: a timer per read (an
        ``asyncio.timeout`` block) costs about 11 µs under uvloop, several times a session.
        """
        self._deadline = self._loop.time() + seconds
        self._awaiting = awaiting
        if self._timer is not None and self._timer_at > self._deadline:  # brought forward
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_deadline)

    def _disarm(self) -> None:
        self._deadline = math.inf

    def _on_deadline(self) -> None:
        self._timer = None
        if self._deadline == math.inf:
            return
        if self._loop.time() < self._deadline:  # moved since the timer was set
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_deadline)
            return
        # End the read in progress as if the peer had closed; the session then closes the
        # connection politely (FIN), as after any failed read.
        self.expired = self._awaiting
        # A stream's transport reads too (uvloop's is no asyncio.Transport subclass).
        transport = cast(asyncio.Transport, self._writer.transport)
        if transport.get_write_buffer_size():  # a peer that does not read either: drain waits
            transport.abort()
            return
        if not transport.is_closing():
            transport.pause_reading()  # nothing may be fed after the end of stream
        self._reader.feed_eof()

    async def read_environment(self, parser: EnvironmentParser, within: float) -> None:
        """Feed ``parser`` the whole block; raises if the peer leaves first or takes longer
        than ``within`` seconds (then ``expired`` says so).

        The first ``\\n\\n`` in the stream ends the block (a line's end, then the empty line),
        so one read takes all of it, as Asterisk writes it at once, rather than a read a line.
        """
        self._arm(within, f"no environment within {within:g} s")
        try:
            block = await self._reader.readuntil(b"\n\n")
        except asyncio.IncompleteReadError as exc:
            if self.expired is not None:
                raise AGIConnectionError(self.expired) from exc
            whole_lines = exc.partial[: exc.partial.rfind(b"\n") + 1]
            if whole_lines:
                parser.feed(whole_lines)
            raise AGIConnectionError("peer closed the connection") from exc
        except asyncio.LimitOverrunError as exc:
            raise AGIProtocolError("environment longer than the read buffer") from exc
        except OSError as exc:
            why = self.expired or f"connection lost: {exc.__class__.__name__}"
            raise AGIConnectionError(why) from exc
        finally:
            self._disarm()
        parser.feed(block)

    async def send_command(self, command: str) -> AGIReply:
        return (await self.send_commands([command]))[0]

    async def send_commands(self, commands: Sequence[str]) -> list[AGIReply]:
        # Every command is checked before the first byte goes out: no half-sent batch.
        lines = [encode_command(command) for command in commands]
        if self._broken is not None:
            raise AGIConnectionError(self._broken)
        replies = []
        awaiting = f"no reply within {self._reply_timeout:g} s"
        try:
            for line in lines:
                self._arm(self._reply_timeout, awaiting)
                self._writer.write(line)
                await self._writer.drain()
                replies.append(await self._read_reply())
        except (AGIConnectionError, AGIProtocolError) as exc:
            self._broken = self.expired or str(exc)
            if self.expired is not None:
                raise AGIConnectionError(self.expired) from exc
            raise
        except OSError as exc:
            self._broken = self.expired or f"connection lost: {exc.__class__.__name__}"
            raise AGIConnectionError(self._broken) from exc
        finally:
            self._disarm()
        return replies

    async def _read_reply(self) -> AGIReply:
        parser = ReplyParser()
        while True:
            raw = await self._read_line()
            if len(raw) > self._max_line_bytes:
                raise AGIProtocolError(f"reply line longer than {self._max_line_bytes} bytes")
            line = raw[:-1].decode("utf-8", errors="replace")
            if line == HANGUP_LINE and not parser.in_progress:
                self.hung_up = True
                continue
            reply = parser.feed(line)
            if reply is not None:
                return reply

    async def _read_line(self) -> bytes:
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            raise AGIConnectionError("peer closed the connection") from exc
        except asyncio.LimitOverrunError as exc:
            raise AGIProtocolError("line longer than the read buffer") from exc
        except OSError as exc:
            raise AGIConnectionError(f"connection lost: {exc.__class__.__name__}") from exc

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._writer.close()
        if not self._writer.transport.get_write_buffer_size():
            return  # nothing left to flush: the transport finishes closing on its own
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._writer.wait_closed()
        except (TimeoutError, OSError):
            self._writer.transport.abort()


class AGIRequest:
    """One FastAGI session as a route handler sees it.

    ``env`` is the environment block (``agi_uniqueid``, ``agi_channel``, …), ``path`` and
    ``query`` the parsed ``agi_network_script``, ``args`` the ``agi_arg_N`` values (positional,
    split by quotes: untrusted), ``peer`` Asterisk's address. ``hung_up`` becomes true once
    Asterisk's unsolicited ``HANGUP`` line has been read (it is seen while waiting for a reply);
    commands keep working after it, as on a dead channel in a hangup handler.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        path: str,
        query: Mapping[str, str],
        peer: Address,
        connection: _Connection,
    ) -> None:
        self.env = MappingProxyType(dict(env))
        self.path = path
        self.query = query
        self.args = agi_arguments(env)
        self.peer = peer
        self._connection = connection

    @property
    def hung_up(self) -> bool:
        return self._connection.hung_up

    async def send_command(self, command: str) -> AGIReply:
        """Send one command line and wait for its reply.

        Raises :class:`AGIProtocolError` for a command that is not one safe line (nothing is
        sent) or a reply that is not AGI, and :class:`AGIConnectionError` when the peer leaves or
        does not answer within the reply timeout; the session cannot continue after either.
        """
        return await self._connection.send_command(command)

    async def send_commands(self, commands: Sequence[str]) -> list[AGIReply]:
        """Send several commands in order and return their replies in the same order.

        All commands are validated before the first is written. They are sent one after the
        other's reply, never pipelined (see the module docstring: Asterisk stalls on that), so
        after a failure exactly the commands before the failing one have been answered.
        """
        return await self._connection.send_commands(commands)


def _networks(allow: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for item in allow:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ConfigurationError(f"agi allow-list: invalid network {item!r}") from exc
    return tuple(networks)


def _peer(writer: asyncio.StreamWriter) -> Address:
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple) and len(peername) >= 2:
        return str(peername[0]), int(peername[1])
    return "", 0


class AGIServer:
    """An asyncio FastAGI server with a router of request paths to handlers.

    ``listen``: addresses to bind (port 0 picks a free port; see :attr:`addresses`).
    ``allow``: networks allowed to connect (``None`` allows every address); others are closed
    at once. ``env_timeout``/``reply_timeout``: longest wait for the environment block and for
    each reply. ``session_timeout``: longest whole session. ``max_sessions``: sessions running a
    handler at once; a request that finds none free within ``overload_wait`` seconds is refused
    with ``GUARD_REASON=overloaded`` (a quick DENY beats a caller left in silence, and the
    dialplan fails closed either way). ``reuse_port``: bind with ``SO_REUSEPORT`` so that several
    worker processes listen on the same address and the kernel spreads connections over them.
    """

    def __init__(
        self,
        listen: Sequence[Address] = (("127.0.0.1", 4573),),
        *,
        allow: Iterable[str | IPNetwork] | None = None,
        env_timeout: float = 5.0,
        reply_timeout: float = 5.0,
        session_timeout: float = 30.0,
        max_sessions: int = 1000,
        overload_wait: float = 1.0,
        limits: EnvironmentLimits | None = None,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> None:
        if not listen:
            raise ConfigurationError("agi: at least one listen address is required")
        if max_sessions < 1:
            raise ConfigurationError("agi: max_sessions must be at least 1")
        self._listen = tuple(listen)
        self._allow = None if allow is None else _networks(allow)
        self._allowed_hosts: dict[str, bool] = {}
        self._env_timeout = env_timeout
        self._reply_timeout = reply_timeout
        self._session_timeout = session_timeout
        self._overload_wait = overload_wait
        self._limits = limits or EnvironmentLimits()
        self._backlog = backlog
        self._reuse_port = reuse_port
        self._slots = asyncio.Semaphore(max_sessions)
        self._routes: dict[str, Handler] = {}
        self._servers: list[asyncio.Server] = []
        self._sessions: set[asyncio.Task[object]] = set()

    def add_route(self, path: str, handler: Handler) -> None:
        """Serve requests for ``path`` (``agi://host/path?…``) with ``handler``."""
        key = path.strip("/")
        if key in self._routes:
            raise ConfigurationError(f"agi: route {key!r} is already registered")
        self._routes[key] = handler

    @property
    def addresses(self) -> list[Address]:
        """The bound addresses, with the real port where 0 was asked for."""
        bound: list[Address] = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                bound.append((str(name[0]), int(name[1])))
        return bound

    @property
    def active_sessions(self) -> int:
        """Connections being served right now (from accept to close)."""
        return len(self._sessions)

    async def start(self) -> None:
        """Bind every listen address and start accepting."""
        # The stream limit only bounds one unterminated line; the parsers enforce the real limits.
        limit = max(self._limits.max_bytes, self._limits.max_line_bytes)
        try:
            for host, port in self._listen:
                server = await asyncio.start_server(
                    self._on_connection,
                    host,
                    port,
                    limit=limit,
                    backlog=self._backlog,
                    reuse_port=self._reuse_port or None,
                )
                self._servers.append(server)
        except OSError:
            await self.shutdown(0)
            raise
        log.info("agi listening", extra=log_fields(addresses=self.addresses))

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, let sessions in flight finish for up to ``grace`` s, cancel the rest."""
        for server in self._servers:
            server.close()
        await asyncio.sleep(0)  # let connections accepted just before close start their session
        pending = set(self._sessions)
        if pending and grace > 0:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("agi shutdown cancelled sessions", extra=log_fields(count=len(pending)))
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    def _allowed(self, host: str) -> bool:
        if self._allow is None:
            return True
        known = self._allowed_hosts.get(host)
        if known is None:  # parsing the address costs more than the rest of the check
            if len(self._allowed_hosts) >= _ALLOWED_HOSTS_MAX:
                self._allowed_hosts.clear()
            known = self._allowed_hosts[host] = self._check_allowed(host)
        return known

    def _check_allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._allow or ())

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        peer = _peer(writer)
        try:
            if not self._allowed(peer[0]):
                log.warning(
                    "agi connection refused: address not allowed", extra=log_fields(peer=peer[0])
                )
                writer.close()
                return
            connection = _Connection(
                reader, writer, self._reply_timeout, self._limits.max_line_bytes
            )
            try:
                await self._session(connection, peer)
            finally:
                await connection.close()
        finally:
            self._sessions.discard(task)

    async def _session(self, connection: _Connection, peer: Address) -> None:
        started = time.monotonic()
        fields: dict[str, object] = {"peer": peer[0]}
        deadline = asyncio.timeout(self._session_timeout)
        try:
            async with deadline:
                await self._serve(connection, peer, fields)
        except TimeoutError:
            if deadline.expired():
                log.warning("agi session exceeded its time limit", extra=log_fields(**fields))
            else:
                log.exception("agi route handler failed", extra=log_fields(**fields))
        except AGIConnectionError as exc:
            log.info("agi session ended early", extra=log_fields(**fields, error=str(exc)))
        except AGIProtocolError as exc:
            log.warning("agi protocol error", extra=log_fields(**fields, error=str(exc)))
        except Exception:
            log.exception("agi route handler failed", extra=log_fields(**fields))
        else:
            if log.isEnabledFor(logging.DEBUG):
                ms = round((time.monotonic() - started) * 1000, 1)
                log.debug("agi session done", extra=log_fields(**fields, ms=ms))

    async def _serve(
        self, connection: _Connection, peer: Address, fields: dict[str, object]
    ) -> None:
        parser = EnvironmentParser(self._limits)
        try:
            await connection.read_environment(parser, self._env_timeout)
        except AGIConnectionError as exc:
            if connection.expired is not None:
                raise
            if parser.received == 0:
                log.debug("agi peer left before its environment", extra=log_fields(**fields))
                return
            raise AGIConnectionError(f"incomplete environment: {exc}") from exc
        # A hard protocol error above propagates: the stream is out of step, nothing is answered.
        try:
            env = parser.result()
            fields["call_id"] = env.get("agi_uniqueid", "")
            target = parse_request_target(env["agi_network_script"])
        except (AGIProtocolError, KeyError) as exc:
            error = str(exc) if isinstance(exc, AGIProtocolError) else "no agi_network_script"
            log.warning("agi bad request", extra=log_fields(**fields, error=error))
            await self._refuse(connection, Reason.BAD_REQUEST, "guard: bad request")
            return
        fields["route"] = target.path
        handler = self._routes.get(target.path)
        if handler is None:
            log.warning("agi unknown route", extra=log_fields(**fields))
            note = f"guard: unknown route {target.path[:_NOTE_MAX_CHARS]}"
            await self._refuse(connection, Reason.BAD_REQUEST, note)
            return
        request = AGIRequest(
            env=env, path=target.path, query=target.query, peer=peer, connection=connection
        )
        if not await self._acquire_slot():
            log.warning("agi overloaded: session refused", extra=log_fields(**fields))
            await self._refuse(connection, OVERLOADED, "guard: overloaded")
            return
        try:
            await handler(request)
        finally:
            self._slots.release()

    async def _acquire_slot(self) -> bool:
        if not self._slots.locked():  # a free slot: taken at once, no timer needed
            await self._slots.acquire()
            return True
        try:
            async with asyncio.timeout(self._overload_wait):
                await self._slots.acquire()
        except TimeoutError:
            return False
        return True

    async def _refuse(self, connection: _Connection, reason: str, note: str) -> None:
        """Best effort: the dialplan fails closed anyway if this does not reach Asterisk."""
        try:
            await connection.send_commands(refusal_commands(reason, note))
        except (AGIConnectionError, AGIProtocolError) as exc:
            log.info("agi refusal not delivered", extra=log_fields(error=str(exc)))
