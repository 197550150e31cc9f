"""``guard.ledger.multiplex.MultiplexedConnection`` against the real Redis and misbehaving peers.

The shared test Redis serves what disturbs nobody (keys under the test's prefix); a private
``redis-server`` (``ledger_support.RedisProcess``) serves what would disturb other tests: a script
cache flush, a slow script, a password, a kill, ``unix://`` (a server on a Unix socket only) and
``rediss://`` (a server on a TLS port only, its certificates from a ``trustme`` test CA).
``StandIn`` is a tiny local asyncio server that plays a Redis that misbehaves: silent, answering
garbage or answering what nobody asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import hiredis
import pytest
import redis
import trustme
import uvloop
from ledger_support import DAY, NOW, RATE, RedisProcess, count_scripts, request, tls_files
from redis.asyncio.connection import RedisSSLContext
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError

from guard.errors import ConfigurationError, StorageError
from guard.ledger import RedisLedger, ledger_from_url, mask_url
from guard.ledger.multiplex import STALE_AFTER, MultiplexedConnection
from guard.ledger.types import SettleOutcome
from guard.money import call_cost

pytestmark = pytest.mark.timeout(60)

_T = TypeVar("_T")

#: Returns its first argument and the key's count after incrementing it.
ECHO_INCR = "return {ARGV[1], redis.call('INCR', KEYS[1])}"
#: Busy-waits ARGV[1] milliseconds (by Redis's clock), then returns ARGV[2].
BUSY = """
local t = redis.call('TIME')
local stop = t[1] * 1000000 + t[2] + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop
return ARGV[2]
"""
#: Counts its run, then fails.
INCR_THEN_FAIL = "redis.call('INCR', KEYS[1]) return redis.error_reply('boom')"

PASSWORD = "sekret"
ACL_USER, ACL_PASSWORD = "alice", "wonder"

LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(uvloop.new_event_loop, id="uvloop"),
]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


async def script(
    conn: MultiplexedConnection, source: str, keys: list[str], args: list[str | int]
) -> Any:
    return await conn.evalsha(sha(source), source, keys, args)


def run_on(loop_factory: LoopFactory, main: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """``main()`` on a fresh loop from ``loop_factory`` (checked to be uvloop's when asked)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        is_uvloop = isinstance(runner.get_loop(), uvloop.Loop)
        assert is_uvloop == (loop_factory is uvloop.new_event_loop)
        return runner.run(main())


async def within(seconds: float, awaitable: Awaitable[_T]) -> _T:
    async with asyncio.timeout(seconds):
        return await awaitable


async def client_id(conn: MultiplexedConnection) -> int:
    """The server's id of the connection: it changes exactly when the client reconnects."""
    value = await within(2, conn.execute("CLIENT", "ID"))
    assert isinstance(value, int)
    return value


def command_calls(server: RedisProcess, command: str) -> int:
    with server.client() as client:
        stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0)) + int(stats.get("rejected_calls", 0))


