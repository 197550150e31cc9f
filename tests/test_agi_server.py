"""The FastAGI server: sessions, timeouts, refusals, allow-list, overload and shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from agi_support import StubAuthorizer, eventually, guard_server, running, transcripts

from guard.agi.protocol import AGIProtocolError, AGIReply, EnvironmentLimits
from guard.agi.server import AGIConnectionError, AGIRequest, AGIServer
from guard.agi.testing import FakeAsterisk, build_environment, replace_environment
from guard.errors import ConfigurationError

LOOPBACK = [("127.0.0.1", 0)]


def _env(script: str, uniqueid: str = "7.1", **more: str) -> bytes:
    return build_environment(
        {"network": "yes", "network_script": script, "uniqueid": uniqueid, **more}
    )


class Recorder:
    """A route handler that records its requests and sets ``GUARD_RESULT`` like a real one."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.requests: list[AGIRequest] = []
        self.gate = gate

    async def __call__(self, request: AGIRequest) -> None:
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        await request.send_command('SET VARIABLE GUARD_RESULT "ALLOW"')


def _app(handler: Recorder | None = None, path: str = "slow", **options: object) -> AGIServer:
    app = AGIServer(LOOPBACK, **options)  # type: ignore[arg-type]
    app.add_route(path, handler or Recorder())
    return app


async def test_hangup_before_any_command_is_seen_and_commands_still_work(
    shared_dir: Path,
) -> None:
    seen: list[tuple[bool, AGIReply, bool, AGIReply]] = []

    async def slow(request: AGIRequest) -> None:
        before = request.hung_up
        first = await request.send_command('SET VARIABLE GUARD_RESULT "ALLOW"')
        seen.append(
            (
                before,
                first,
                request.hung_up,
                await request.send_command("GET VARIABLE GUARD_RESULT"),
            )
        )

    app = AGIServer(LOOPBACK)
    app.add_route("slow", slow)
    async with running(app) as (host, port):
        record = await FakeAsterisk(host, port, transcripts(shared_dir)).play(
            "hangup-during-agi", hangup_after=0
        )
    assert seen == [
        (
            False,
            AGIReply(200, 1, text="result=1"),
            True,
            AGIReply(200, 1, "ALLOW", text="result=1 (ALLOW)"),
        )
    ]
    assert record.closed_by_server and record.variables["GUARD_RESULT"] == "ALLOW"


async def test_hangup_between_replies_is_skipped(shared_dir: Path) -> None:
    flags: list[bool] = []

    async def slow(request: AGIRequest) -> None:
        for _ in range(3):
            await request.send_command("NOOP")
            flags.append(request.hung_up)

    app = AGIServer(LOOPBACK)
    app.add_route("slow", slow)
    async with running(app) as (host, port):
        await FakeAsterisk(host, port, transcripts(shared_dir)).play(
            "hangup-during-agi", hangup_after=1
        )
    assert flags == [False, True, True]


async def test_a_batch_is_sent_one_command_at_a_time() -> None:
    """FakeAsterisk stalls on pipelined commands as Asterisk does: a batch must not pipeline."""
    replies: list[list[AGIReply]] = []

    async def batch(request: AGIRequest) -> None:
        replies.append(await request.send_commands([f'SET VARIABLE V{i} "{i}"' for i in range(10)]))

    app = AGIServer(LOOPBACK, reply_timeout=1.0)
    app.add_route("batch", batch)
    async with running(app) as (host, port):
        record = await FakeAsterisk(host, port).play(_env("batch"))
    assert [reply.code for reply in replies[0]] == [200] * 10
    assert record.assignments == [(f"V{i}", str(i)) for i in range(10)]


async def test_a_command_that_is_not_one_line_is_refused_before_anything_is_sent() -> None:
    errors: list[Exception] = []

    async def inject(request: AGIRequest) -> None:
        try:
            await request.send_commands(
                ["NOOP", "SET VARIABLE A 1\nSET VARIABLE GUARD_RESULT ALLOW"]
            )
        except AGIProtocolError as exc:
            errors.append(exc)

    app = AGIServer(LOOPBACK)
    app.add_route("inject", inject)
    async with running(app) as (host, port):
        record = await FakeAsterisk(host, port).play(_env("inject"))
    assert len(errors) == 1 and record.commands == []


