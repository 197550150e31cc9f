"""Fuzzing of everything a peer controls: the AGI wire format, the engine's inputs, and whole
sessions thrown at a running server.

Properties (hypothesis) over the parsers: any bytes either parse or raise ``AGIProtocolError``;
environment blocks, replies, request targets and quoted command arguments round-trip. Arbitrary
text in every ``CallAttempt`` field gets a decision, never an exception, and only a refusal for a
tenant that does not exist. Then ``GUARD_FUZZ_SESSIONS`` generated sessions (100,000 unless the
variable says otherwise) hit a real ``AGIServer`` with Guard's routes over a real engine on the
real Redis: valid calls, valid framing with garbage values, garbage bytes, cut connections,
over-long lines. No ERROR may be logged, no exception may reach the event loop, no session may
hang, and nothing but a refusal may answer garbage.

    GUARD_FUZZ_SESSIONS=5000 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote as uri_quote

import pytest
from factories import LONDON, make_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.agi.protocol import (
    AGIProtocolError,
    EnvironmentLimits,
    ReplyParser,
    encode_command,
    parse_environment,
    parse_request_target,
    quote,
    set_variable,
    split_command,
)
from guard.agi.routes import MAX_BILLSEC, GuardRoutes, parse_billsec
from guard.agi.server import AGIServer
from guard.agi.testing import FakeAsterisk, SessionRecord, build_environment
from guard.domain import CallAttempt, Reason, Result
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.events import EventBus
from guard.ledger import ledger_from_url
from guard.policy import evaluate
from guard.workers import run

SESSIONS = int(os.environ.get("GUARD_FUZZ_SESSIONS", "100000"))
#: Sessions in flight at once against the server.
IN_FLIGHT = 64
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_NAME = st.from_regex(r"[a-z0-9_]{1,20}", fullmatch=True)
#: A value Asterisk could send in an environment line: UTF-8 text without newline or NUL.
_VALUE = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\x00"), max_size=200
)


# ---- the wire format ----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=4000))
def test_any_bytes_parse_or_raise_a_protocol_error(block: bytes) -> None:
    try:
        env = parse_environment(block, EnvironmentLimits(max_lines=64, max_bytes=3000))
    except AGIProtocolError:
        return
    assert all(name.startswith("agi_") for name in env)


@FUZZ
@given(st.dictionaries(_NAME, _VALUE, max_size=30))
def test_environment_blocks_round_trip(values: dict[str, str]) -> None:
    block = build_environment(values)
    assert parse_environment(block) == {f"agi_{name}": value for name, value in values.items()}


@FUZZ
@given(st.text(max_size=300))
def test_any_reply_line_parses_or_raises_a_protocol_error(line: str) -> None:
    try:
        reply = ReplyParser().feed(line)
    except AGIProtocolError:
        return
    assert reply is None or 100 <= reply.code <= 999


@FUZZ
@given(
    st.integers(-(10**6), 10**6), st.text(st.characters(blacklist_characters=")\n"), max_size=80)
)
def test_replies_round_trip(result: int, data: str) -> None:
    reply = ReplyParser().feed(f"200 result={result} ({data})")
    assert reply is not None and (reply.result, reply.data) == (result, data)


@FUZZ
@given(st.text(max_size=500))
def test_any_request_target_parses_or_raises_a_protocol_error(script: str) -> None:
    try:
        target = parse_request_target(script)
    except AGIProtocolError:
        return
    assert target.path == script.partition("?")[0].strip("/")


@FUZZ
@given(
    _NAME.filter(lambda name: name != "x"),
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.text(max_size=60), max_size=8),
)
def test_uri_encoded_queries_round_trip(path: str, query: dict[str, str]) -> None:
    """What the dialplan's ``${URIENCODE()}`` sends arrives whole, ``+`` and ``%`` included."""
    script = path + "?" + "&".join(f"{k}={uri_quote(v, safe='')}" for k, v in query.items())
    target = parse_request_target(script)
    assert target.path == path
    assert dict(target.query) == query


@FUZZ
@given(st.text(max_size=300))
def test_quoted_arguments_reach_asterisk_exactly_and_stay_one_line(value: str) -> None:
    try:
        line = encode_command(set_variable("GUARD_TEST", value))
    except AGIProtocolError:
        assert len(quote(value).encode()) > 1900  # only a value too long for one line
        return
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and b"\0" not in line
    words = split_command(line[:-1].decode())
    expected = value.translate({ord("\r"): " ", ord("\n"): " ", ord("\0"): " "})
    assert words[:3] == ["SET", "VARIABLE", "GUARD_TEST"]
    assert words[3] == expected