async def call_in_db2(ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """One 30 s call through ``ledger`` (reserve, live calls, settle, counters, ping), counting
    the scripts sent over its multiplexed connection: ``[ran, reservation, live, settled,
    counters]`` for ``assert_call_counted_once_in_db2``."""
    ran = count_scripts(ledger, monkeypatch)
    reservation = await ledger.reserve(request())
    live = await ledger.live_calls("acme")  # redis-py, in the same database
    settled = await ledger.settle("acme", "call-1", 30, NOW + 40)
    counters = await ledger.counters("acme", DAY)
    await ledger.ping()
    return [ran, reservation, live, settled, counters]


def assert_call_counted_once_in_db2(server: RedisProcess, outcome: list[Any]) -> None:
    """What ``call_in_db2`` must give on a ``g`` prefix in database 2 of ``server``."""
    ran, reservation, live, settled, counters = outcome
    assert reservation.allowed
    assert [call.call_id for call in live] == ["call-1"]
    assert settled.outcome is SettleOutcome.SETTLED
    assert (counters.total.spent, counters.total.reserved) == (call_cost(RATE, 30), 0)
    assert len(ran) == len(set(ran)) == 3  # reserve, settle, counters: all multiplexed
    assert script_runs(server) == 3  # and each ran exactly once
    with server.client(db=2) as db2, server.client() as db0:
        assert db2.keys("g:*")
        assert db0.dbsize() == 0


async def both_clients_fail(ledger: RedisLedger, seconds: float = 3) -> list[str]:
    """The ``StorageError`` of a script (multiplexed) and of a ping (redis-py), each within
    ``seconds``."""
    errors: list[str] = []
    for operation in (lambda: ledger.reserve(request()), ledger.ping):
        with pytest.raises(StorageError) as caught:
            await within(seconds, operation())
        errors.append(str(caught.value))
    return errors


def script_runs(server: RedisProcess) -> int:
    """Scripts the server ran to the end (an ``EVALSHA`` answered ``NOSCRIPT`` is not one)."""
    with server.client() as client:
        stats = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        - int(stats.get(f"cmdstat_{name}", {}).get("failed_calls", 0))
        for name in ("eval", "evalsha")
    )


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A private Redis that wants a password (``PASSWORD``), with the ACL user ``alice``."""
    server = RedisProcess(tmp_path_factory.mktemp("auth-redis")).start()
    try:
        with server.client() as client:
            client.execute_command(
                "ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"
            )
            client.config_set("requirepass", PASSWORD)
        yield server
    finally:
        server.stop()


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private Redis on a Unix socket only (``--port 0``)."""
    server = RedisProcess(tmp_path / "redis", unix_socket=tmp_path / "redis.sock").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def unix_auth_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A private Redis on a Unix socket only, started with ``--requirepass PASSWORD``, with the
    ACL user ``alice``."""
    home = tmp_path_factory.mktemp("unix-auth-redis")
    server = RedisProcess(home, unix_socket=home / "redis.sock", password=PASSWORD).start()
    try:
        with server.client() as client:
            client.execute_command(
                "ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"
            )
        yield server
    finally:
        server.stop()


def authed_client(server: RedisProcess, db: int = 0) -> redis.Redis:
    return redis.Redis(
        port=server.port, db=db, password=PASSWORD, decode_responses=True, socket_timeout=2
    )


@pytest.fixture
async def shared_conn(redis_url: str) -> AsyncIterator[MultiplexedConnection]:
    conn = MultiplexedConnection.from_url(redis_url)
    yield conn
    await conn.aclose()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the loop's exception handler during the test: must be nothing (a protocol
    callback that raised would be logged there, and its connection closed behind our back)."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)
    assert not errors


# --- a stand-in server ---------------------------------------------------------------------------

#: (connection number from 1, the command) -> the raw bytes to answer, or None to stay silent.
Answer = Callable[[int, list[bytes]], bytes | None]


def redis_like(command: list[bytes]) -> bytes:
    """What a healthy Redis would answer to the few commands the stand-ins are sent."""
    name = command[0].upper()
    if name == b"PING":
        return b"+PONG\r\n"
    if name == b"ECHO":
        return b"$%d\r\n%s\r\n" % (len(command[1]), command[1])
    return b"+OK\r\n"  # AUTH, SELECT


def silent_first(connection: int, command: list[bytes]) -> bytes | None:
    """The first connection is silent (a peer that vanished); the next ones answer."""
    return None if connection == 1 else redis_like(command)


class StandIn:
    """A local TCP server in place of Redis: counts connections, answers through ``answer``."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self.accepted = 0
        self.closed: set[int] = set()
        self.port = 0
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> StandIn:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self.writers:
            writer.close()
        await self._server.wait_closed()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2)

    def connection(self, **options: Any) -> MultiplexedConnection:
        return MultiplexedConnection("127.0.0.1", self.port, **options)

    async def wait_for(self, check: Callable[[], bool], seconds: float = 2.0) -> None:
        """Until ``check()`` holds (it is looked at after every connect and disconnect)."""
        async with asyncio.timeout(seconds):
            while not check():
                self._changed.clear()
                await self._changed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        number = self.accepted
        self.writers.append(writer)
        self._changed.set()
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    reply = self._answer(number, command)
                    if reply is not None:
                        writer.write(reply)
        except ConnectionError:
            pass
        finally:
            self.closed.add(number)
            self._changed.set()
            writer.close()


# --- many callers, one connection ----------------------------------------------------------------


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_concurrent_scripts_each_get_their_own_reply(
    loop_factory: LoopFactory, redis_url: str, key_prefix: str
) -> None:
    calls = 500
    counter = f"{key_prefix}:counter"

    async def main() -> tuple[list[Any], Any, int, int]:
        conn = MultiplexedConnection.from_url(redis_url)
        try:
            first_id = await client_id(conn)
            replies = await within(
                10,
                asyncio.gather(
                    *(script(conn, ECHO_INCR, [counter], [f"call-{i}"]) for i in range(calls))
                ),
            )
            count = await within(2, conn.execute("GET", counter))
            return replies, count, first_id, await client_id(conn)
        finally:
            await conn.aclose()

    replies, count, first_id, last_id = run_on(loop_factory, main)

    assert [reply[0] for reply in replies] == [f"call-{i}" for i in range(calls)]
    assert sorted(reply[1] for reply in replies) == list(range(1, calls + 1))
    assert count == str(calls)
    assert first_id == last_id  # all on one connection


async def test_error_replies_reach_their_caller_and_keep_the_order(
    shared_conn: MultiplexedConnection, key_prefix: str, loop_errors: list[dict[str, Any]]
) -> None:
    text, counter = f"{key_prefix}:text", f"{key_prefix}:counter"
    await within(2, shared_conn.execute("SET", text, "not a number"))

    replies = await within(
        2,
        asyncio.gather(
            shared_conn.execute("ECHO", "before"),
            shared_conn.execute("INCR", text),
            script(shared_conn, INCR_THEN_FAIL, [counter], []),
            shared_conn.execute("ECHO", "after"),
            return_exceptions=True,
        ),
    )

    before, wrong_type, failed, after = replies
    assert (before, after) == ("before", "after")
    assert isinstance(wrong_type, ResponseError) and "not an integer" in str(wrong_type)
    assert type(failed) is ResponseError and str(failed) == "ERR boom"
    # A script that failed is not run again.
    assert await within(2, shared_conn.execute("GET", counter)) == "1"


# --- NOSCRIPT ------------------------------------------------------------------------------------