async def test_silent_peer_times_out() -> None:
    app = _app(env_timeout=0.2)
    async with running(app) as (host, port):
        started = time.monotonic()
        record = await FakeAsterisk(host, port).play(b"", send_bytes=0, hold=True, time_limit=5)
    assert record.closed_by_server and not record.timed_out
    assert time.monotonic() - started < 2


async def test_peer_that_stops_answering_times_out() -> None:
    handler = Recorder()
    app = _app(handler, reply_timeout=0.2)
    async with running(app) as (host, port):
        started = time.monotonic()
        record = await FakeAsterisk(host, port).play(_env("slow"), mute_after=0, time_limit=5)
    assert record.closed_by_server and record.commands == ['SET VARIABLE GUARD_RESULT "ALLOW"']
    assert time.monotonic() - started < 2 and app.active_sessions == 0


async def test_each_reply_gets_the_whole_reply_timeout_however_long_the_session() -> None:
    """The reply deadline moves with every command: four replies of 0.15 s each pass a 0.3 s
    reply timeout (0.6 s in all), and a silent environment is still cut at its own timeout."""

    async def four(request: AGIRequest) -> None:
        await request.send_commands([f"SET VARIABLE V{i} {i}" for i in range(4)])

    app = AGIServer(LOOPBACK, reply_timeout=0.3, env_timeout=0.5)
    app.add_route("slow", four)
    async with running(app) as (host, port):
        slow = await FakeAsterisk(host, port).play(_env("slow"), reply_delay=0.15, time_limit=5)
        started = time.monotonic()
        silent = await FakeAsterisk(host, port).play(
            _env("slow"), send_bytes=10, hold=True, time_limit=5
        )
        waited = time.monotonic() - started
    assert slow.closed_by_server and len(slow.commands) == 4
    assert silent.closed_by_server and 0.4 < waited < 2


