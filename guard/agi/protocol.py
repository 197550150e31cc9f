"""The FastAGI wire format, as Asterisk 16 speaks it (see ``shared/asterisk/agi-sessions.jsonl``).

Pure functions and small parsers over bytes and strings, no I/O: the environment block
(``agi_<name>: <value>`` lines ending with an empty line), the request target
(``agi_network_script``: route path and query), command replies (``200 result=…``, ``510``,
multi-line ``520-…``), and commands built so that Asterisk's own argument parser
(``parse_args()`` in ``res_agi.c``, mirrored by :func:`split_command`) reads back exactly the value
given. Everything here is bounded and never trusts its input: a malformed input raises
:class:`AGIProtocolError`, and no value can ever turn into a second command line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import unquote

from guard.errors import GuardError

#: Asterisk reads a command with ``fgets()`` into ``char buf[AGI_BUF_LEN]`` (2048 bytes): a longer
#: line is cut there and its tail is run as a separate command. No command line (newline
#: included) may therefore be longer than this.
MAX_COMMAND_BYTES = 2047
#: The line Asterisk writes, unsolicited, when the channel hangs up during a session.
HANGUP_LINE = "HANGUP"
#: More fields than this in a request's query is not a request from our dialplan.
MAX_QUERY_FIELDS = 64
#: A multi-line (``520-``) reply longer than this is not from Asterisk.
MAX_REPLY_LINES = 64

_ENV_NAME = re.compile(rb"agi_[a-z0-9_]+")
#: A whole well-formed environment block: ``agi_<name>: <value>`` lines without NUL, then the
#: empty line. Checked in one call, it spares the common case the line-by-line parse.
_WELL_FORMED_BLOCK = re.compile(rb"(?:agi_[a-z0-9_]+: [^\x00\n]*\n)*\n")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\([A-Za-z0-9_,.:\-]*\))?")
_REPLY_LINE = re.compile(r"(\d{3})([ -])(.*)")
_REPLY_200 = re.compile(r"200 result=(-?\d+)(?: \((.*)\))?(?: endpos=(-?\d+))?")
#: Characters that must never reach Asterisk inside a value: line breaks end a command, NUL ends
#: a C string. Each becomes a space.
_UNSAFE = str.maketrans({"\r": " ", "\n": " ", "\0": " "})


class AGIProtocolError(GuardError):
    """Bytes that do not follow the FastAGI protocol, or a command that cannot be sent safely."""


# ---- the environment block -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvironmentLimits:
    """Bounds on one environment block. Asterisk sends about 25 short lines."""

    max_line_bytes: int = 4096
    max_lines: int = 128
    max_bytes: int = 64 * 1024


class EnvironmentParser:
    """Reads an environment block one line at a time.

    A malformed line (no ``": "``, a name that is not ``agi_<lowercase>``, a NUL byte, a duplicate
    name, a line over ``max_line_bytes``) is remembered and the block is still read to its empty
    line, so that the session stays in step with Asterisk and can answer with a refusal:
    :meth:`result` raises it. Exceeding ``max_lines`` or ``max_bytes`` raises from :meth:`feed`
    at once, since the peer is then not worth answering. Values are decoded as UTF-8 with
    replacement characters: a Latin-1 caller name must not refuse a call.
    """

    def __init__(self, limits: EnvironmentLimits | None = None) -> None:
        self._limits = limits or EnvironmentLimits()
        self._values: dict[str, str] = {}
        self._lines = 0
        self._bytes = 0
        self._error: AGIProtocolError | None = None
        self.complete = False

    @property
    def received(self) -> int:
        """Bytes fed so far."""
        return self._bytes

    def feed(self, data: bytes) -> bool:
        """Take one or more whole lines, newlines included; true once the empty line ended the
        block (which must then be the last line of ``data``)."""
        if self.complete:
            raise AGIProtocolError("data after the end of the environment")
        if not self._bytes and self._whole_block(data):
            return True
        lines = data.split(b"\n")
        tail = lines.pop()  # what follows the last newline: b"" for whole lines
        limits = self._limits
        for index, line in enumerate(lines):
            self._bytes += len(line) + 1
            if self._bytes > limits.max_bytes:
                raise AGIProtocolError(f"environment longer than {limits.max_bytes} bytes")
            if not line:
                self.complete = True
                if index + 1 < len(lines) or tail:
                    raise AGIProtocolError("data after the end of the environment")
                return True
            self._lines += 1
            if self._lines > limits.max_lines:
                raise AGIProtocolError(f"environment longer than {limits.max_lines} lines")
            if self._error is None:
                self._error = self._parse(line)
        if tail:
            self._bytes += len(tail)
            if self._bytes > limits.max_bytes:
                raise AGIProtocolError(f"environment longer than {limits.max_bytes} bytes")
            raise AGIProtocolError("environment ended inside a line")
        return False

    def _whole_block(self, data: bytes) -> bool:
        """Take ``data`` if it is a whole well-formed block within every limit (what Asterisk
        sends), in a few calls; false leaves the parser untouched for the line-by-line path,
        which also names what is wrong."""
        limits = self._limits
        if len(data) > limits.max_bytes or not _WELL_FORMED_BLOCK.fullmatch(data):
            return False
        lines = data[:-2].split(b"\n") if len(data) > 1 else []
        if (
            len(lines) > limits.max_lines
            or max(map(len, lines), default=0) >= limits.max_line_bytes
        ):
            return False
        pairs = [line.split(b": ", 1) for line in lines]
        values = {name.decode("ascii"): value.decode("utf-8", "replace") for name, value in pairs}
        if len(values) != len(pairs):  # a repeated name
            return False
        self._values, self._lines, self._bytes = values, len(lines), len(data)
        self.complete = True
        return True

    def result(self) -> dict[str, str]:
        """The environment as ``{name: value}``; raises the first malformed line's error."""
        if not self.complete:
            raise AGIProtocolError("environment incomplete")
        if self._error is not None:
            raise self._error
        return dict(self._values)

    def _parse(self, line: bytes) -> AGIProtocolError | None:
        """Store one line (without its newline); runs for every line of every call, so the error
        texts are only built for a bad line."""
        if len(line) >= self._limits.max_line_bytes:  # its newline makes it one byte longer
            return self._bad(f"longer than {self._limits.max_line_bytes} bytes")
        name, sep, raw = line.partition(b": ")
        if not sep:
            return self._bad("has no ': ' separator")
        if not _ENV_NAME.fullmatch(name):
            return self._bad("has an invalid name")
        if b"\0" in raw:
            return self._bad("contains a NUL byte")
        key = name.decode("ascii")
        if key in self._values:
            return self._bad(f"repeats {key}")
        self._values[key] = raw.decode("utf-8", errors="replace")
        return None

    def _bad(self, what: str) -> AGIProtocolError:
        return AGIProtocolError(f"environment line {self._lines} {what}")


