"""Guard's authorize and settle routes, driven by the recorded Asterisk sessions."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from agi_support import HOSTILE_UA, UK_FIXED, StubAuthorizer, allow, guard_server, transcripts

from guard.agi.protocol import parse_environment, parse_request_target
from guard.agi.routes import MAX_BILLSEC, parse_billsec
from guard.agi.testing import build_environment, dialplan_outcome, replace_environment
from guard.domain import CallAttempt, Decision, Rate, Reason, Result
from guard.errors import StorageError

AUTHORIZE = ["authorize-chan_sip", "authorize-hostile-ua", "authorize-pjsip", "authorize-local"]
GUARD_VARIABLES = [
    "GUARD_TENANT",
    "GUARD_REASON",
    "GUARD_MAX_SECONDS",
    "GUARD_DEST",
    "GUARD_CLASS",
    "GUARD_RESULT",
]
#: What the dialplan of the shipped extensions_guard.conf sets before it calls Guard.
PRESET = {"GUARD_RESULT": "DENY", "GUARD_REASON": "guard_unreachable", "GUARD_MAX_SECONDS": "0"}


def _deny(reason: Reason) -> Callable[[CallAttempt], Decision]:
    return lambda attempt: Decision(Result.DENY, reason, 0, attempt.call_id, destination=UK_FIXED)


def _request(script: str, uniqueid: str = "3.1", **env: str) -> bytes:
    return build_environment(
        {"network": "yes", "network_script": script, "uniqueid": uniqueid, **env}
    )


@pytest.mark.parametrize("name", AUTHORIZE)
async def test_every_recorded_authorize_session_is_answered(name: str, shared_dir: Path) -> None:
    engine = StubAuthorizer()
    async with guard_server(engine, shared_dir) as asterisk:
        record = await asterisk.play(name)
    transcript = asterisk.transcripts[name]
    env = parse_environment(transcript.environment)
    query = parse_request_target(transcript.request).query
    assert engine.attempts == [
        CallAttempt(
            tenant="acme",
            extension=query["ext"],
            number=env["agi_extension"],
            source_ip=query["ip"],
            user_agent=query["ua"],
            call_id=transcript.uniqueid,
            caller_id=env["agi_callerid"],
            channel=env["agi_channel"],
        )
    ]
    assert [name for name, _ in record.assignments] == GUARD_VARIABLES  # GUARD_RESULT last
    assert {k: record.variables[k] for k in GUARD_VARIABLES} == {
        "GUARD_TENANT": "acme",
        "GUARD_REASON": "allowed",
        "GUARD_MAX_SECONDS": "120",
        "GUARD_DEST": "United Kingdom fixed",
        "GUARD_CLASS": "national",
        "GUARD_RESULT": "ALLOW",
    }
    assert dialplan_outcome(record.variables) == (True, 120_000)


async def test_hostile_user_agent_reaches_the_engine_whole(shared_dir: Path) -> None:
    engine = StubAuthorizer()
    async with guard_server(engine, shared_dir) as asterisk:
        await asterisk.play("authorize-hostile-ua")
    assert engine.attempts[0].user_agent == HOSTILE_UA
    assert engine.attempts[0].source_ip == "127.0.0.9"


@pytest.mark.parametrize("name", AUTHORIZE)
async def test_recorded_hangup_handler_settles_its_channel(name: str, shared_dir: Path) -> None:
    engine = StubAuthorizer()
    settle = name.replace("authorize-", "settle-")
    async with guard_server(engine, shared_dir) as asterisk:
        await asterisk.play(name)
        record = await asterisk.play(settle)
    billsec = int(asterisk.transcripts[settle].seed["CDR(billsec)"])
    assert engine.settles == [("acme", asterisk.transcripts[name].uniqueid, billsec)]
    assert record.commands[0] == (
        'GET FULL VARIABLE "${GUARD_TENANT}|${CDR(billsec)}|${ANSWEREDTIME}|'
        '${GUARD_RESULT}|${GUARD_REASON}"'
    )
    assert record.assignments == [("GUARD_SETTLED", "settled")]


async def test_hangup_during_authorize_still_delivers_the_decision(shared_dir: Path) -> None:
    engine = StubAuthorizer()
    async with guard_server(engine, shared_dir) as asterisk:
        record = await asterisk.play("authorize-pjsip", hangup_after=0)
    assert record.variables["GUARD_RESULT"] == "ALLOW"
    assert record.variables["GUARD_MAX_SECONDS"] == "120"


async def test_denied_call_is_refused_and_never_settled(shared_dir: Path) -> None:
    engine = StubAuthorizer(decide=_deny(Reason.DAILY_LIMIT_EXTENSION))
    async with guard_server(engine, shared_dir) as asterisk:
        record = await asterisk.play("authorize-chan_sip")
        settled = await asterisk.play("settle-chan_sip")
    assert record.variables["GUARD_RESULT"] == "DENY"
    assert record.variables["GUARD_REASON"] == "daily_limit_extension"
    assert record.variables["GUARD_MAX_SECONDS"] == "0"
    assert dialplan_outcome(record.variables) == (False, None)
    assert engine.settles == [] and settled.assignments == [("GUARD_SETTLED", "skipped")]


async def test_emergency_call_is_not_settled(shared_dir: Path) -> None:
    def emergency(attempt: CallAttempt) -> Decision:
        return Decision(Result.ALLOW, Reason.EMERGENCY, 14_400, attempt.call_id)

    engine = StubAuthorizer(decide=emergency)
    async with guard_server(engine, shared_dir) as asterisk:
        record = await asterisk.play("authorize-local")
        settled = await asterisk.play("settle-local")
    assert dialplan_outcome(record.variables) == (True, 14_400_000)
    assert record.variables["GUARD_DEST"] == "" and record.variables["GUARD_CLASS"] == ""
    assert engine.settles == [] and settled.variables["GUARD_SETTLED"] == "skipped"


@pytest.mark.parametrize(
    ("script", "env", "field"),
    [
        ("authorize?ext=1001", {}, "tenant"),
        ("authorize?tenant=&ext=1001", {}, "tenant"),
        ("authorize?tenant=acme", {}, "ext"),
        ("authorize?ext=1001&tenant=acme", {"uniqueid": ""}, "agi_uniqueid"),
    ],
)
async def test_unidentified_request_is_refused_without_the_engine(
    script: str, env: dict[str, str], field: str, shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = StubAuthorizer()
    async with guard_server(engine, shared_dir) as asterisk:
        recorded = asterisk.transcripts["authorize-chan_sip"].environment
        environment = replace_environment(recorded, network_script=script, **env)
        record = await asterisk.play(environment)
    assert engine.attempts == []
    assert record.variables["GUARD_RESULT"] == "DENY"
    assert record.variables["GUARD_REASON"] == "bad_request"
    warning = next(r for r in caplog.records if r.getMessage() == "agi authorize: bad request")
    assert warning.guard_fields["field"] == field  # type: ignore[attr-defined]


async def test_query_overrides_and_defaults(shared_dir: Path) -> None:
    engine = StubAuthorizer()
    script = "authorize?tenant=acme&ext=1001&to=%2B442071234567&cid=%2B331&linkedid=9.9&tenant=evil"
    async with guard_server(engine, shared_dir) as asterisk:
        environment = replace_environment(
            asterisk.transcripts["authorize-pjsip"].environment, network_script=script
        )
        await asterisk.play(environment)
    attempt = engine.attempts[0]
    assert (attempt.tenant, attempt.number, attempt.caller_id) == ("acme", "+442071234567", "+331")
    assert (attempt.linked_id, attempt.source_ip, attempt.user_agent) == ("9.9", "", "")


async def test_store_failure_denies_with_store_unavailable(shared_dir: Path) -> None:
    engine = StubAuthorizer(authorize_error=StorageError("redis timeout"))
    async with guard_server(engine, shared_dir) as asterisk:
        record = await asterisk.play("authorize-chan_sip")
    assert record.variables["GUARD_RESULT"] == "DENY"
    assert record.variables["GUARD_REASON"] == "store_unavailable"


async def test_engine_crash_denies_and_the_server_survives(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = StubAuthorizer(authorize_error=RuntimeError("bug"))
    async with guard_server(engine, shared_dir) as asterisk:
        crashed = await asterisk.play("authorize-chan_sip")
        engine.authorize_error = None
        fine = await asterisk.play("authorize-pjsip")
    assert crashed.variables["GUARD_REASON"] == "bad_request"
    assert dialplan_outcome(crashed.variables) == (False, None)
    assert dialplan_outcome(fine.variables) == (True, 120_000)
    assert any(r.exc_info for r in caplog.records if "engine failed" in r.getMessage())


async def test_allow_without_a_positive_limit_is_not_dialed(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = StubAuthorizer(decide=lambda attempt: allow(attempt, max_seconds=0))
    async with guard_server(engine, shared_dir) as asterisk:
        record = await asterisk.play("authorize-chan_sip")
    assert record.variables["GUARD_RESULT"] == "ALLOW"
    assert dialplan_outcome(record.variables) == (False, None)
    assert any(r.levelno == logging.ERROR for r in caplog.records)


async def test_echoed_values_stay_one_line_and_bounded(shared_dir: Path) -> None:
    rate = Rate("44", 'UK "fixed"\nSET VARIABLE GUARD_RESULT ALLOW', UK_FIXED.dest_class, 1)
    engine = StubAuthorizer(decide=lambda a: replace(allow(a), destination=rate))
    tenant = "acme%0ASET%20VARIABLE%20X%201" + "x" * 1000
    async with guard_server(engine, shared_dir) as asterisk:
        environment = replace_environment(
            asterisk.transcripts["authorize-chan_sip"].environment,
            network_script=f"authorize?tenant={tenant}&ext=1001",
        )
        record = await asterisk.play(environment)
    assert len(record.commands) == 6 and "X" not in record.variables
    assert record.variables["GUARD_DEST"] == 'UK "fixed" SET VARIABLE GUARD_RESULT ALLOW'
    assert record.variables["GUARD_TENANT"] == ("acme SET VARIABLE X 1" + "x" * 1000)[:256]


async def test_session_cut_before_the_result_releases_the_reservation(shared_dir: Path) -> None:
    engine = StubAuthorizer()
    async with guard_server(engine, shared_dir) as asterisk:
        record = await asterisk.play("authorize-chan_sip", variables=PRESET, close_after=2)
        settled = await asterisk.play("settle-chan_sip")
    uniqueid = asterisk.transcripts["authorize-chan_sip"].uniqueid
    assert engine.settles == [("acme", uniqueid, 0)]  # released once, at no cost
    assert record.variables["GUARD_RESULT"] == "DENY"  # the dialplan's own fail-closed preset
    assert dialplan_outcome(record.variables) == (False, None)
    assert settled.variables["GUARD_SETTLED"] == "skipped"


async def test_denied_session_cut_midway_releases_nothing(shared_dir: Path) -> None:
    engine = StubAuthorizer(decide=_deny(Reason.CONCURRENT_LIMIT_TENANT))
    async with guard_server(engine, shared_dir) as asterisk:
        await asterisk.play("authorize-chan_sip", variables=PRESET, close_after=3)
    assert engine.settles == []


async def test_unconfirmed_result_keeps_the_reservation_for_the_hangup_handler(
    shared_dir: Path,
) -> None:
    engine = StubAuthorizer()
    async with guard_server(engine, shared_dir, reply_timeout=0.2) as asterisk:
        record = await asterisk.play("authorize-pjsip", variables=PRESET, mute_after=5)
        assert engine.settles == []  # Asterisk may have applied ALLOW: no release
        assert dialplan_outcome(record.variables) == (True, 120_000)
        await asterisk.play("settle-pjsip")
    assert engine.settles == [("acme", asterisk.transcripts["authorize-pjsip"].uniqueid, 5)]


async def test_shipped_dialplan_settle_request_uses_the_query(shared_dir: Path) -> None:
    engine = StubAuthorizer()
    async with guard_server(engine, shared_dir) as asterisk:
        asterisk.channel("3.1").update({"GUARD_RESULT": "ALLOW", "GUARD_REASON": "allowed"})
        asterisk.channel("3.1").update({"GUARD_TENANT": "acme", "CDR(billsec)": "5"})
        record = await asterisk.play(_request("settle?tenant=beta&billsec=42"))
    assert engine.settles == [("beta", "3.1", 42)]
    assert record.variables["GUARD_SETTLED"] == "settled"


@pytest.mark.parametrize(
    ("billsec", "answered", "expected"),
    [("", "17", 17), ("", "", 0), ("abc", "", 0), ("-5", "", 0), ("99999999", "", MAX_BILLSEC)],
)
async def test_settle_billsec_from_the_channel(
    billsec: str, answered: str, expected: int, shared_dir: Path
) -> None:
    engine = StubAuthorizer()
    async with guard_server(engine, shared_dir) as asterisk:
        channel = asterisk.channel("3.2")
        channel.update({"GUARD_RESULT": "ALLOW", "GUARD_REASON": "allowed", "GUARD_TENANT": "t"})
        channel.update({"CDR(billsec)": billsec, "ANSWEREDTIME": answered})
        await asterisk.play(_request("hangup", "3.2"))
    assert engine.settles == [("t", "3.2", expected)]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("61", 61),
        (" 7\n", 7),
        ("007", 7),
        ("-0", 0),
        ("", 0),
        ("-5", 0),
        ("1e3", 0),
        ("1_000", 0),
        ("\u0663", 0),  # a non-ASCII digit that int() would accept
        ("5.5", 0),
        (str(MAX_BILLSEC), MAX_BILLSEC),
        (str(MAX_BILLSEC + 1), MAX_BILLSEC),
        ("9" * 3000, MAX_BILLSEC),
    ],
)
def test_parse_billsec(text: str, seconds: int) -> None:
    assert parse_billsec(text) == seconds


async def test_settle_failures_are_marked_not_raised(shared_dir: Path) -> None:
    engine = StubAuthorizer(settle_error=StorageError("redis down"))
    async with guard_server(engine, shared_dir) as asterisk:
        asterisk.channel("3.3").update({"GUARD_RESULT": "ALLOW", "GUARD_REASON": "allowed"})
        no_tenant = await asterisk.play(_request("settle", "3.3"))
        failed = await asterisk.play(_request("settle?tenant=acme", "3.3"))
        no_call_id = await asterisk.play(_request("settle?tenant=acme", ""))
    assert engine.settles == [("acme", "3.3", 0)]
    assert no_tenant.variables["GUARD_SETTLED"] == "error"
    assert failed.variables["GUARD_SETTLED"] == "error"
    assert no_call_id.variables["GUARD_SETTLED"] == "error"


def test_recorded_sessions_cover_both_routes(shared_dir: Path) -> None:
    names = set(transcripts(shared_dir))
    assert set(AUTHORIZE) | {n.replace("authorize-", "settle-") for n in AUTHORIZE} <= names