async def test_noscript_runs_the_source_once_and_caches_it_again(
    private_redis: RedisProcess, loop_errors: list[dict[str, Any]]
) -> None:
    conn = MultiplexedConnection.from_url(private_redis.url)
    try:
        await within(2, conn.execute("CONFIG", "RESETSTAT"))
        assert await within(2, conn.execute("SCRIPT", "EXISTS", sha(ECHO_INCR))) == [0]

        first = await within(2, script(conn, ECHO_INCR, ["n"], ["a"]))
        cached = await within(2, conn.execute("SCRIPT", "EXISTS", sha(ECHO_INCR)))
        second = await within(2, script(conn, ECHO_INCR, ["n"], ["b"]))
        evals_before_flush = command_calls(private_redis, "eval")

        assert await within(2, conn.execute("SCRIPT", "FLUSH")) == "OK"
        after_flush = await within(
            2, asyncio.gather(*(script(conn, ECHO_INCR, ["n"], [i]) for i in range(20)))
        )
        with pytest.raises(NoScriptError):  # what the fallback answers
            await within(2, conn.execute("EVALSHA", sha(ECHO_INCR) + "0", 0))
        count = await within(2, conn.execute("GET", "n"))
    finally:
        await conn.aclose()

    assert (first, second, cached) == (["a", 1], ["b", 2], [1])
    assert evals_before_flush == 1  # the second call ran by its SHA
    assert sorted(reply[1] for reply in after_flush) == list(range(3, 23))
    assert [reply[0] for reply in after_flush] == [str(i) for i in range(20)]
    assert count == "22"  # each call ran exactly once
    assert command_calls(private_redis, "eval") == 21


# --- AUTH and SELECT -----------------------------------------------------------------------------


async def test_password_from_url_authenticates(auth_redis: RedisProcess) -> None:
    conn = MultiplexedConnection.from_url(f"redis://:{PASSWORD}@127.0.0.1:{auth_redis.port}")
    try:
        assert await within(2, conn.execute("ACL", "WHOAMI")) == "default"
        assert await within(2, script(conn, ECHO_INCR, ["auth:n"], ["x"])) == ["x", 1]
    finally:
        await conn.aclose()
        with authed_client(auth_redis) as client:
            client.delete("auth:n")


async def test_acl_user_and_database_from_url(auth_redis: RedisProcess) -> None:
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{auth_redis.port}/3"
    conn = MultiplexedConnection.from_url(url)
    try:
        user = await within(2, conn.execute("ACL", "WHOAMI"))
        await within(2, script(conn, ECHO_INCR, ["db:n"], ["x"]))
        await within(2, conn.execute("SET", "db:text", "three"))
    finally:
        await conn.aclose()

    with authed_client(auth_redis, db=3) as db3, authed_client(auth_redis) as db0:
        try:
            assert user == ACL_USER
            assert db3.mget("db:n", "db:text") == ["1", "three"]
            assert db0.exists("db:n", "db:text") == 0
        finally:
            db3.delete("db:n", "db:text")


@pytest.mark.parametrize(
    "credentials, message",
    [
        (":wrong@", "WRONGPASS"),
        (f"{ACL_USER}:{PASSWORD}@", "WRONGPASS"),
        ("", "NOAUTH"),
    ],
)
async def test_bad_credentials_fail_with_authentication_error_each_time(
    auth_redis: RedisProcess, credentials: str, message: str
) -> None:
    conn = MultiplexedConnection.from_url(f"redis://{credentials}127.0.0.1:{auth_redis.port}")
    try:
        for _ in range(2):  # a failed set-up is not kept: the next call tries again
            with pytest.raises(AuthenticationError, match=message):
                await within(2, script(conn, ECHO_INCR, ["auth:n"], ["x"]))
    finally:
        await conn.aclose()


async def test_ledger_reports_a_wrong_password_as_storage_error(auth_redis: RedisProcess) -> None:
    url = f"redis://:wrong@127.0.0.1:{auth_redis.port}/0"
    async with ledger_from_url(url, timeout=2.0) as ledger:
        with pytest.raises(StorageError, match="AuthenticationError: WRONGPASS") as caught:
            await ledger.reserve(request())

    assert "wrong" not in str(caught.value).replace("WRONGPASS", "")


# --- slow scripts, lost and misbehaving peers ----------------------------------------------------


async def test_caller_that_gives_up_does_not_shift_the_replies(
    private_redis: RedisProcess, loop_errors: list[dict[str, Any]]
) -> None:
    conn = MultiplexedConnection.from_url(private_redis.url)
    try:
        first_id = await client_id(conn)
        with pytest.raises(TimeoutError):
            await within(0.05, script(conn, BUSY, [], [200, "slow"]))
        # Sent while the slow script still runs: its reply comes first and must be dropped.
        gave_up = asyncio.ensure_future(within(0.05, conn.execute("ECHO", "gave up")))
        mine = asyncio.ensure_future(within(2, conn.execute("ECHO", "mine")))
        with pytest.raises(TimeoutError):
            await gave_up
        assert await mine == "mine"
        assert await within(2, script(conn, BUSY, [], [0, "quick"])) == "quick"
        assert await within(2, conn.execute("ECHO", "last")) == "last"
        assert await client_id(conn) == first_id  # no reconnection was needed
    finally:
        await conn.aclose()


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_lost_server_fails_waiting_callers_promptly_and_a_restart_is_reconnected(
    loop_factory: LoopFactory, private_redis: RedisProcess
) -> None:
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        conn = MultiplexedConnection.from_url(private_redis.url)
        try:
            assert await within(2, script(conn, ECHO_INCR, ["n"], ["warm"])) == ["warm", 1]
            waiting = [asyncio.ensure_future(script(conn, BUSY, [], [2_000, "slow"]))]
            waiting += [asyncio.ensure_future(conn.execute("ECHO", i)) for i in range(3)]
            await asyncio.sleep(0)  # queued (and written, or about to be)
            private_redis.stop()
            # Far sooner than the slow script would have answered.
            results = await within(1, asyncio.gather(*waiting, return_exceptions=True))
            assert all(isinstance(result, ConnectionError) for result in results), results

            with pytest.raises(ConnectionError):  # refused while down, at once
                await within(1, conn.execute("PING"))

            private_redis.start()  # same port, empty script cache
            assert await within(2, script(conn, ECHO_INCR, ["n"], ["back"])) == ["back", 1]
            assert await within(2, conn.execute("PING")) == "PONG"
        finally:
            await conn.aclose()

    run_on(loop_factory, main)
    assert not errors