def parse_environment(block: bytes, limits: EnvironmentLimits | None = None) -> dict[str, str]:
    """Parse a whole environment block (empty line included, nothing after it)."""
    parser = EnvironmentParser(limits)
    parser.feed(block)
    return parser.result()


def agi_arguments(env: Mapping[str, str]) -> tuple[str, ...]:
    """``agi_arg_1``, ``agi_arg_2``, … in order: positional, split by quotes, never trusted."""
    args: list[str] = []
    while (value := env.get(f"agi_arg_{len(args) + 1}")) is not None:
        args.append(value)
    return tuple(args)


# ---- the request target ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestTarget:
    """``authorize?tenant=acme&ext=1001`` as ``path="authorize"`` and its decoded query."""

    path: str
    query: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def parse_request_target(script: str) -> RequestTarget:
    """Split ``agi_network_script`` into the route path and the percent-decoded query.

    The request must be ASCII: the dialplan contract sends every untrusted value through
    ``${URIENCODE()}``, whose output is. A repeated key keeps its first value, so the dialplan puts
    the trusted keys (``tenant``, ``ext``) first. ``+`` stays a plus sign (``URIENCODE`` writes a
    space as ``%20``, and a dialed ``+44…`` must survive), unlike HTML form decoding.
    """
    if not script.isascii():
        raise AGIProtocolError("request is not ASCII (untrusted values must be URI-encoded)")
    path, _, query_string = script.partition("?")
    # What parse_qs(keep_blank_values=True, errors="replace") does, less its "+" decoding, in a
    # third of its time (it runs on every call): only percent-encoded parts are unquoted.
    fields = query_string.split("&")
    if len(fields) > MAX_QUERY_FIELDS:
        raise AGIProtocolError(f"request query has more than {MAX_QUERY_FIELDS} fields")
    query: dict[str, str] = {}
    for item in fields:
        if not item:
            continue
        name, _, value = item.partition("=")
        if "%" in name:
            name = unquote(name, errors="replace")
        if name not in query:
            query[name] = unquote(value, errors="replace") if "%" in value else value
    return RequestTarget(path.strip("/"), MappingProxyType(query))


# ---- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AGIReply:
    """One reply: ``code`` 200 with ``result`` (and optional ``data``/``endpos``), or an error.

    ``text`` is everything after the code; for a multi-line reply its lines joined by ``\\n``.
    """

    code: int
    result: int | None = None
    data: str | None = None
    endpos: int | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 200


