"""Drive a FastAGI server without Asterisk: recorded sessions, replayed byte for byte.

:class:`FakeAsterisk` plays Asterisk's side of FastAGI against a real TCP server. It sends a
recorded environment block exactly as Asterisk sent it (``shared/asterisk/agi-sessions.jsonl``,
loaded with :func:`load_transcripts`), then answers each command the way Asterisk 16 answered
that kind of command in the recordings, from a variable store per channel (keyed by
``agi_uniqueid``) that lives on between the ``authorize`` session and the hangup-handler session
of the same channel, as a real channel does. It reads commands the way ``res_agi.c`` does
(``poll()`` on the socket, then ``fgets()`` through a stdio buffer, 2047 bytes at most), so it
also reproduces Asterisk's stall on pipelined commands and its split of an over-long line.
It can also misbehave: send an unsolicited ``HANGUP``, a partial environment, garbage, stay
silent, close midway or stop answering.

Used by the tests and the benchmark; never imported by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from guard.agi import contract
from guard.agi.protocol import split_command

#: What Asterisk replies to a command it does not know.
UNKNOWN_COMMAND = b"510 Invalid or unknown command\n"
#: Asterisk's usage text of SET VARIABLE (as recorded); other commands' texts were not recorded.
_USAGE = {"SET VARIABLE": "Sets a variable to the current channel."}
_USAGE_UNRECORDED = "Usage text not recorded."
#: ``fgets()`` into Asterisk's 2048-byte command buffer reads at most this many bytes.
_FGETS_BYTES = 2047
_READ_SIZE = 65536
_SUBSTITUTION = re.compile(r"\$\{([^{}]*)\}")
_ENV_LINE = re.compile(rb"^agi_([a-z0-9_]+): (.*)$", re.MULTILINE)
_MAX_SECONDS = re.compile(r"[1-9][0-9]{0,5}")

ASTERISK_TO_GUARD = "asterisk->guard"
GUARD_TO_ASTERISK = "guard->asterisk"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One recorded piece of a session: ``direction`` is one of the two above or ``note``."""

    direction: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Transcript:
    """One recorded FastAGI session.

    ``environment`` is the exact environment block; ``chunks`` what followed. ``seed`` holds the
    channel's own variables as the recording read them (``GET VARIABLE`` and ``GET FULL VARIABLE``
    replies), minus those the recorder itself set: :class:`FakeAsterisk` starts the channel with
    them.
    """

    name: str
    description: str
    request: str
    environment: bytes
    chunks: tuple[Chunk, ...]
    seed: Mapping[str, str]

    @property
    def uniqueid(self) -> str:
        return environment_value(self.environment, "uniqueid")