async def test_silent_peer_times_callers_out_and_is_replaced_after_stale_after(
    loop_errors: list[dict[str, Any]],
) -> None:
    stale_after = 0.5
    async with StandIn(silent_first) as peer:
        conn = peer.connection(stale_after=stale_after)
        try:
            patient = asyncio.ensure_future(conn.execute("PING"))  # bounds nothing itself
            started = asyncio.get_running_loop().time()
            for _ in range(2):
                with pytest.raises(TimeoutError):
                    await within(0.05, conn.execute("PING"))
            if asyncio.get_running_loop().time() - started < stale_after * 0.8:
                # Not yet stale (checked only if this machine was not too slow to tell).
                assert peer.accepted == 1 and not patient.done()

            await asyncio.sleep(stale_after)
            assert await within(2, conn.execute("ECHO", "fresh")) == "fresh"
            assert peer.accepted == 2
            with pytest.raises(ConnectionError, match=r"no reply for 0\.5 s"):
                await within(1, patient)
            await peer.wait_for(lambda: 1 in peer.closed)
        finally:
            await conn.aclose()


async def test_silent_peer_during_set_up_is_replaced_after_stale_after(
    loop_errors: list[dict[str, Any]],
) -> None:
    async with StandIn(silent_first) as peer:
        conn = peer.connection(password=PASSWORD, db=2, stale_after=0.3)
        try:
            with pytest.raises(TimeoutError):  # AUTH is never answered
                await within(0.05, conn.execute("PING"))
            # The connection attempt gives up by itself after stale_after.
            await peer.wait_for(lambda: 1 in peer.closed)
            assert await within(2, conn.execute("PING")) == "PONG"
            assert peer.accepted == 2
        finally:
            await conn.aclose()


async def test_caller_that_gives_up_while_connecting_does_not_cancel_it_for_others(
    loop_errors: list[dict[str, Any]],
) -> None:
    def answer(connection: int, command: list[bytes]) -> bytes | None:
        return None if command[0] == b"AUTH" else redis_like(command)  # AUTH: answered below

    async with StandIn(answer) as peer:
        conn = peer.connection(password=PASSWORD)
        try:
            patient = asyncio.ensure_future(conn.execute("ECHO", "patient"))
            with pytest.raises(TimeoutError):
                await within(0.05, conn.execute("ECHO", "impatient"))
            assert not patient.done()
            peer.writers[0].write(b"+OK\r\n")  # AUTH succeeds at last
            assert await within(2, patient) == "patient"
            assert peer.accepted == 1 and not peer.closed
        finally:
            await conn.aclose()


@pytest.mark.parametrize(
    "first_answer",
    [
        pytest.param(b"?garbage\r\n", id="not-resp"),
        pytest.param(b"*2\r\n$1\r\na\r\n:x1\r\n", id="bad-integer"),
    ],
)
async def test_garbage_fails_waiting_callers_and_the_next_call_reconnects(
    first_answer: bytes, loop_errors: list[dict[str, Any]]
) -> None:
    def answer(connection: int, command: list[bytes]) -> bytes | None:
        if connection > 1:
            return redis_like(command)
        # The first command is answered well, the second with garbage, the rest never.
        return {b"1": b"+ONE\r\n", b"2": first_answer}.get(command[1])

    async with StandIn(answer) as peer:
        conn = peer.connection()
        try:
            results = await within(
                2,
                asyncio.gather(
                    *(conn.execute("ECHO", n) for n in (1, 2, 3)), return_exceptions=True
                ),
            )
            assert results[0] == "ONE"
            for result in results[1:]:
                assert isinstance(result, ConnectionError), results
                assert "protocol error" in str(result)
            assert await within(2, conn.execute("ECHO", "again")) == "again"
            assert peer.accepted == 2
        finally:
            await conn.aclose()


async def test_unsolicited_reply_drops_the_connection(
    loop_errors: list[dict[str, Any]],
) -> None:
    def answer(connection: int, command: list[bytes]) -> bytes:
        return b"+ONE\r\n+EXTRA\r\n" if connection == 1 else redis_like(command)

    async with StandIn(answer) as peer:
        conn = peer.connection()
        try:
            assert await within(2, conn.execute("PING")) == "ONE"
            await peer.wait_for(lambda: 1 in peer.closed)  # the client hung up by itself
            assert await within(2, conn.execute("ECHO", "mine")) == "mine"
            assert peer.accepted == 2
        finally:
            await conn.aclose()


async def test_peer_that_closes_fails_waiting_callers_and_the_next_call_reconnects(
    loop_errors: list[dict[str, Any]],
) -> None:
    def answer(connection: int, command: list[bytes]) -> bytes | None:
        return None if connection == 1 else redis_like(command)

    async with StandIn(answer) as peer:
        conn = peer.connection()
        try:
            waiting = asyncio.ensure_future(conn.execute("PING"))
            await peer.wait_for(lambda: peer.accepted == 1)
            peer.writers[0].close()
            with pytest.raises(ConnectionError, match="closed by the peer"):
                await within(2, waiting)
            assert await within(2, conn.execute("PING")) == "PONG"
            assert peer.accepted == 2
        finally:
            await conn.aclose()