class ReplyParser:
    """Assembles one reply from its lines (a ``NNN-`` reply ends at its ``NNN `` line).

    The unsolicited ``HANGUP`` line is not a reply: the caller skips it between replies
    (:attr:`in_progress` is false there).
    """

    def __init__(self) -> None:
        self._code: int | None = None
        self._lines: list[str] = []

    @property
    def in_progress(self) -> bool:
        return self._code is not None

    def feed(self, line: str) -> AGIReply | None:
        """Take one line without its newline; the reply once complete."""
        if self._code is not None:
            return self._continue(self._code, line)
        match = _REPLY_LINE.fullmatch(line)
        if match is None:
            raise AGIProtocolError("unexpected line where a command reply was expected")
        code, sep, rest = int(match[1]), match[2], match[3]
        if sep == "-":
            self._code, self._lines = code, [rest]
            return None
        if code != 200:
            return AGIReply(code, text=rest)
        ok = _REPLY_200.fullmatch(line)
        if ok is None:
            raise AGIProtocolError("malformed 200 reply")
        endpos = None if ok[3] is None else int(ok[3])
        return AGIReply(200, result=int(ok[1]), data=ok[2], endpos=endpos, text=rest)

    def _continue(self, code: int, line: str) -> AGIReply | None:
        if line.startswith(f"{code} "):
            self._lines.append(line[4:])
            reply = AGIReply(code, text="\n".join(self._lines))
            self._code, self._lines = None, []
            return reply
        self._lines.append(line)
        if len(self._lines) > MAX_REPLY_LINES:
            raise AGIProtocolError(f"multi-line reply longer than {MAX_REPLY_LINES} lines")
        return None


# ---- commands --------------------------------------------------------------------------------


def quote(value: str) -> str:
    """One command argument, double-quoted so that Asterisk reads back ``value`` exactly.

    CR, LF and NUL become spaces (they would end the command line or the C string); backslashes
    and double quotes are escaped the way ``parse_args()`` unescapes them.
    """
    safe = value.translate(_UNSAFE).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{safe}"'


def split_command(line: str) -> list[str]:
    """The words of a command line exactly as Asterisk's ``parse_args()`` splits them.

    Spaces and tabs separate words outside double quotes; a double quote toggles quoting (and
    starts a word after whitespace); a backslash makes the next character literal and is dropped.
    At most 127 words are kept, as in Asterisk (``MAX_ARGS`` 128).
    """
    words: list[str] = []
    current: list[str] | None = None
    quoted = escaped = False
    for char in line:
        if char == '"' and not escaped:
            quoted = not quoted
            if quoted and current is None:
                current = []
                words.append("")
            continue
        if char in " \t" and not quoted and not escaped:
            if current is not None:
                words[-1] = "".join(current)
                current = None
            continue
        if char == "\\" and not escaped:
            escaped = True
            continue
        if current is None:
            if len(words) >= 127:
                continue
            current = []
            words.append("")
        current.append(char)
        escaped = False
    if current is not None:
        words[-1] = "".join(current)
    return words


def _variable_name(name: str) -> str:
    if not _VARIABLE_NAME.fullmatch(name):
        raise AGIProtocolError(f"invalid channel variable name {name!r}")
    return name


def set_variable(name: str, value: str | int) -> str:
    """``SET VARIABLE NAME "value"``; the name must be a plain variable or ``FUNC(args)``."""
    return f"SET VARIABLE {_variable_name(name)} {quote(str(value))}"


def get_variable(name: str) -> str:
    """``GET VARIABLE NAME``: Asterisk answers ``200 result=1 (value)`` or ``200 result=0``."""
    return f"GET VARIABLE {_variable_name(name)}"


def get_full_variable(expression: str) -> str:
    """``GET FULL VARIABLE "expr"``: Asterisk substitutes ``${…}`` in ``expr``.

    Asterisk evaluates the expression, so it must be a constant of the code, never built from
    untrusted input.
    """
    return f"GET FULL VARIABLE {quote(expression)}"


def verbose(message: str, level: int = 1) -> str:
    """``VERBOSE "message" level``: a line in Asterisk's console and log."""
    return f"VERBOSE {quote(message)} {int(level)}"


def encode_command(command: str) -> bytes:
    """The bytes of one command line; refuses anything Asterisk would not read as one command."""
    if any(char in command for char in "\r\n\0"):
        raise AGIProtocolError("command contains a line break or NUL")
    data = command.encode("utf-8", errors="replace") + b"\n"
    if len(data) > MAX_COMMAND_BYTES:
        raise AGIProtocolError(f"command longer than {MAX_COMMAND_BYTES} bytes")
    return data