@pytest.mark.parametrize(
    ("send_bytes", "close_after"),
    [(0, None), (20, None), (None, 0)],
    ids=["nothing", "half", "mid"],
)
async def test_peer_leaving_early_ends_the_session_quietly(
    send_bytes: int | None, close_after: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    handler = Recorder()
    app = _app(handler)
    async with running(app) as (host, port):
        baseline = len(asyncio.all_tasks())
        for _ in range(20):
            await FakeAsterisk(host, port).play(
                _env("slow"), send_bytes=send_bytes, close_after=close_after
            )
        await eventually(lambda: app.active_sessions == 0)
        assert len(asyncio.all_tasks()) == baseline
    assert len(handler.requests) == (20 if close_after == 0 else 0)
    assert all(r.levelno < logging.WARNING and not r.exc_info for r in caplog.records)


async def test_idle_half_open_peers_cost_no_cpu() -> None:
    app = _app(env_timeout=60)
    async with running(app) as (host, port):
        peers = [await asyncio.open_connection(host, port) for _ in range(100)]
        await eventually(lambda: app.active_sessions == 100)
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(1.0)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        for _, writer in peers:
            writer.close()
        await eventually(lambda: app.active_sessions == 0)
    assert wall >= 1.0 and cpu < 0.1, f"{cpu:.3f} s of CPU in {wall:.2f} s"


@pytest.mark.parametrize(
    "environment",
    [
        _env("slow")[:-1] + b"agi_channel SIP/1\n\n",
        _env("slow")[:-1] + b"agi_arg_1: " + b"x" * 5000 + b"\n\n",
        _env("slow")[:-1] + b"AGI_CHANNEL: x\n\n",
        _env("slow")[:-1] + b"agi_channel: a\x00b\n\n",
        _env("slow").replace(b"script: slow", "script: slow?ua=\u00e9".encode()),
        _env("slow").replace(b"script: slow", b"script: slow?ua=\xff"),
        build_environment({"network": "yes", "uniqueid": "7.1"}),
    ],
    ids=["no-separator", "over-long", "bad-name", "nul", "non-ascii", "not-utf8", "no-script"],
)
async def test_malformed_request_is_refused_with_a_deny(environment: bytes) -> None:
    handler = Recorder()
    app = _app(handler)
    async with running(app) as (host, port):
        record = await FakeAsterisk(host, port).play(environment)
    assert handler.requests == []
    assert record.commands[0] == 'VERBOSE "guard: bad request" 1'
    assert record.assignments == [
        ("GUARD_REASON", "bad_request"),
        ("GUARD_MAX_SECONDS", "0"),
        ("GUARD_RESULT", "DENY"),
    ]


async def test_non_utf8_caller_name_does_not_refuse_the_call() -> None:
    handler = Recorder()
    app = _app(handler)
    async with running(app) as (host, port):
        environment = _env("slow")[:-1] + b"agi_calleridname: Jos\xe9\n\n"
        record = await FakeAsterisk(host, port).play(environment)
    assert handler.requests[0].env["agi_calleridname"] == "Jos\ufffd"
    assert record.variables["GUARD_RESULT"] == "ALLOW"


async def test_environment_beyond_the_hard_limits_is_dropped_without_a_word() -> None:
    handler = Recorder()
    app = _app(handler, limits=EnvironmentLimits(max_lines=50))
    async with running(app) as (host, port):
        lines = b"".join(f"agi_arg_{i}: x\n".encode() for i in range(1, 80))
        record = await FakeAsterisk(host, port).play(_env("slow")[:-1] + lines + b"\n")
    assert record.closed_by_server and record.commands == [] and handler.requests == []


async def test_unknown_route_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    app = _app()
    async with running(app) as (host, port):
        record = await FakeAsterisk(host, port).play(_env('nope"\\x?tenant=acme'))
    assert record.commands[0] == 'VERBOSE "guard: unknown route nope\\"\\\\x" 1'
    assert record.variables["GUARD_RESULT"] == "DENY"
    assert record.variables["GUARD_REASON"] == "bad_request"
    warning = next(r for r in caplog.records if r.getMessage() == "agi unknown route")
    assert warning.guard_fields["route"] == 'nope"\\x'  # type: ignore[attr-defined]


async def test_allow_list_closes_other_addresses(caplog: pytest.LogCaptureFixture) -> None:
    handler = Recorder()
    app = _app(handler, allow=["10.0.0.0/8", "::1/128"])
    async with running(app) as (host, port):
        record = await FakeAsterisk(host, port).play(_env("slow"))
    assert record.closed_by_server and record.commands == [] and handler.requests == []
    refused = [r for r in caplog.records if "not allowed" in r.getMessage()]
    assert refused[0].guard_fields == {"peer": "127.0.0.1"}  # type: ignore[attr-defined]


async def test_allow_list_lets_listed_addresses_in() -> None:
    handler = Recorder()
    app = _app(handler, allow=["127.0.0.0/8"])
    async with running(app) as (host, port):
        record = await FakeAsterisk(host, port).play(_env("slow"))
    assert handler.requests[0].peer[0] == "127.0.0.1"
    assert record.variables["GUARD_RESULT"] == "ALLOW"


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="invalid network 'nonsense'"):
        AGIServer(LOOPBACK, allow=["nonsense"])
    with pytest.raises(ConfigurationError, match="listen address"):
        AGIServer([])
    app = _app()
    with pytest.raises(ConfigurationError, match="already registered"):
        app.add_route("/slow/", Recorder())


async def test_shutdown_lets_the_session_in_flight_finish() -> None:
    gate = asyncio.Event()
    handler = Recorder(gate)
    app = _app(handler)
    await app.start()
    host, port = app.addresses[0]
    play = asyncio.create_task(FakeAsterisk(host, port).play(_env("slow")))
    await eventually(lambda: len(handler.requests) == 1)
    shutdown = asyncio.create_task(app.shutdown(grace=5))
    await asyncio.sleep(0.1)
    with pytest.raises(OSError):
        await asyncio.open_connection(host, port)
    assert not shutdown.done()
    gate.set()
    record = await play
    await shutdown
    assert record.variables["GUARD_RESULT"] == "ALLOW" and record.closed_by_server


async def test_shutdown_cancels_what_outlives_the_grace() -> None:
    handler = Recorder(asyncio.Event())
    app = _app(handler)
    await app.start()
    host, port = app.addresses[0]
    play = asyncio.create_task(FakeAsterisk(host, port).play(_env("slow")))
    await eventually(lambda: len(handler.requests) == 1)
    started = time.monotonic()
    await app.shutdown(grace=0.2)
    record = await play
    assert time.monotonic() - started < 2 and app.active_sessions == 0
    assert record.closed_by_server and "GUARD_RESULT" not in record.variables


