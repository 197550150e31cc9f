"""The FastAGI wire format: recorded environments, requests, replies and command quoting."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

import pytest
from agi_support import HOSTILE_UA, transcripts
from hypothesis import given
from hypothesis import strategies as st

from guard.agi.protocol import (
    MAX_COMMAND_BYTES,
    AGIProtocolError,
    AGIReply,
    EnvironmentLimits,
    EnvironmentParser,
    ReplyParser,
    agi_arguments,
    encode_command,
    get_full_variable,
    parse_environment,
    parse_request_target,
    quote,
    set_variable,
    split_command,
    verbose,
)

ENV = b"agi_network: yes\nagi_network_script: authorize?tenant=acme\nagi_uniqueid: 1.1\n"


# ---- environment ---------------------------------------------------------------------------


def test_every_recorded_environment_parses(shared_dir: Path) -> None:
    for transcript in transcripts(shared_dir).values():
        env = parse_environment(transcript.environment)
        assert env["agi_network_script"] == transcript.request
        assert env["agi_uniqueid"] == transcript.uniqueid
        assert env["agi_version"] == "16.0.1"
        assert env["agi_accountcode"] == ""  # "agi_accountcode: " is an empty value


def test_hostile_user_agent_is_split_in_the_arguments_but_whole_in_the_query(
    shared_dir: Path,
) -> None:
    env = parse_environment(transcripts(shared_dir)["authorize-hostile-ua"].environment)
    assert agi_arguments(env) == (
        "00441234568",
        "127.0.0.9",
        "Evil",
        " 9999",
        " x ip=6.6.6.6 %0A",
    )
    target = parse_request_target(env["agi_network_script"])
    assert target.path == "authorize"
    assert dict(target.query) == {
        "tenant": "acme",
        "ext": "1001",
        "ua": HOSTILE_UA,
        "ip": "127.0.0.9",
    }


def test_environment_without_arguments_has_none(shared_dir: Path) -> None:
    env = parse_environment(transcripts(shared_dir)["hangup-during-agi"].environment)
    assert agi_arguments(env) == ()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"agi_channel SIP/1001\n", "no ': ' separator"),
        (b"agi_channel:SIP/1001\n", "no ': ' separator"),
        (b"channel: SIP/1001\n", "invalid name"),
        (b"agi_Channel: SIP/1001\n", "invalid name"),
        (b"agi_channel: SIP/\x001001\n", "NUL byte"),
        (b"agi_uniqueid: 2.2\n", "repeats agi_uniqueid"),
        (b"agi_arg_1: " + b"x" * 5000 + b"\n", "longer than 4096 bytes"),
    ],
)
def test_malformed_line_is_reported_after_the_block_is_read(line: bytes, error: str) -> None:
    parser = EnvironmentParser()
    for part in (ENV + line + b"agi_language: en\n\n").splitlines(keepends=True):
        done = parser.feed(part)
    assert done and parser.complete  # read to its end: the session can still refuse
    with pytest.raises(AGIProtocolError, match=error):
        parser.result()


def test_too_many_lines_stop_the_parser_at_once() -> None:
    parser = EnvironmentParser(EnvironmentLimits(max_lines=3))
    for line in ENV.splitlines(keepends=True):
        parser.feed(line)
    with pytest.raises(AGIProtocolError, match="longer than 3 lines"):
        parser.feed(b"agi_language: en\n")


def test_too_many_bytes_stop_the_parser_at_once() -> None:
    parser = EnvironmentParser(EnvironmentLimits(max_bytes=100))
    with pytest.raises(AGIProtocolError, match="longer than 100 bytes"):
        for index in range(10):
            parser.feed(f"agi_arg_{index + 1}: {'x' * 20}\n".encode())


@pytest.mark.parametrize(
    ("block", "error"),
    [
        (ENV, "incomplete"),
        (ENV + b"agi_language: en", "inside a line"),
        (ENV + b"\nGET VARIABLE X\n", "after the end"),
    ],
)
def test_block_must_end_with_one_empty_line(block: bytes, error: str) -> None:
    with pytest.raises(AGIProtocolError, match=error):
        parse_environment(block)


def test_non_utf8_value_is_decoded_with_replacement_characters() -> None:
    env = parse_environment(ENV + b"agi_calleridname: Jos\xe9 \xff\xfe\n\n")
    assert env["agi_calleridname"] == "Jos\ufffd \ufffd\ufffd"


# ---- request target ------------------------------------------------------------------------


def test_request_target_of_every_recorded_authorize(shared_dir: Path) -> None:
    uas = {
        "authorize-chan_sip": "Yealink SIP-T46S 66.86.0.15",
        "authorize-pjsip": "Grandstream GXP2170 1.0.11.3",
        "authorize-local": "Linksys/SPA942",
        "authorize-hostile-ua": HOSTILE_UA,
    }
    for name, ua in uas.items():
        target = parse_request_target(transcripts(shared_dir)[name].request)
        assert (target.path, target.query["tenant"], target.query["ua"]) == (
            "authorize",
            "acme",
            ua,
        )


def test_request_target_rules() -> None:
    target = parse_request_target("/guard/settle/?to=+4420%2B1&a=&b=1&b=2&tenant=x&tenant=y")
    assert target.path == "guard/settle"
    assert dict(target.query) == {"to": "+4420+1", "a": "", "b": "1", "tenant": "x"}
    assert parse_request_target("hangup").query == {}


@given(
    st.lists(
        st.tuples(
            st.text(alphabet="ab=+%2F0Ez&", max_size=6), st.text(alphabet="ab=+%2F0Ez", max_size=8)
        ),
        max_size=70,
    ).map(lambda pairs: "&".join(f"{name}={value}" for name, value in pairs))
)
def test_the_query_reads_as_parse_qs_reads_it_but_keeps_plus_signs(query: str) -> None:
    """The hand-split query against the standard library's reading of the same text."""
    try:
        expected = parse_qs(
            query.replace("+", "%2B"), keep_blank_values=True, errors="replace", max_num_fields=64
        )
    except ValueError:
        with pytest.raises(AGIProtocolError, match="more than 64 fields"):
            parse_request_target(f"authorize?{query}")
        return
    got = parse_request_target(f"authorize?{query}").query
    assert dict(got) == {name: values[0] for name, values in expected.items()}


