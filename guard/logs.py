"""One logger setup, and the escaping that makes log lines safe to parse (fail2ban, grep, SIEM).

Values from the network (User-Agent, caller ID, dialed digits, channel names) are attacker
controlled. In ``text`` format a line is ``<time> <level> <logger> <message> key=value …``; every
value that is not a plain token is double-quoted with backslash escapes, and every control or
line-breaking character (``\\n``, ``\\r``, NEL, U+2028 …) and every ``=`` inside a quoted value is
written as an escape, so one event is always exactly one line and no value can forge a ``src=``
field or a second event, even for a pattern that is not anchored. In ``json``
format each line is one JSON object (``ensure_ascii``), which is safe by construction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

#: Characters allowed unquoted in a ``key=value`` value.
_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+\-]{1,200}")
_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_VALUE_CHARS = 512

#: Attribute name under which structured fields travel on a LogRecord (``extra={FIELDS: …}``).
FIELDS = "guard_fields"


def escape_value(value: object) -> str:
    """Render one value for a ``key=value`` line: a plain token, or a quoted escaped string."""
    text = "" if value is None else str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "…"
    if _PLAIN.fullmatch(text):
        return text
    out = ['"']
    for char in text:
        code = ord(char)
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "=":
            out.append("\\x3d")
        elif code < 0x20 or code == 0x7F or 0x80 <= code <= 0x9F:
            out.append(f"\\x{code:02x}")
        elif code in (0x2028, 0x2029) or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def format_fields(fields: Mapping[str, object]) -> str:
    """``key=value`` pairs in the given order; keys are validated, values escaped."""
    parts = []
    for key, value in fields.items():
        if not _KEY.fullmatch(key):
            raise ValueError(f"invalid log field name {key!r}")
        parts.append(f"{key}={escape_value(value)}")
    return " ".join(parts)


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, FIELDS, None)
    return dict(fields) if isinstance(fields, Mapping) else {}


class TextFormatter(logging.Formatter):
    """``2026-11-21T20:15:40.208Z INFO guard.engine decision key=value …`` — one line a record."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        millis = int(record.msecs)
        message = escape_value(record.getMessage())
        if message.startswith('"'):
            message = f"msg={message}"
        line = f"{stamp}.{millis:03d}Z {record.levelname} {record.name} {message}"
        fields = _record_fields(record)
        if fields:
            line += " " + format_fields(fields)
        if record.exc_info:
            line += " exc=" + escape_value(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line, ASCII only."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(_record_fields(record))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=True, default=str, separators=(",", ":"))


def _stderr_handler(fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    """Configure the root logger once: one handler on stderr with the chosen formatter."""
    root = logging.getLogger()
    root.handlers[:] = [_stderr_handler(fmt)]
    root.setLevel(level.upper())


@contextlib.contextmanager
def logging_to_stderr(fmt: str = "text", level: str = "info") -> Iterator[None]:
    """``setup_logging`` for the span of a ``with`` block, then the previous handlers and level:
    for an admin command that writes a line or two of the servers' log (``guard ip block``)."""
    root = logging.getLogger()
    handlers, old_level = root.handlers[:], root.level
    handler = _stderr_handler(fmt)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    try:
        yield
    finally:
        handler.flush()
        root.handlers[:] = handlers
        root.setLevel(old_level)


def log_fields(**fields: object) -> dict[str, Any]:
    """``extra=`` argument carrying structured fields: ``log.info("x", extra=log_fields(a=1))``."""
    return {FIELDS: fields}