# --- arguments, loops, URLs, closing -------------------------------------------------------------


async def test_text_that_is_not_utf8_is_sent_with_replacement(
    shared_conn: MultiplexedConnection,
    key_prefix: str,
    redis_url: str,
    loop_errors: list[dict[str, Any]],
) -> None:
    key = f"{key_prefix}:s\udcff"
    assert await within(2, shared_conn.execute("SET", key, "a\udcffb")) == "OK"
    assert await within(2, shared_conn.execute("GET", f"{key_prefix}:s?")) == "a?b"
    reply = await within(2, script(shared_conn, ECHO_INCR, [f"{key_prefix}:n"], ["x\ud800", 7]))
    assert reply == ["x?", 1]
    # And a reply that is not UTF-8 is decoded with replacement, not refused.
    with redis.Redis.from_url(redis_url) as client:
        client.set(f"{key_prefix}:raw", b"\xffok")
    assert await within(2, shared_conn.execute("GET", f"{key_prefix}:raw")) == "\ufffdok"


@pytest.mark.parametrize(
    "first, second",
    [
        pytest.param(asyncio.new_event_loop, asyncio.new_event_loop, id="asyncio-asyncio"),
        pytest.param(uvloop.new_event_loop, uvloop.new_event_loop, id="uvloop-uvloop"),
        pytest.param(asyncio.new_event_loop, uvloop.new_event_loop, id="asyncio-uvloop"),
    ],
)
def test_a_second_event_loop_reconnects(
    first: LoopFactory, second: LoopFactory, redis_url: str, key_prefix: str
) -> None:
    conn = MultiplexedConnection.from_url(redis_url)
    counter = f"{key_prefix}:n"
    errors: list[dict[str, Any]] = []

    async def use(tag: str) -> tuple[Any, int]:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        return await within(2, script(conn, ECHO_INCR, [counter], [tag])), await client_id(conn)

    first_reply, first_id = run_on(first, lambda: use("one"))
    second_reply, second_id = run_on(second, lambda: use("two"))

    async def close() -> None:
        await conn.aclose()

    run_on(second, close)
    assert (first_reply, second_reply) == (["one", 1], ["two", 2])
    assert first_id != second_id
    assert not errors


def test_from_url_parses_host_port_db_user_and_password() -> None:
    conn = MultiplexedConnection.from_url(
        "redis://al%40ice:p%40ss%3Aw%2Frd@redis.example:7000/5", stale_after=1.5
    )
    assert conn._address == ("redis.example", 7000)
    assert (conn._db, conn._username, conn._password) == (5, "al@ice", "p@ss:w/rd")
    assert conn._stale_after == 1.5

    plain = MultiplexedConnection.from_url("redis://localhost")
    assert plain._address == ("localhost", 6379)
    assert (plain._db, plain._username, plain._password) == (0, None, None)
    assert plain._stale_after == STALE_AFTER

    assert MultiplexedConnection.from_url("redis://:pw@h:1?db=4")._db == 4
    assert MultiplexedConnection.from_url("redis://:pw@h:1")._password == "pw"


def test_from_url_parses_a_unix_socket_path_db_user_and_password() -> None:
    conn = MultiplexedConnection.from_url(
        "unix://al%40ice:p%40ss%3Aw%2Frd@/run/redis/redis.sock?db=2", stale_after=1.5
    )
    assert conn._address == "/run/redis/redis.sock"
    assert (conn._db, conn._username, conn._password) == (2, "al@ice", "p@ss:w/rd")
    assert conn._stale_after == 1.5

    plain = MultiplexedConnection.from_url("unix:///run/redis/redis.sock")
    assert plain._address == "/run/redis/redis.sock"
    assert (plain._db, plain._username, plain._password) == (0, None, None)

    query = MultiplexedConnection.from_url("unix:///r.sock?db=3&username=bob&password=p%26w")
    assert (query._address, query._db, query._username, query._password) == (
        "/r.sock",
        3,
        "bob",
        "p&w",
    )


@pytest.mark.parametrize(
    "url",
    [
        "unix://",
        "unix://:pw@?db=2",
        "http://localhost",
        "localhost",
    ],
)
def test_from_url_rejects_what_it_cannot_multiplex(url: str) -> None:
    with pytest.raises(ValueError):
        MultiplexedConnection.from_url(url)


async def test_aclose_fails_callers_waiting_for_replies_and_a_later_call_reconnects(
    loop_errors: list[dict[str, Any]],
) -> None:
    async with StandIn(silent_first) as peer:
        conn = peer.connection()
        try:
            waiting = [asyncio.ensure_future(conn.execute("PING")) for _ in range(3)]
            await peer.wait_for(lambda: peer.accepted == 1)
            await within(2, conn.aclose())
            results = await within(2, asyncio.gather(*waiting, return_exceptions=True))
            assert all(isinstance(result, ConnectionError) for result in results), results
            await peer.wait_for(lambda: 1 in peer.closed)

            assert await within(2, conn.execute("PING")) == "PONG"
            assert peer.accepted == 2
        finally:
            await conn.aclose()
            await conn.aclose()  # twice is harmless