@FUZZ
@given(st.text(max_size=60))
def test_any_billsec_text_is_a_bounded_number(text: str) -> None:
    assert 0 <= parse_billsec(text) <= MAX_BILLSEC


# ---- the engine's inputs ------------------------------------------------------------------------

_TEXT = st.text(max_size=120)


@FUZZ
@given(
    st.builds(
        CallAttempt,
        tenant=st.one_of(st.just("acme"), _TEXT),
        extension=st.one_of(st.sampled_from(["1001", "1002"]), _TEXT),
        number=st.one_of(
            st.just(LONDON), st.from_regex(r"\+?[0-9#*]{0,20}", fullmatch=True), _TEXT
        ),
        source_ip=st.one_of(st.ip_addresses().map(str), _TEXT),
        user_agent=_TEXT,
        call_id=st.text(min_size=1, max_size=80),
        linked_id=_TEXT,
        caller_id=_TEXT,
        channel=_TEXT,
    )
)
def test_policy_decides_on_any_text(attempt: CallAttempt) -> None:
    result = evaluate(make_snapshot(), attempt, datetime(2024, 6, 5, 12, tzinfo=UTC))
    if attempt.tenant != "acme":
        assert result.reason is not None or result.is_emergency


@pytest.fixture(scope="module")
def memory_engine() -> Engine:
    return Engine(
        SnapshotHolder(make_snapshot()),
        ledger_from_url("memory://", prefix="fuzz", timeout=5.0),
        EventBus(),
        EngineSettings(),
    )


@FUZZ
@given(
    tenant=st.one_of(st.just("acme"), _TEXT),
    extension=st.one_of(st.sampled_from(["1001", "1002"]), _TEXT),
    number=st.one_of(st.just(LONDON), _TEXT),
    source_ip=_TEXT,
    user_agent=_TEXT,
    call_id=st.text(min_size=1, max_size=80),
    billsec=st.integers(-(10**9), 10**9),
)
def test_engine_authorizes_and_settles_any_text(
    memory_engine: Engine,
    tenant: str,
    extension: str,
    number: str,
    source_ip: str,
    user_agent: str,
    call_id: str,
    billsec: int,
) -> None:
    attempt = CallAttempt(tenant, extension, number, source_ip, user_agent, call_id)

    async def call() -> None:
        decision = await memory_engine.authorize(attempt)
        if tenant != "acme":
            assert decision.result is Result.DENY or decision.reason is Reason.EMERGENCY
        if decision.allowed and tenant:
            await memory_engine.settle(tenant, call_id, billsec)
        await memory_engine.drain()

    asyncio.run(call())


# ---- generated sessions against a running server -------------------------------------------------


class Generator:
    """Draws sessions: what to send, and whether the server may allow what it gets."""

    def __init__(self, seed: int) -> None:
        self.draw = random.Random(seed)

    def text(self, most: int = 40) -> str:
        alphabet = "abc019+*#%&=?/ \"'\\<>\t\u00e9\u2028\U0001f600\x7f"
        return "".join(self.draw.choice(alphabet) for _ in range(self.draw.randrange(most)))

    def session(self, index: int) -> tuple[bytes, bool, int | None]:
        """(bytes to send, may be allowed, how many of them to send before leaving)."""
        kind = index % 10
        uniqueid = f"fz.{index}"
        if kind <= 3:  # a genuine call of a known extension
            script = f"authorize?tenant=acme&ext=100{1 + kind % 2}&to={LONDON}&ip=192.0.2.10"
            return self._env(script, uniqueid), True, None
        if kind == 4:  # a genuine hangup handler, for a call that may or may not exist
            script = f"settle?tenant=acme&billsec={self.draw.choice(['30', '-1', 'x', ''])}"
            return self._env(script, uniqueid), False, None
        if kind <= 6:  # valid framing, garbage values everywhere
            fields = "&".join(
                f"{name}={uri_quote(self.text(), safe='')}"
                for name in ("tenant", "ext", "to", "ip", "ua", "cid", "billsec")
                if self.draw.random() < 0.8
            )
            route = self.draw.choice(["authorize", "settle", "hangup", self.text(8)])
            extra = {f"arg_{i}": self.text() for i in range(1, self.draw.randrange(1, 4))}
            return self._env(f"{route}?{fields}", self.text(20) or uniqueid, **extra), False, None
        if kind == 7:  # garbage bytes, ended by a blank line or not
            junk = bytes(self.draw.randrange(256) for _ in range(self.draw.randrange(300)))
            return junk + self.draw.choice([b"\n\n", b"", b"\n"]), False, None
        if kind == 8:  # a connection cut midway through a genuine block
            block = self._env("authorize?tenant=acme&ext=1001&to=" + LONDON, uniqueid)
            return block, False, self.draw.randrange(len(block))
        lines = b"agi_arg_1: " + b"x" * self.draw.choice([100, 5000, 70000]) + b"\n"
        return self._env("authorize?tenant=acme", uniqueid)[:-1] + lines + b"\n", False, None

    def settle(self, uniqueid: str) -> bytes:
        """The hangup handler's session of an allowed call."""
        return self._env(f"settle?tenant=acme&billsec={self.draw.randrange(120)}", uniqueid)

    def _env(self, script: str, uniqueid: str, **more: str) -> bytes:
        return build_environment(
            {
                "network": "yes",
                "network_script": script,
                "request": f"agi://127.0.0.1/{script}",
                "channel": "PJSIP/1001-00000001",
                "uniqueid": uniqueid,
                "callerid": self.text(10),
                "extension": LONDON,
                **more,
            }
        )