def test_percent_decoded_garbage_is_replaced_not_fatal() -> None:
    assert parse_request_target("authorize?ua=%FF%0A").query["ua"] == "\ufffd\n"


def test_non_ascii_request_is_refused() -> None:
    with pytest.raises(AGIProtocolError, match="not ASCII"):
        parse_request_target("authorize?ua=\ufffd")


def test_too_many_query_fields_are_refused() -> None:
    with pytest.raises(AGIProtocolError, match="more than 64 fields"):
        parse_request_target("authorize?" + "&".join(f"k{i}=v" for i in range(100)))


# ---- replies -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("200 result=1", AGIReply(200, 1, None, None, "result=1")),
        ("200 result=0", AGIReply(200, 0, None, None, "result=0")),
        ("200 result=-1", AGIReply(200, -1, None, None, "result=-1")),
        ("200 result=1 (127.0.0.7)", AGIReply(200, 1, "127.0.0.7", None, "result=1 (127.0.0.7)")),
        ("200 result=1 ()", AGIReply(200, 1, "", None, "result=1 ()")),
        ("200 result=1 (a (b) c)", AGIReply(200, 1, "a (b) c", None, "result=1 (a (b) c)")),
        (
            "200 result=0 (timeout) endpos=8000",
            AGIReply(200, 0, "timeout", 8000, "result=0 (timeout) endpos=8000"),
        ),
        ("510 Invalid or unknown command", AGIReply(510, text="Invalid or unknown command")),
        (
            "511 Command Not Permitted on a dead channel or intercept routine",
            AGIReply(511, text="Command Not Permitted on a dead channel or intercept routine"),
        ),
    ],
)
def test_single_line_replies(line: str, reply: AGIReply) -> None:
    assert ReplyParser().feed(line) == reply


def test_recorded_usage_reply_spans_lines(shared_dir: Path) -> None:
    chunks = transcripts(shared_dir)["authorize-chan_sip"].chunks
    recorded = next(c.data for c in chunks if c.data.startswith(b"520-"))
    parser = ReplyParser()
    replies = [parser.feed(line) for line in recorded.decode().splitlines()]
    assert replies[:-1] == [None, None]
    assert replies[-1] == AGIReply(
        520,
        text="Invalid command syntax.  Proper usage follows:\n"
        "Sets a variable to the current channel.\nEnd of proper usage.",
    )
    assert not replies[-1].ok