async def test_aclose_fails_callers_waiting_for_the_connection(
    loop_errors: list[dict[str, Any]],
) -> None:
    async with StandIn(silent_first) as peer:
        conn = peer.connection(password=PASSWORD)
        try:
            waiting = asyncio.ensure_future(conn.execute("PING"))
            await peer.wait_for(lambda: peer.accepted == 1)  # AUTH sent, never answered
            await within(2, conn.aclose())
            with pytest.raises(ConnectionError):  # not CancelledError: nobody cancelled it
                await within(2, waiting)
            assert not waiting.cancelled()

            assert await within(2, conn.execute("PING")) == "PONG"
            assert peer.accepted == 2
        finally:
            await conn.aclose()


async def test_aclose_of_an_unused_connection_does_nothing() -> None:
    conn = MultiplexedConnection("127.0.0.1", 1)
    await within(1, conn.aclose())


# --- following a Sentinel set's master -----------------------------------------------------------


INCR_SCRIPT = "return redis.call('INCR', KEYS[1])"
INCR_SHA = hashlib.sha1(INCR_SCRIPT.encode()).hexdigest()


async def test_a_demoted_master_is_left_for_the_server_located_next(tmp_path: Path) -> None:
    """After a failover the old master is a replica: its READONLY answer to a writing script
    fails the call as a lost connection and drops it; the next call asks ``locate`` again and
    runs on the new master. Nothing was written on the replica."""
    master = RedisProcess(tmp_path / "master").start()
    replica = RedisProcess(
        tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port)
    ).start()
    try:
        answers = [replica.port, master.port]  # what the Sentinels say before and after
        asked: list[int] = []

        async def locate() -> tuple[str, int]:
            asked.append(answers[len(asked)])
            return "127.0.0.1", asked[-1]

        conn = MultiplexedConnection.following(locate)
        try:
            with pytest.raises(ConnectionError, match="replica: READONLY"):
                await within(2, conn.evalsha(INCR_SHA, INCR_SCRIPT, ["n"], []))
            assert await within(2, conn.evalsha(INCR_SHA, INCR_SCRIPT, ["n"], [])) == 1
            assert await within(2, conn.execute("PING")) == "PONG"
        finally:
            await conn.aclose()
        assert asked == [replica.port, master.port]
        with master.client() as client:
            assert client.get("n") == b"1"
    finally:
        replica.stop()
        master.stop()


async def test_a_following_connection_logs_in_and_selects_its_database(
    auth_redis: RedisProcess,
) -> None:
    async def locate() -> tuple[str, int]:
        return "127.0.0.1", auth_redis.port

    conn = MultiplexedConnection.following(locate, db=3, username=ACL_USER, password=ACL_PASSWORD)
    try:
        assert await within(2, conn.execute("ACL", "WHOAMI")) == ACL_USER
        assert " db=3 " in await within(2, conn.execute("CLIENT", "INFO"))
    finally:
        await conn.aclose()


async def test_a_failing_locate_fails_the_call_and_is_asked_again() -> None:
    calls = 0

    async def locate() -> tuple[str, int]:
        nonlocal calls
        calls += 1
        raise ConnectionError("no Sentinel answered")

    conn = MultiplexedConnection.following(locate)
    for _ in range(2):
        with pytest.raises(ConnectionError, match="no Sentinel answered"):
            await within(2, conn.execute("PING"))
    assert calls == 2
    await conn.aclose()


# --- through the ledger --------------------------------------------------------------------------