class Failures(logging.Handler):
    """Collects every ERROR (or worse) record of Guard's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Outcome:
    """What the generated sessions saw."""

    sessions: int = 0
    allowed: int = 0
    refused: int = 0
    wrong: list[str] = field(default_factory=list)
    loop_errors: list[dict[str, object]] = field(default_factory=list)


async def _throw_sessions(redis_url: str, prefix: str, count: int) -> Outcome:
    """Run ``count`` generated sessions against a server with Guard's routes on the real Redis."""
    outcome = Outcome()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: outcome.loop_errors.append(context))
    ledger = ledger_from_url(redis_url, prefix=prefix, timeout=2.0)
    engine = Engine(SnapshotHolder(make_snapshot()), ledger, EventBus(), EngineSettings())
    app = AGIServer([("127.0.0.1", 0)], env_timeout=0.25, reply_timeout=1.0, session_timeout=5.0)
    GuardRoutes(engine).install(app)
    generator = Generator(seed=2024)
    pending = iter(range(count))
    try:
        await app.start()
        fake = FakeAsterisk(*app.addresses[0])
        baseline = len(asyncio.all_tasks())

        async def worker() -> None:
            for index in pending:
                data, may_allow, cut = generator.session(index)
                record: SessionRecord = await fake.play(data, send_bytes=cut, time_limit=10)
                fake.channels.pop(record.uniqueid, None)
                outcome.sessions += 1
                if record.timed_out:
                    outcome.wrong.append(f"session {index} hung: {data[:200]!r}")
                result = record.variables.get("GUARD_RESULT")
                if result == "DENY":
                    outcome.refused += 1
                if result != "ALLOW":
                    continue
                outcome.allowed += 1
                if not may_allow:
                    outcome.wrong.append(f"session {index} allowed: {data[:200]!r}")
                hangup = await fake.play(
                    generator.settle(record.uniqueid), variables=record.variables
                )
                fake.channels.pop(record.uniqueid, None)
                if hangup.variables.get("GUARD_SETTLED") != "settled":
                    outcome.wrong.append(f"session {index} not settled: {hangup.variables}")

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        deadline = time.monotonic() + 10
        while app.active_sessions or len(asyncio.all_tasks()) > baseline:
            assert time.monotonic() < deadline, "sessions or tasks left behind"
            await asyncio.sleep(0.05)
        await engine.drain()
        if await ledger.live_calls("acme"):
            outcome.wrong.append("allowed calls left open although every one was settled")
    finally:
        await app.shutdown(0)
        await ledger.close()
    return outcome


@pytest.mark.timeout(900)
def test_generated_sessions_never_crash_hang_or_allow_garbage(
    redis_url: str, key_prefix: str
) -> None:
    """Runs on Guard's own event loop (uvloop when installed), as ``guard serve`` does."""
    failures = Failures()
    logging.getLogger("guard").addHandler(failures)
    started = time.monotonic()
    try:
        outcome = run(_throw_sessions(redis_url, key_prefix, SESSIONS))
    finally:
        logging.getLogger("guard").removeHandler(failures)
    elapsed = time.monotonic() - started
    rate = SESSIONS / elapsed
    print(f"{SESSIONS} generated sessions in {elapsed:.1f} s ({rate:.0f}/s): {outcome.sessions}")
    assert not outcome.wrong, outcome.wrong[:10]
    assert not outcome.loop_errors, outcome.loop_errors[:5]
    assert not failures.records, [r.getMessage() for r in failures.records[:10]]
    assert outcome.sessions == SESSIONS
    assert outcome.allowed > 0 and outcome.refused > SESSIONS // 4