@pytest.mark.parametrize("line", ["HANGUP", "200 result=x", "200 result=1 (open", "hello", ""])
def test_lines_that_are_not_replies_are_errors(line: str) -> None:
    with pytest.raises(AGIProtocolError):
        ReplyParser().feed(line)


def test_endless_multi_line_reply_is_an_error() -> None:
    parser = ReplyParser()
    parser.feed("520-usage")
    with pytest.raises(AGIProtocolError, match="longer than 64 lines"):
        for _ in range(100):
            parser.feed("more usage")


# ---- commands ------------------------------------------------------------------------------


def test_quoting_matches_the_recorded_example(shared_dir: Path) -> None:
    recorded = 'SET VARIABLE GUARD_NOTE "two words \\"quoted\\" here"'
    assert set_variable("GUARD_NOTE", 'two words "quoted" here') == recorded
    assert split_command(recorded) == ["SET", "VARIABLE", "GUARD_NOTE", 'two words "quoted" here']
    assert split_command(set_variable("N", 'value with "quotes"'))[3] == 'value with "quotes"'


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('EXEC NoOp "from agi"', ["EXEC", "NoOp", "from agi"]),
        ("SET  VARIABLE\tX  1", ["SET", "VARIABLE", "X", "1"]),
        ('SET VARIABLE X ""', ["SET", "VARIABLE", "X", ""]),
        ("a\\ b c", ["a b", "c"]),
        ('a"b c"d', ["ab cd"]),
        ("a\\\\b \\x", ["a\\b", "x"]),
        ('"a\\"b"', ['a"b']),
        ("", []),
    ],
)
def test_split_command_follows_asterisk_parse_args(line: str, words: list[str]) -> None:
    assert split_command(line) == words


def test_split_command_keeps_at_most_127_words() -> None:
    assert len(split_command(" ".join(["w"] * 200))) == 127


@given(st.text())
def test_any_value_comes_back_exactly_and_stays_one_line(value: str) -> None:
    command = set_variable("GUARD_TENANT", value)
    expected = value.replace("\r", " ").replace("\n", " ").replace("\0", " ")
    assert split_command(command) == ["SET", "VARIABLE", "GUARD_TENANT", expected]
    if len(command.encode("utf-8", errors="replace")) < MAX_COMMAND_BYTES:
        assert encode_command(command).count(b"\n") == 1


def test_line_breaks_in_a_value_cannot_inject_a_command() -> None:
    command = set_variable("GUARD_TENANT", 'acme"\nSET VARIABLE GUARD_RESULT ALLOW\r\n')
    assert encode_command(command).count(b"\n") == 1
    assert split_command(command)[3] == 'acme" SET VARIABLE GUARD_RESULT ALLOW  '


@pytest.mark.parametrize("command", ["SET VARIABLE A 1\nSET VARIABLE B 2", "NOOP\r", "NOOP\0"])
def test_encode_command_refuses_line_breaks_and_nul(command: str) -> None:
    with pytest.raises(AGIProtocolError, match="line break or NUL"):
        encode_command(command)


def test_encode_command_refuses_what_asterisk_would_cut() -> None:
    fits = "NOOP " + "x" * (MAX_COMMAND_BYTES - 6)
    assert len(encode_command(fits)) == MAX_COMMAND_BYTES
    with pytest.raises(AGIProtocolError, match="longer than 2047 bytes"):
        encode_command(fits + "x")


@pytest.mark.parametrize("name", ["A B", 'X"', "${X}", "X\n", "", "1X", "CDR(billsec"])
def test_variable_names_are_checked(name: str) -> None:
    with pytest.raises(AGIProtocolError, match="invalid channel variable name"):
        set_variable(name, "1")


def test_command_builders() -> None:
    assert set_variable("TIMEOUT(absolute)", 3) == 'SET VARIABLE TIMEOUT(absolute) "3"'
    assert verbose('guard: unknown route "x"') == 'VERBOSE "guard: unknown route \\"x\\"" 1'
    assert get_full_variable("${A}|${CDR(billsec)}") == 'GET FULL VARIABLE "${A}|${CDR(billsec)}"'
    assert quote("a\\b") == '"a\\\\b"'