async def test_redis_url_ledger_runs_its_scripts_on_the_multiplexed_connection(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ledger_from_url(redis_url, prefix=key_prefix, timeout=2.0) as ledger:
        ran = count_scripts(ledger, monkeypatch)
        reservation = await ledger.reserve(request())
        settled = await ledger.settle("acme", "call-1", 30, NOW + 40)

    assert reservation.allowed
    assert settled.outcome is SettleOutcome.SETTLED
    assert len(ran) == 2 and ran[0] != ran[1]


async def test_the_memory_ledger_has_no_multiplexed_connection() -> None:
    async with ledger_from_url("memory://", timeout=1.0) as ledger:
        assert ledger._scripts is None


# --- unix:// ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_unix_url_ledger_counts_a_call_once_in_its_database_on_the_multiplexed_connection(
    loop_factory: LoopFactory, unix_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{unix_redis.url}?db=2"

    async def main() -> tuple[Any, list[Any]]:
        async with ledger_from_url(url, prefix="g", timeout=2.0) as ledger:
            assert isinstance(ledger._scripts, MultiplexedConnection)
            return ledger._scripts._address, await call_in_db2(ledger, monkeypatch)

    address, outcome = run_on(loop_factory, main)

    assert address == str(unix_redis.unix_socket)
    assert_call_counted_once_in_db2(unix_redis, outcome)


@pytest.mark.parametrize("loop_factory", LOOPS)
@pytest.mark.parametrize(
    "form, user",
    [
        pytest.param("unix://:{password}@{path}?db=1", "default", id="password"),
        pytest.param("unix://{path}?db=1&password={password}", "default", id="password-option"),
        pytest.param("unix://{user}:{acl_password}@{path}?db=1", ACL_USER, id="acl-user"),
        pytest.param(
            "unix://{path}?username={user}&password={acl_password}&db=1",
            ACL_USER,
            id="acl-user-options",
        ),
    ],
)
def test_unix_url_credentials_authenticate_both_clients(
    loop_factory: LoopFactory,
    unix_auth_redis: RedisProcess,
    monkeypatch: pytest.MonkeyPatch,
    form: str,
    user: str,
) -> None:
    url = form.format(
        path=unix_auth_redis.unix_socket,
        password=PASSWORD,
        user=ACL_USER,
        acl_password=ACL_PASSWORD,
    )

    async def main() -> tuple[Any, ...]:
        async with ledger_from_url(url, prefix="g", timeout=2.0) as ledger:
            ran = count_scripts(ledger, monkeypatch)
            assert isinstance(ledger._scripts, MultiplexedConnection)
            whoami = await within(2, ledger._scripts.execute("ACL", "WHOAMI"))
            reservation = await ledger.reserve(request())
            live = await ledger.live_calls("acme")  # redis-py, authenticated the same way
            settled = await ledger.settle("acme", "call-1", 30, NOW + 40)
            return whoami, ran, reservation, live, settled

    try:
        whoami, ran, reservation, live, settled = run_on(loop_factory, main)
        with unix_auth_redis.client(db=1) as db1:
            assert db1.keys("g:*")
    finally:
        with unix_auth_redis.client(db=1) as db1:
            db1.flushdb()

    assert whoami == user
    assert reservation.allowed and settled.outcome is SettleOutcome.SETTLED
    assert [call.call_id for call in live] == ["call-1"]
    assert len(ran) == 2


@pytest.mark.parametrize("loop_factory", LOOPS)
@pytest.mark.parametrize(
    "credentials, options, message",
    [
        pytest.param(":wrong@", "", "AuthenticationError: WRONGPASS", id="wrong-password"),
        pytest.param(
            "", "?password=wrong", "AuthenticationError: WRONGPASS", id="wrong-password-option"
        ),
        pytest.param(
            f"{ACL_USER}:{PASSWORD}@", "", "AuthenticationError: WRONGPASS", id="wrong-user"
        ),
        # Redis refuses a long command from an unauthenticated client before it says NOAUTH.
        pytest.param(
            "", "", "AuthenticationError: .* requires a password; the URL gives none", id="no-pw"
        ),
    ],
)
def test_unix_url_with_bad_credentials_is_a_storage_error(
    loop_factory: LoopFactory,
    unix_auth_redis: RedisProcess,
    credentials: str,
    options: str,
    message: str,
) -> None:
    url = f"unix://{credentials}{unix_auth_redis.unix_socket}{options}"

    async def main() -> str:
        async with ledger_from_url(url, timeout=2.0) as ledger:
            with pytest.raises(StorageError, match=message) as caught:
                await within(3, ledger.reserve(request()))
        return str(caught.value)

    error = run_on(loop_factory, main)
    assert mask_url(url) in error
    assert "wrong" not in error.replace("WRONGPASS", "")


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_unix_url_to_a_missing_socket_fails_at_once_naming_the_masked_url(
    loop_factory: LoopFactory, tmp_path: Path
) -> None:
    url = f"unix://:{PASSWORD}@{tmp_path / 'absent.sock'}?db=2"

    async def main() -> list[str]:
        async with ledger_from_url(url, timeout=2.0) as ledger:
            return await both_clients_fail(ledger, seconds=1)

    for error in run_on(loop_factory, main):
        assert error.startswith(f"counter store {mask_url(url)}: "), error
        assert "No such file or directory" in error
        assert PASSWORD not in error


@pytest.mark.parametrize("url", ["unix://", "unix://:hunter2@?db=2"])
def test_unix_url_without_a_socket_path_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="socket path is missing") as caught:
        ledger_from_url(url)

    assert mask_url(url) in str(caught.value)
    assert "hunter2" not in str(caught.value)


# --- rediss:// ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_redis(tmp_path: Path, test_ca: trustme.CA) -> Iterator[RedisProcess]:
    """A private Redis on a TLS port only, with ``requirepass``; its certificate names
    127.0.0.1."""
    tls = tls_files(test_ca, tmp_path / "tls", "127.0.0.1", "localhost")
    server = RedisProcess(tmp_path / "redis", tls=tls, password=PASSWORD).start()
    yield server
    server.stop()


def tls_url(server: RedisProcess, ca: Path | None = None, *, db: int = 0, options: str = "") -> str:
    """``rediss://`` to ``server`` with its password, trusting ``ca`` (the server's CA)."""
    assert server.tls is not None
    ca_file = ca or server.tls.ca
    return f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/{db}?ssl_ca_certs={ca_file}{options}"


