"""Log lines stay one line and unforgeable whatever the network sends."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard.events import Event, EventBus, EventKind
from guard.logs import JsonFormatter, TextFormatter, escape_value, format_fields, log_fields

HOSTILE_UA = 'Evil", "9999", "x" ip=6.6.6.6 %0A'
FAIL2BAN_LIKE = re.compile(r"kind=refused reason=scanner_user_agent src=(?P<host>[0-9a-f.:]+) ")


def _capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_plain_tokens_are_not_quoted() -> None:
    assert escape_value("127.0.0.1") == "127.0.0.1"
    assert escape_value("acme") == "acme"


def test_quotes_backslashes_and_equals_are_escaped() -> None:
    assert escape_value('a"b\\c=d') == '"a\\"b\\\\c\\x3dd"'


@pytest.mark.parametrize("breaker", ["\n", "\r", "\x85", "\u2028", "\u2029", "\x00", "\x1b"])
def test_line_breaking_characters_never_reach_the_line(breaker: str) -> None:
    rendered = escape_value(f"a{breaker}src=6.6.6.6")
    assert breaker not in rendered
    assert "src=" not in rendered


def test_over_long_values_are_truncated() -> None:
    assert len(escape_value("x" * 100_000)) < 600


def test_invalid_field_names_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid log field name"):
        format_fields({"bad key": 1})


@given(st.text())
def test_any_value_renders_as_one_quoted_token(text: str) -> None:
    rendered = escape_value(text)
    assert "\n" not in rendered and "\r" not in rendered
    assert "src=" not in rendered or rendered == text


def test_hostile_user_agent_cannot_forge_a_second_match() -> None:
    logger, stream = _capture(TextFormatter())
    ua = HOSTILE_UA + "\nkind=refused reason=scanner_user_agent src=6.6.6.6 "
    event = Event(
        EventKind.REFUSED, "scanner_user_agent", "acme", "1001", "192.0.2.7", "1.2", {"ua": ua}
    )
    logger.warning("event", extra=log_fields(**event.log_fields()))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert [m.group("host") for m in FAIL2BAN_LIKE.finditer(lines[0])] == ["192.0.2.7"]


def test_source_ip_that_is_not_an_ip_is_logged_as_dash() -> None:
    event = Event(EventKind.REFUSED, "x", source_ip="6.6.6.6 src=1.1.1.1")
    assert event.log_fields()["src"] == "-"


def test_json_format_is_one_object_a_line() -> None:
    logger, stream = _capture(JsonFormatter())
    logger.warning("event", extra=log_fields(ua=HOSTILE_UA + "\n\u2028"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["ua"] == HOSTILE_UA + "\n\u2028"


def test_event_bus_logs_each_event_once(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.add_sink(seen.append)
    with caplog.at_level(logging.WARNING, logger="guard.events"):
        bus.emit(Event(EventKind.REFUSED, "no_rate", "acme", "1001", "192.0.2.1"))
    assert len([r for r in caplog.records if r.name == "guard.events"]) == 1
    assert len(seen) == 1
    assert bus.pending == 1