def load_transcripts(path: Path) -> dict[str, Transcript]:
    """Every session of an ``agi-sessions.jsonl`` file, by name."""
    raw: list[tuple[dict[str, str], list[Chunk]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            chunks = [Chunk(c["dir"], c["text"].encode("latin-1")) for c in record["chunks"]]
            raw.append((record, chunks))
    written = {name for _, chunks in raw for name, _ in _assignments(chunks)}
    transcripts: dict[str, Transcript] = {}
    for record, chunks in raw:
        seed = {k: v for k, v in _reads(chunks).items() if k not in written}
        transcripts[record["name"]] = Transcript(
            name=record["name"],
            description=record["description"],
            request=record["request"],
            environment=chunks[0].data,
            chunks=tuple(chunks[1:]),
            seed=seed,
        )
    return transcripts


def _exchanges(chunks: Iterable[Chunk]) -> list[tuple[list[str], str]]:
    """Recorded (command words, reply text) pairs; the unsolicited HANGUP is not a reply."""
    pairs: list[tuple[list[str], str]] = []
    command: list[str] | None = None
    for chunk in chunks:
        text = chunk.data.decode("latin-1")
        if chunk.direction == GUARD_TO_ASTERISK:
            command = split_command(text.rstrip("\n"))
        elif chunk.direction == ASTERISK_TO_GUARD and command is not None and text != "HANGUP\n":
            pairs.append((command, text.rstrip("\n")))
            command = None
    return pairs


def _assignments(chunks: Iterable[Chunk]) -> list[tuple[str, str]]:
    return [
        (words[2], words[3])
        for words, _ in _exchanges(chunks)
        if len(words) == 4 and _verb(words) == "SET VARIABLE"
    ]


def _reads(chunks: Iterable[Chunk]) -> dict[str, str]:
    values: dict[str, str] = {}
    for words, reply in _exchanges(chunks):
        found = re.fullmatch(r"200 result=1 \((.*)\)", reply)
        if found is None:
            continue
        if _verb(words) == "GET VARIABLE" and len(words) == 3:
            values[words[2]] = found[1]
        elif _verb(words) == "GET FULL VARIABLE" and len(words) == 4:
            names = words[3].split("|")
            data = found[1].split("|")
            if len(names) == len(data) and all(_SUBSTITUTION.fullmatch(n) for n in names):
                values.update((n[2:-1], d) for n, d in zip(names, data, strict=True))
    return values


def _verb(words: list[str]) -> str:
    upper = [word.upper() for word in words[:3]]
    for verb in ("GET FULL VARIABLE", "GET VARIABLE", "SET VARIABLE", "VERBOSE", "EXEC", "NOOP"):
        if upper[: verb.count(" ") + 1] == verb.split(" "):
            return verb
    return ""


def environment_value(environment: bytes, name: str) -> str:
    """The value of ``agi_<name>`` in an environment block, or ``""``."""
    for match in _ENV_LINE.finditer(environment):
        if match[1] == name.encode("ascii"):
            return match[2].decode("utf-8", errors="replace")
    return ""


def build_environment(values: Mapping[str, str]) -> bytes:
    """An environment block from ``{"network_script": "authorize?…", …}`` (``agi_`` added)."""
    lines = "".join(f"agi_{name}: {value}\n" for name, value in values.items())
    return f"{lines}\n".encode()


def replace_environment(environment: bytes, **values: str) -> bytes:
    """``environment`` with the given ``agi_<name>`` values replaced (or appended before the end).

    Every other byte stays as recorded, e.g. ``replace_environment(env, uniqueid="1.2")`` gives
    a new channel with a recorded session's environment.
    """
    pending = dict(values)

    def swap(match: re.Match[bytes]) -> bytes:
        name = match[1].decode("ascii")
        if name not in pending:
            return match[0]
        return b"agi_" + match[1] + b": " + pending.pop(name).encode()

    replaced = _ENV_LINE.sub(swap, environment.removesuffix(b"\n"))
    extra = "".join(f"agi_{name}: {value}\n" for name, value in pending.items())
    return replaced + extra.encode() + b"\n"


def dialplan_outcome(variables: Mapping[str, str]) -> tuple[bool, int | None]:
    """What the shipped dialplan does with a channel after ``authorize``: ``(dials, limit_ms)``.

    The call goes out only when ``GUARD_RESULT`` is exactly ``ALLOW`` and ``GUARD_MAX_SECONDS`` a
    positive integer of at most six digits (``REGEX("^[1-9][0-9]{0,5}$")``), dialed with
    ``L(<max>000)``; anything else, including nothing set at all, refuses.
    """
    max_seconds = variables.get(contract.MAX_SECONDS, "")
    if variables.get(contract.RESULT) != "ALLOW" or not _MAX_SECONDS.fullmatch(max_seconds):
        return False, None
    return True, int(max_seconds) * 1000


@dataclass
class SessionRecord:
    """What one played session saw.

    ``commands``: the command lines received, in order (as Asterisk split them into commands).
    ``assignments``: the ``SET VARIABLE`` name/value pairs applied, in order. ``variables``: the
    channel's variables after the session. ``closed_by_server``: the server ended the session
    (Asterisk's ``AGISTATUS=SUCCESS``). ``timed_out``: the play's own time limit ended it.
    ``started``/``ended``: ``time.perf_counter()`` when the environment's first byte was written
    and when the server's close was seen (0 if it was not), for latency measurements.
    """

    uniqueid: str
    commands: list[str] = field(default_factory=list)
    assignments: list[tuple[str, str]] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    closed_by_server: bool = False
    timed_out: bool = False
    started: float = 0.0
    ended: float = 0.0


class FakeAsterisk:
    """Asterisk's side of FastAGI sessions against the server at ``host:port``.

    ``transcripts`` lets :meth:`play` take a session by name. :attr:`channels` maps each
    ``agi_uniqueid`` to that channel's variables; it persists across sessions of this instance.
    """

    def __init__(
        self, host: str, port: int, transcripts: Mapping[str, Transcript] | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.transcripts = dict(transcripts or {})
        self.channels: dict[str, dict[str, str]] = {}

    def channel(self, uniqueid: str) -> dict[str, str]:
        """The variables of channel ``uniqueid`` (created empty on first use)."""
        return self.channels.setdefault(uniqueid, {})

    async def play(
        self,
        session: str | Transcript | bytes,
        *,
        variables: Mapping[str, str] | None = None,
        hangup_after: int | None = None,
        close_after: int | None = None,
        mute_after: int | None = None,
        send_bytes: int | None = None,
        hold: bool = False,
        reply_delay: float = 0.0,
        time_limit: float = 10.0,
    ) -> SessionRecord:
        """Run one session: connect, send the environment, answer commands until the server closes.

        ``session``: a transcript (or its name) whose environment and seed variables are used, or
        raw environment bytes. ``variables`` are set on the channel first. ``hangup_after=n``
        writes the unsolicited ``HANGUP`` line after the n-th reply (0: right after the
        environment). ``close_after=n`` closes the connection after the n-th reply;
        ``mute_after=n`` still executes later commands but never answers them. ``send_bytes``
        sends only that many bytes of the environment, then closes, or with ``hold`` stays
        connected and silent until the server closes. ``reply_delay`` seconds pass before each
        reply (a busy Asterisk). ``time_limit`` bounds the whole session.
        """
        environment, seed = self._resolve(session)
        record = SessionRecord(uniqueid=environment_value(environment, "uniqueid"))
        store = self.channel(record.uniqueid)
        store.update(seed)
        store.update(variables or {})
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            async with asyncio.timeout(time_limit):
                if send_bytes is not None:
                    writer.write(environment[:send_bytes])
                    await writer.drain()
                    if hold:
                        await reader.read()
                        record.closed_by_server = True
                else:
                    record.started = time.perf_counter()
                    writer.write(environment)
                    await writer.drain()
                    options = _Options(hangup_after, close_after, mute_after, reply_delay)
                    record.closed_by_server = await self._answer(
                        reader, writer, store, record, options
                    )
                    if record.closed_by_server:
                        record.ended = time.perf_counter()
        except TimeoutError:
            record.timed_out = True
        except ConnectionError:
            record.closed_by_server = True
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        record.variables = dict(store)
        return record

    def _resolve(self, session: str | Transcript | bytes) -> tuple[bytes, Mapping[str, str]]:
        if isinstance(session, bytes):
            return session, {}
        if isinstance(session, str):
            if session not in self.transcripts:
                raise KeyError(f"no recorded session named {session!r}")
            session = self.transcripts[session]
        return session.environment, session.seed

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        store: dict[str, str],
        record: SessionRecord,
        options: _Options,
    ) -> bool:
        """The ``run_agi()`` loop; true when the server closed the session."""
        socket_bytes = b""  # arrived, not yet read by stdio: what poll() sees
        stdio_bytes = b""  # already read() into the FILE buffer: invisible to poll()
        eof = False
        answered = 0
        if options.hangup_after == 0:
            writer.write(b"HANGUP\n")
        if options.close_after == 0:
            return False
        while True:
            if not socket_bytes and not eof:  # poll(): only bytes stdio has not read wake it
                socket_bytes = await reader.read(_READ_SIZE)
                eof = not socket_bytes
            # fgets(): serves its buffer first, read()s the socket only for an incomplete line
            while b"\n" not in stdio_bytes[:_FGETS_BYTES] and len(stdio_bytes) < _FGETS_BYTES:
                if socket_bytes:
                    stdio_bytes, socket_bytes = stdio_bytes + socket_bytes, b""
                elif eof:
                    break  # fgets() returns the partial line, and Asterisk runs it
                else:
                    socket_bytes = await reader.read(_READ_SIZE)
                    eof = not socket_bytes
            if not stdio_bytes:
                return True  # EOF with nothing buffered: the AGI script has finished
            newline = stdio_bytes.find(b"\n", 0, _FGETS_BYTES)
            cut = newline + 1 if newline >= 0 else min(len(stdio_bytes), _FGETS_BYTES)
            line, stdio_bytes = stdio_bytes[:cut], stdio_bytes[cut:]
            reply = self._execute(line.removesuffix(b"\n"), store, record)
            if options.mute_after is not None and answered >= options.mute_after:
                continue
            if options.reply_delay:
                await asyncio.sleep(options.reply_delay)
            writer.write(reply)
            answered += 1
            if options.hangup_after == answered:
                writer.write(b"HANGUP\n")
            await writer.drain()
            if options.close_after == answered:
                return False

    def _execute(self, line: bytes, store: dict[str, str], record: SessionRecord) -> bytes:
        text = line.decode("utf-8", errors="replace")
        record.commands.append(text)
        words = split_command(text)
        verb = _verb(words)
        argc = len(words)
        if verb == "SET VARIABLE":
            if argc != 4:
                return _usage(verb)
            store[words[2]] = words[3]
            record.assignments.append((words[2], words[3]))
            return b"200 result=1\n"
        if verb == "GET VARIABLE":
            if argc != 3:
                return _usage(verb)
            if words[2] not in store:
                return b"200 result=0\n"
            return f"200 result=1 ({store[words[2]]})\n".encode()
        if verb == "GET FULL VARIABLE":
            if argc != 4:
                return _usage(verb)
            value = _SUBSTITUTION.sub(lambda m: store.get(m[1], ""), words[3])
            return f"200 result=1 ({value})\n".encode()
        if verb == "VERBOSE":
            return _usage(verb) if argc < 2 else b"200 result=1\n"
        if verb == "EXEC":
            return _usage(verb) if argc < 2 else b"200 result=0\n"
        if verb == "NOOP":
            return b"200 result=0\n"
        return UNKNOWN_COMMAND


@dataclass(frozen=True, slots=True)
class _Options:
    hangup_after: int | None
    close_after: int | None
    mute_after: int | None
    reply_delay: float = 0.0


def _usage(verb: str) -> bytes:
    text = _USAGE.get(verb, _USAGE_UNRECORDED)
    return (
        f"520-Invalid command syntax.  Proper usage follows:\n{text}\n520 End of proper usage.\n"
    ).encode()