async def use_both_clients(ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Reserve and settle a call (scripts, multiplexed) and ping (redis-py); the scripts run."""
    ran = count_scripts(ledger, monkeypatch)
    assert (await ledger.reserve(request())).allowed
    settled = await ledger.settle("acme", "call-1", 30, NOW + 40)
    assert settled.outcome is SettleOutcome.SETTLED
    await ledger.ping()
    return ran


def refused_then_accepted(
    loop_factory: LoopFactory, refused: str, accepted: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[str]]:
    """On a fresh loop: the errors of both clients of a ledger on ``refused``, then the scripts
    a ledger on ``accepted`` runs with both clients."""

    async def main() -> tuple[list[str], list[str]]:
        async with ledger_from_url(refused, timeout=2.0) as ledger:
            errors = await both_clients_fail(ledger)
        async with ledger_from_url(accepted, timeout=2.0) as ledger:
            ran = await use_both_clients(ledger, monkeypatch)
        return errors, ran

    return run_on(loop_factory, main)


def test_from_url_builds_redis_py_tls_context_with_its_defaults(tmp_path: Path) -> None:
    ca = tls_files(trustme.CA(), tmp_path, "127.0.0.1").ca
    conn = MultiplexedConnection.from_url(
        f"rediss://bob:p%40ss@redis.example:6380/3?ssl_ca_certs={ca}"
    )
    assert (conn._address, conn._db, conn._username, conn._password) == (
        ("redis.example", 6380),
        3,
        "bob",
        "p@ss",
    )
    assert isinstance(conn._ssl_context, RedisSSLContext)  # redis-py's, built at first use
    context = conn._ssl_context.get()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname  # as redis-py's SSLConnection by default

    lax = MultiplexedConnection.from_url("rediss://redis.example?ssl_cert_reqs=none")
    assert isinstance(lax._ssl_context, RedisSSLContext)
    assert lax._ssl_context.get().verify_mode is ssl.CERT_NONE
    assert not lax._ssl_context.get().check_hostname

    plain = MultiplexedConnection.from_url("redis://redis.example")
    assert plain._ssl_context is None


def test_rediss_url_with_an_invalid_tls_option_is_a_configuration_error() -> None:
    url = "rediss://:hunter2@127.0.0.1:6380/0?ssl_cert_reqs=always"
    with pytest.raises(ConfigurationError, match="Invalid SSL Certificate Requirements") as caught:
        ledger_from_url(url)

    assert mask_url(url) in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_rediss_url_ledger_counts_a_call_once_in_its_database_on_the_multiplexed_connection(
    loop_factory: LoopFactory, tls_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = tls_url(tls_redis, db=2)

    async def main() -> tuple[Any, list[Any]]:
        async with ledger_from_url(url, prefix="g", timeout=2.0) as ledger:
            assert isinstance(ledger._scripts, MultiplexedConnection)
            assert ledger._scripts._ssl_context is not None
            whoami = await within(2, ledger._scripts.execute("ACL", "WHOAMI"))
            return whoami, await call_in_db2(ledger, monkeypatch)  # redis-py over TLS too

    whoami, outcome = run_on(loop_factory, main)

    assert whoami == "default"  # AUTH over TLS
    assert_call_counted_once_in_db2(tls_redis, outcome)


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_rediss_server_certificate_from_another_ca_fails_naming_the_masked_url(
    loop_factory: LoopFactory, tls_redis: RedisProcess, tmp_path: Path
) -> None:
    other_ca = tls_files(trustme.CA(), tmp_path / "other", "127.0.0.1").ca
    url = tls_url(tls_redis, other_ca)

    async def main() -> list[str]:
        async with ledger_from_url(url, timeout=2.0) as ledger:
            return await both_clients_fail(ledger)

    for error in run_on(loop_factory, main):
        assert error.startswith(f"counter store {mask_url(url)}: "), error
        assert "CERTIFICATE_VERIFY_FAILED" in error, error
        assert PASSWORD not in error
    assert script_runs(tls_redis) == 0


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_rediss_with_ssl_cert_reqs_none_connects_to_a_certificate_from_another_ca(
    loop_factory: LoopFactory,
    tls_redis: RedisProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other_ca = tls_files(trustme.CA(), tmp_path / "other", "127.0.0.1").ca
    url = tls_url(tls_redis, other_ca, options="&ssl_cert_reqs=none")

    async def main() -> list[str]:
        async with ledger_from_url(url, timeout=2.0) as ledger:
            return await use_both_clients(ledger, monkeypatch)

    assert len(run_on(loop_factory, main)) == 2
    assert script_runs(tls_redis) == 2


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_rediss_checks_the_host_name_unless_told_not_to(
    loop_factory: LoopFactory,
    test_ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls = tls_files(test_ca, tmp_path / "tls", "redis.example")  # not 127.0.0.1
    server = RedisProcess(tmp_path / "redis", tls=tls, password=PASSWORD)
    server.start()
    try:
        checked = tls_url(server)
        unchecked = tls_url(server, options="&ssl_check_hostname=false")
        errors, ran = refused_then_accepted(loop_factory, checked, unchecked, monkeypatch)
        assert script_runs(server) == 2
    finally:
        server.stop()

    for error in errors:
        assert error.startswith(f"counter store {mask_url(checked)}: "), error
        assert "CERTIFICATE_VERIFY_FAILED" in error and "mismatch" in error, error
    assert len(ran) == 2


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_rediss_client_certificate_from_the_url_is_shown_to_a_server_that_requires_one(
    loop_factory: LoopFactory,
    test_ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls = tls_files(test_ca, tmp_path / "tls", "127.0.0.1")
    client_tls = tls_files(test_ca, tmp_path / "client", "guard-client")
    server = RedisProcess(
        tmp_path / "redis", tls=tls, tls_auth_clients="yes", client_tls=client_tls
    ).start()
    try:
        anonymous = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={tls.ca}"
        with_cert = f"{anonymous}&ssl_certfile={client_tls.cert}&ssl_keyfile={client_tls.key}"
        errors, ran = refused_then_accepted(loop_factory, anonymous, with_cert, monkeypatch)
        assert script_runs(server) == 2
    finally:
        server.stop()

    assert all(error.startswith(f"counter store {anonymous}: ") for error in errors), errors
    assert len(ran) == 2


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_rediss_with_a_missing_ca_file_fails_at_the_first_operation(
    loop_factory: LoopFactory, tls_redis: RedisProcess, tmp_path: Path
) -> None:
    url = tls_url(tls_redis, tmp_path / "absent.pem")

    async def main() -> list[str]:
        async with ledger_from_url(url, timeout=2.0) as ledger:  # builds without reading it
            return await both_clients_fail(ledger)

    for error in run_on(loop_factory, main):
        assert error.startswith(f"counter store {mask_url(url)}: "), error
        assert PASSWORD not in error
