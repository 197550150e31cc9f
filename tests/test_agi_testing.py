"""FakeAsterisk answers like the recorded Asterisk, byte for byte, stalls included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from agi_support import transcripts

from guard.agi.protocol import parse_environment
from guard.agi.testing import (
    ASTERISK_TO_GUARD,
    GUARD_TO_ASTERISK,
    FakeAsterisk,
    Transcript,
    build_environment,
    dialplan_outcome,
    replace_environment,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: Each channel's authorize session before its hangup handler, as Asterisk ran them.
ORDER = [
    "authorize-chan_sip",
    "settle-chan_sip",
    "authorize-hostile-ua",
    "settle-hostile-ua",
    "authorize-pjsip",
    "settle-pjsip",
    "authorize-local",
    "settle-local",
    "hangup-during-agi",
    "silent-server",
]


@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[str, int]]:
    """A bare TCP server that runs ``script`` on each connection, then closes it."""
    failures: list[BaseException] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except BaseException as exc:  # surfaced to the test below
            failures.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        await server.wait_closed()
    if failures:
        raise failures[0]


def _replies_before_hangup(transcript: Transcript) -> int | None:
    replies = 0
    for chunk in transcript.chunks:
        if chunk.direction == ASTERISK_TO_GUARD:
            if chunk.data == b"HANGUP\n":
                return replies
            replies += 1
    return None


async def test_every_recorded_session_is_replayed_and_answered_byte_for_byte(
    shared_dir: Path,
) -> None:
    recorded = transcripts(shared_dir)
    assert sorted(ORDER) == sorted(recorded)
    current: list[Transcript] = []

    async def replay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transcript = current[0]
        assert await reader.readuntil(b"\n\n") == transcript.environment
        for chunk in transcript.chunks:
            if chunk.direction == GUARD_TO_ASTERISK:
                writer.write(chunk.data)
            elif chunk.direction == ASTERISK_TO_GUARD:
                assert await reader.readexactly(len(chunk.data)) == chunk.data, transcript.name

    async with scripted_server(replay) as (host, port):
        asterisk = FakeAsterisk(host, port, recorded)
        for name in ORDER:
            current[:] = [recorded[name]]
            record = await asterisk.play(name, hangup_after=_replies_before_hangup(recorded[name]))
            assert record.closed_by_server and not record.timed_out
    assert asterisk.channel("1795292156.55")["GUARD_SETTLED"] == "yes"


def test_seeds_hold_what_asterisk_had_not_what_the_recorder_set(shared_dir: Path) -> None:
    recorded = transcripts(shared_dir)
    assert recorded["authorize-local"].seed == {
        "GUARD_SRC_IP": "203.0.113.50",
        "CHANNEL(channeltype)": "Local",
        "CALLERID(num)": "2002",
        "UNIQUEID": "1795292175.65",
        "CHANNEL(linkedid)": "1795292175.64",
    }
    settle = recorded["settle-local"].seed
    assert settle["CDR(billsec)"] == "2" and settle["ANSWEREDTIME"] == "2"
    assert "GUARD_RESULT" not in settle  # the recorder set it in the authorize session


async def test_pipelined_commands_stall_like_asterisk() -> None:
    """Asterisk reads commands through a stdio buffer: a second pipelined line is not seen."""
    replies: list[bytes] = []

    async def pipeline(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n\n")
        writer.write(b"SET VARIABLE A 1\nSET VARIABLE B 2\nSET VARIABLE C 3\n")
        replies.append(await reader.readline())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                replies.append(await reader.readline())
        writer.write(b"NOOP\n")  # new bytes wake poll(): the buffered commands run, in order
        replies.extend([await reader.readline() for _ in range(3)])

    async with scripted_server(pipeline) as (host, port):
        record = await FakeAsterisk(host, port).play(build_environment({"uniqueid": "9.1"}))
    assert replies == [b"200 result=1\n"] * 3 + [b"200 result=0\n"]
    assert record.commands == ["SET VARIABLE A 1", "SET VARIABLE B 2", "SET VARIABLE C 3", "NOOP"]


async def test_over_long_command_is_cut_into_two_like_asterisk() -> None:
    async def long_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n\n")
        writer.write(b"VERBOSE " + b"x" * 2039 + b"SET VARIABLE GUARD_RESULT ALLOW\n")
        await reader.readline()
        writer.write(b"NOOP\n")  # the next command wakes poll(): the cut-off tail runs first
        await reader.readline()
        await reader.readline()

    async with scripted_server(long_line) as (host, port):
        record = await FakeAsterisk(host, port).play(build_environment({"uniqueid": "9.2"}))
    assert record.commands[1:] == ["SET VARIABLE GUARD_RESULT ALLOW", "NOOP"]
    assert record.variables["GUARD_RESULT"] == "ALLOW"


async def test_commands_answered_from_the_channel_store() -> None:
    script = [
        b'SET VARIABLE X "a \\"b\\""\n',
        b"GET VARIABLE X\n",
        b"GET VARIABLE Y\n",
        b'GET FULL VARIABLE "${X}|${CDR(billsec)}|${NONE}"\n',
        b"set variable lower 1\n",
        b"SET VARIABLE ONLY_NAME\n",
        b'VERBOSE "hi" 1\n',
        b'EXEC NoOp "x"\n',
        b"NOOP\n",
        b"ANSWER\n",
    ]
    answers: list[bytes] = []

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n\n")
        for command in script:
            writer.write(command)
            line = await reader.readline()
            while line.startswith(b"520-") or not line[:3].isdigit():
                line += await reader.readline()
                if line.endswith(b"520 End of proper usage.\n"):
                    break
            answers.append(line)

    async with scripted_server(ask) as (host, port):
        asterisk = FakeAsterisk(host, port)
        record = await asterisk.play(
            build_environment({"uniqueid": "9.3"}), variables={"CDR(billsec)": "7"}
        )
    assert answers == [
        b"200 result=1\n",
        b'200 result=1 (a "b")\n',
        b"200 result=0\n",
        b'200 result=1 (a "b"|7|)\n',
        b"200 result=1\n",
        b"520-Invalid command syntax.  Proper usage follows:\n"
        b"Sets a variable to the current channel.\n520 End of proper usage.\n",
        b"200 result=1\n",
        b"200 result=0\n",
        b"200 result=0\n",
        b"510 Invalid or unknown command\n",
    ]
    assert record.assignments == [("X", 'a "b"'), ("lower", "1")]
    assert asterisk.channel("9.3")["lower"] == "1"


def test_environment_helpers(shared_dir: Path) -> None:
    recorded = transcripts(shared_dir)["authorize-pjsip"].environment
    changed = replace_environment(recorded, uniqueid="42.1", linkedid="42.0")
    env = parse_environment(changed)
    assert env["agi_uniqueid"] == "42.1" and env["agi_linkedid"] == "42.0"
    assert changed.replace(b"42.1", b"1795292168.61").startswith(recorded[:-1])
    assert parse_environment(build_environment({"uniqueid": "1.2", "arg_1": ""})) == {
        "agi_uniqueid": "1.2",
        "agi_arg_1": "",
    }


@pytest.mark.parametrize(
    ("variables", "outcome"),
    [
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "120"}, (True, 120_000)),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "999999"}, (True, 999_999_000)),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "1000000"}, (False, None)),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "0"}, (False, None)),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "012"}, (False, None)),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": ""}, (False, None)),
        ({"GUARD_RESULT": "ALLOW"}, (False, None)),
        ({"GUARD_RESULT": "allow", "GUARD_MAX_SECONDS": "120"}, (False, None)),
        ({"GUARD_RESULT": "DENY", "GUARD_MAX_SECONDS": "120"}, (False, None)),
        ({}, (False, None)),
    ],
)
def test_dialplan_outcome_fails_closed(
    variables: dict[str, str], outcome: tuple[bool, int | None]
) -> None:
    assert dialplan_outcome(variables) == outcome