async def test_session_time_limit(caplog: pytest.LogCaptureFixture) -> None:
    app = _app(Recorder(asyncio.Event()), session_timeout=0.2)
    async with running(app) as (host, port):
        record = await FakeAsterisk(host, port).play(_env("slow"), time_limit=5)
    assert record.closed_by_server and not record.timed_out
    assert any(r.getMessage() == "agi session exceeded its time limit" for r in caplog.records)


async def test_timeout_raised_by_a_handler_is_a_handler_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def impatient(request: AGIRequest) -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    app = AGIServer(LOOPBACK)
    app.add_route("impatient", impatient)
    async with running(app) as (host, port):
        await FakeAsterisk(host, port).play(_env("impatient"))
    failure = next(r for r in caplog.records if r.getMessage() == "agi route handler failed")
    assert failure.exc_info is not None


async def test_overloaded_server_refuses_quickly() -> None:
    gate = asyncio.Event()
    app = _app(Recorder(gate), max_sessions=1, overload_wait=0.05)
    async with running(app) as (host, port):
        asterisk = FakeAsterisk(host, port)
        first = asyncio.create_task(asterisk.play(_env("slow", "8.1")))
        await eventually(lambda: app.active_sessions == 1)
        second = await asterisk.play(_env("slow", "8.2"))
        gate.set()
        assert (await first).variables["GUARD_RESULT"] == "ALLOW"
    assert second.commands[0] == 'VERBOSE "guard: overloaded" 1'
    assert second.variables["GUARD_REASON"] == "overloaded"
    assert second.variables["GUARD_RESULT"] == "DENY"


async def test_handler_failure_is_logged_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    async def flaky(request: AGIRequest) -> None:
        calls.append(request.env["agi_uniqueid"])
        if len(calls) == 1:
            raise RuntimeError("boom")
        await request.send_command("NOOP")

    app = AGIServer(LOOPBACK)
    app.add_route("flaky", flaky)
    async with running(app) as (host, port):
        asterisk = FakeAsterisk(host, port)
        first = await asterisk.play(_env("flaky", "5.1"))
        second = await asterisk.play(_env("flaky", "5.2"))
    assert first.closed_by_server and second.commands == ["NOOP"]
    failure = next(r for r in caplog.records if r.getMessage() == "agi route handler failed")
    assert failure.exc_info is not None


async def test_connection_errors_reach_the_handler_as_agi_connection_error() -> None:
    errors: list[Exception] = []

    async def talk(request: AGIRequest) -> None:
        await request.send_command("NOOP")
        try:
            await request.send_command("NOOP")
        except AGIConnectionError as exc:
            errors.append(exc)
            raise

    app = AGIServer(LOOPBACK)
    app.add_route("talk", talk)
    async with running(app) as (host, port):
        await FakeAsterisk(host, port).play(_env("talk"), close_after=1)
        await eventually(lambda: app.active_sessions == 0)
    assert len(errors) == 1


async def test_several_listen_addresses(shared_dir: Path) -> None:
    handler = Recorder()
    app = AGIServer([("127.0.0.1", 0), ("127.0.0.1", 0)])
    app.add_route("slow", handler)
    async with app:
        assert len(app.addresses) == 2
        for host, port in app.addresses:
            record = await FakeAsterisk(host, port, transcripts(shared_dir)).play(
                "hangup-during-agi"
            )
            assert record.variables["GUARD_RESULT"] == "ALLOW"
    assert len(handler.requests) == 2


async def test_thousand_concurrent_sessions_are_all_answered(shared_dir: Path) -> None:
    engine = StubAuthorizer()
    async with guard_server(engine, shared_dir) as asterisk:
        recorded = asterisk.transcripts["authorize-pjsip"].environment
        environments = [replace_environment(recorded, uniqueid=f"1000.{i}") for i in range(1000)]
        records = await asyncio.gather(*(asterisk.play(env) for env in environments))
    assert all(r.variables["GUARD_RESULT"] == "ALLOW" for r in records)
    assert all(r.variables["GUARD_MAX_SECONDS"] == "120" for r in records)
    assert {a.call_id for a in engine.attempts} == {f"1000.{i}" for i in range(1000)}
