"""The Stasis application against the ARI stand-in with a stub engine: what each decision does to
the channel, the settle-exactly-once rule replayed from the recorded session, hostile input,
reconnection, a burst of calls under the concurrency bound, and callers who hang up early."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from guard.ari.app import (
    OPTIONAL_KEYS,
    REQUIRED_KEYS,
    AriAppSettings,
    GuardStasisApp,
    RefuseMode,
    parse_stasis_arg,
    parse_stasis_start,
)
from guard.ari.client import AriClient, Backoff
from guard.ari.testing import (
    AriStandIn,
    RestCall,
    dialplan_stasis_data,
    separate_app_args,
    uriencode,
)
from guard.domain import CallAttempt, Decision, DestinationClass, Rate, Reason, Result
from guard.errors import ValidationError
from guard.ledger.types import SettleOutcome, SettleResult

PASSWORD = "s3cret-Pa55"
HOSTILE_UA = 'Evil", "9999", "x" ip=6.6.6.6 %0A (a,b) [c,d] & ua=forged \\ \n\u2028 é'
RECORDED_CHANNEL = "1795292140.51"


UK = Rate("0044", "UK", DestinationClass.INTERNATIONAL, rate_per_minute=1_000)


def allow(attempt: CallAttempt) -> Decision:
    return Decision(
        Result.ALLOW, Reason.ALLOWED, 120, attempt.call_id, destination=UK, reserved=2_000
    )


def deny(attempt: CallAttempt) -> Decision:
    return Decision(Result.DENY, Reason.DAILY_LIMIT_TENANT, 0, attempt.call_id)


@dataclass
class StubEngine:
    """Decides with ``decide``; records attempts, settles and the peak of concurrent authorizes."""

    decide: Callable[[CallAttempt], Decision] = allow
    delay: float = 0.0
    gate: asyncio.Event | None = None
    attempts: list[CallAttempt] = field(default_factory=list)
    settles: list[tuple[str, str, int]] = field(default_factory=list)
    active: int = 0
    peak: int = 0

    async def authorize(self, attempt: CallAttempt) -> Decision:
        self.attempts.append(attempt)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay)
            return self.decide(attempt)
        finally:
            self.active -= 1

    async def settle(self, tenant: str, call_id: str, billsec: int) -> SettleResult:
        self.settles.append((tenant, call_id, billsec))
        return SettleResult(SettleOutcome.SETTLED, tenant, call_id, cost=billsec)


@pytest.fixture
async def ari() -> AsyncIterator[AriStandIn]:
    async with AriStandIn(username="guard", password=PASSWORD) as standin:
        yield standin


@contextlib.asynccontextmanager
async def serving(
    ari: AriStandIn,
    engine: StubEngine,
    clock: Callable[[], float] = time.monotonic,
    **settings: Any,
) -> AsyncIterator[GuardStasisApp]:
    client = AriClient(ari.base_url, "guard", PASSWORD, backoff=Backoff(base=0.01, cap=0.05))
    app = GuardStasisApp(client, engine, AriAppSettings(**settings), clock=clock)
    task = asyncio.create_task(app.run())
    try:
        await ari.wait_connected()
        yield app
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()


def call_data(ua: str = "Yealink SIP-T46S", number: str = "00441234567") -> str:
    return dialplan_stasis_data(
        tenant="acme",
        ext="1001",
        number=number,
        source_ip="127.0.0.7",
        user_agent=ua,
        linked_id="1795292140.51",
    )


def is_answer(call: RestCall) -> bool:
    return call.path.endswith("/continue") or call.method == "DELETE"


def answered(ari: AriStandIn, channel_id: str) -> bool:
    """The channel got its answer: a continue or a hang-up."""
    return any(map(is_answer, ari.calls_to(channel_id)))


def summary(calls: list[RestCall]) -> list[tuple[str, str, dict[str, str], int]]:
    return [(c.method, c.path.rsplit("/", 1)[-1], c.params, c.status) for c in calls]


def recorded_events(shared_dir: Path, channel_id: str) -> list[dict[str, Any]]:
    lines = (shared_dir / "asterisk" / "ari-session.jsonl").read_text().splitlines()
    events = [entry["event"] for entry in map(json.loads, lines) if "event" in entry]
    return [
        event
        for event in events
        if (event.get("channel") or event.get("caller") or {}).get("id") == channel_id
    ]


async def test_allowed_call_replays_the_recorded_session_and_settles_once(
    ari: AriStandIn, shared_dir: Path
) -> None:
    events = recorded_events(shared_dir, RECORDED_CHANNEL)
    start, rest = events[0], events[1:]
    assert start["type"] == "StasisStart"
    start = {**start, "args": separate_app_args(call_data())[1:]}
    engine = StubEngine()
    async with serving(ari, engine) as app:
        ari.push(start)
        await ari.wait_for(lambda: answered(ari, RECORDED_CHANNEL))
        (attempt,) = engine.attempts
        assert attempt == CallAttempt(
            tenant="acme",
            extension="1001",
            number="00441234567",
            source_ip="127.0.0.7",
            user_agent="Yealink SIP-T46S",
            call_id=RECORDED_CHANNEL,
            linked_id="1795292140.51",
            caller_id="1001",
            channel="SIP/1001-0000000d",
        )
        *rendering, last = ari.calls_to(RECORDED_CHANNEL)
        assert (last.path, last.status) == (f"/channels/{RECORDED_CHANNEL}/continue", 204)
        subscriptions = [c.params for c in rendering if c.path.endswith("/subscription")]
        assert subscriptions == [{"eventSource": f"channel:{RECORDED_CHANNEL}"}]
        variables = {
            c.params["variable"]: c.params["value"] for c in rendering if "value" in c.params
        }
        assert variables == {
            "GUARD_TENANT": "acme",
            "GUARD_REASON": "allowed",
            "GUARD_MAX_SECONDS": "120",
            "GUARD_DEST": "UK",
            "GUARD_CLASS": "international",
            "GUARD_RESULT": "ALLOW",
            "TIMEOUT(absolute)": "180",
        }
        assert len(rendering) == 8 and all(c.status in (200, 204) for c in rendering)
        # Asterisk's own StasisEnd/STASISSTATUS/GUARD_RESULT events came from the stand-in; the
        # rest of the recorded call (Dial, Up, ANSWEREDTIME=2, hang-up handler, destroyed) now.
        emitted = {"StasisEnd"} | {"ChannelVarset:GUARD_RESULT", "ChannelVarset:STASISSTATUS"}
        for event in rest:
            key = event["type"] + (f":{event['variable']}" if "variable" in event else "")
            if key not in emitted:
                ari.push(event)
        await ari.wait_for(lambda: bool(engine.settles))
        ari.push(rest[-1])  # a repeated ChannelDestroyed changes nothing
        await asyncio.sleep(0.05)
        assert engine.settles == [("acme", RECORDED_CHANNEL, 2)]
        assert app.tracked_calls == 0


async def test_billsec_falls_back_to_up_until_hangup_without_answeredtime(
    ari: AriStandIn,
) -> None:
    engine = StubEngine()
    t0 = datetime(2026, 11, 21, 20, 15, 40, 208000, tzinfo=UTC)
    async with serving(ari, engine):
        channel = ari.stasis(call_data(), when=t0)
        await ari.wait_for(lambda: answered(ari, channel.id))
        ari.answer(channel.id, when=t0 + timedelta(seconds=5))
        ari.caller_hangup(channel.id, when=t0 + timedelta(seconds=47, milliseconds=900))
        await ari.wait_for(lambda: bool(engine.settles))
    assert engine.settles == [("acme", channel.id, 42)]


async def test_answered_seconds_of_every_dial_are_added(ari: AriStandIn) -> None:
    engine = StubEngine()
    async with serving(ari, engine):
        channel = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, channel.id))
        for value in ("", "3", "", "", "4"):  # Dial answered 3 s, one unanswered, one 4 s
            ari.set_by_dialplan(channel.id, "ANSWEREDTIME", value)
        ari.caller_hangup(channel.id)
        await ari.wait_for(lambda: bool(engine.settles))
    assert engine.settles == [("acme", channel.id, 7)]


async def test_refused_call_is_hung_up_with_congestion(ari: AriStandIn) -> None:
    engine = StubEngine(decide=deny)
    async with serving(ari, engine) as app:
        channel = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, channel.id))
        assert summary(ari.calls_to(channel.id)) == [
            ("DELETE", channel.id, {"reason": "congestion"}, 204)
        ]
        await ari.wait_for(lambda: channel.id not in ari.channels)
        assert app.tracked_calls == 0
    assert engine.settles == []


async def test_refused_call_is_continued_with_deny_in_continue_mode(ari: AriStandIn) -> None:
    engine = StubEngine(decide=deny)
    async with serving(ari, engine, refuse_mode=RefuseMode.CONTINUE):
        channel = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, channel.id))
        calls = summary(ari.calls_to(channel.id))
    assert calls[-1] == ("POST", "continue", {}, 204)
    assert channel.variables == {
        "GUARD_TENANT": "acme",
        "GUARD_REASON": "daily_limit_tenant",
        "GUARD_MAX_SECONDS": "0",
        "GUARD_DEST": "",
        "GUARD_CLASS": "",
        "GUARD_RESULT": "DENY",
    }
    assert not any(c[0] == "DELETE" for c in calls)


async def test_hostile_user_agent_arrives_whole(ari: AriStandIn) -> None:
    engine = StubEngine()
    async with serving(ari, engine):
        channel = ari.stasis(call_data(ua=HOSTILE_UA, number="+44(20),7946"))
        await ari.wait_for(lambda: answered(ari, channel.id))
    (attempt,) = engine.attempts
    assert attempt.user_agent == HOSTILE_UA
    assert attempt.number == "+44(20),7946"
    assert (attempt.tenant, attempt.extension, attempt.source_ip) == ("acme", "1001", "127.0.0.7")


def test_positional_uriencoded_arguments_would_be_merged_by_a_parenthesis() -> None:
    """Why the contract is ONE argument: URIENCODE keeps "(" and Asterisk does not split inside
    parentheses, so a second encoded argument after the UA would be swallowed."""
    data = f"guard,{uriencode('Evil(')},{uriencode('acme')},{uriencode('1001')}"
    assert separate_app_args(data) == ["guard", "Evil(,acme,1001"]
    (query,) = separate_app_args(call_data(ua="Evil(", number="1("))[1:]
    assert parse_stasis_arg(query)["ua"] == "Evil("


async def test_arguments_off_the_contract_are_refused_as_bad_request(ari: AriStandIn) -> None:
    engine = StubEngine()
    async with serving(ari, engine, refuse_mode=RefuseMode.CONTINUE):
        # The capture dialplan's positional form, split by the hostile User-Agent.
        channel = ari.stasis(f'guard,00441234567,127.0.0.7,"{HOSTILE_UA}"')
        await ari.wait_for(lambda: answered(ari, channel.id))
    assert engine.attempts == []
    assert channel.variables["GUARD_RESULT"] == "DENY"
    assert channel.variables["GUARD_REASON"] == "bad_request"


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "tenant=acme",
        "tenant=a&tenant=b&ext=1&to=2&ip=3&ua=4",
        "tenant&ext=1",
        "x" * 9000,
    ],
)
def test_stasis_arg_contract_violations(arg: str) -> None:
    with pytest.raises(ValidationError):
        parse_stasis_arg(arg)


@pytest.mark.parametrize("missing", ["tenant", "ext"])
def test_empty_tenant_or_extension_is_a_bad_request(missing: str) -> None:
    values = {"tenant": "acme", "ext": "1001", missing: ""}
    data = dialplan_stasis_data(
        tenant=values["tenant"], ext=values["ext"], number="1", source_ip="", user_agent=""
    )
    event = {"type": "StasisStart", "args": separate_app_args(data)[1:], "channel": {"id": "1.1"}}
    with pytest.raises(ValidationError) as caught:
        parse_stasis_start(event)
    assert caught.value.field == missing


def test_shipped_ari_dialplan_sends_the_one_argument_the_app_reads(shared_dir: Path) -> None:
    text = (
        Path(__file__).resolve().parents[1] / "dialplan" / "extensions_guard_ari.conf"
    ).read_text()
    (line,) = [
        ln for ln in text.splitlines() if "Stasis(" in ln and not ln.lstrip().startswith(";")
    ]
    data = line.split("Stasis(", 1)[1].rsplit(")", 1)[0]
    app, query = separate_app_args(data)
    assert app == "guard"
    pairs = [part.partition("=") for part in query.split("&")]
    assert [key for key, _, _ in pairs] == [*REQUIRED_KEYS, *OPTIONAL_KEYS]
    assert all(re.fullmatch(r"\$\{URIENCODE\(.+\)\}", value) for _, _, value in pairs)
    assert "Set(GUARD_RESULT=DENY)" in text
    assert '"${STASISSTATUS}" != "SUCCESS"' in text
    assert '"${GUARD_RESULT}" != "ALLOW"' in text


async def test_engine_failure_refuses_the_call(ari: AriStandIn) -> None:
    def broken(attempt: CallAttempt) -> Decision:
        raise RuntimeError("engine bug")

    engine = StubEngine(decide=broken)
    async with serving(ari, engine):
        channel = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, channel.id))
        assert summary(ari.calls_to(channel.id))[-1][0] == "DELETE"
        second = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, second.id))


async def test_emergency_call_goes_on_and_is_never_settled(ari: AriStandIn) -> None:
    def emergency(attempt: CallAttempt) -> Decision:
        return Decision(Result.ALLOW, Reason.EMERGENCY, 14_400, attempt.call_id)

    engine = StubEngine(decide=emergency)
    async with serving(ari, engine) as app:
        channel = ari.stasis(call_data(number="112"))
        await ari.wait_for(lambda: answered(ari, channel.id))
        assert channel.variables["TIMEOUT(absolute)"] == "14460"
        ari.caller_hangup(channel.id)
        await asyncio.sleep(0.05)
        assert app.tracked_calls == 0
    assert engine.settles == []


@pytest.mark.parametrize("seen", ["destroyed_event", "rest_404"])
async def test_caller_hanging_up_while_guard_decides_settles_zero_once(
    ari: AriStandIn, seen: str
) -> None:
    engine = StubEngine(gate=asyncio.Event())
    async with serving(ari, engine) as app:
        channel = ari.stasis(call_data())
        await ari.wait_for(lambda: len(engine.attempts) == 1)
        if seen == "destroyed_event":
            ari.push({"type": "ChannelDestroyed", "cause": 16, "channel": channel.json()})
        else:
            ari.caller_hangup(channel.id)  # StasisEnd only: the allowed call's REST gets 404s
        await ari.wait_for(lambda: channel.id not in ari.channels and bool(ari.sent))
        await asyncio.sleep(0.05)
        assert engine.gate is not None
        engine.gate.set()
        await ari.wait_for(lambda: bool(engine.settles))
        await asyncio.sleep(0.05)
        assert engine.settles == [("acme", channel.id, 0)]
        assert app.tracked_calls == 0
        if seen == "destroyed_event":
            assert ari.calls_to(channel.id) == []
        later = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, later.id))


async def test_rest_404_for_a_vanished_caller_crashes_nothing(ari: AriStandIn) -> None:
    engine = StubEngine(gate=asyncio.Event())
    async with serving(ari, engine):
        allowed = ari.stasis(call_data())
        refused = ari.stasis(call_data(number="00999"))
        await ari.wait_for(lambda: len(engine.attempts) == 2)
        for channel in (allowed, refused):
            del ari.channels[channel.id]  # gone, and its events lost
        engine.decide = lambda a: allow(a) if a.call_id == allowed.id else deny(a)
        assert engine.gate is not None
        engine.gate.set()
        await ari.wait_for(lambda: len(engine.settles) == 1)
        assert [c.status for c in ari.calls_to(refused.id)] == [404]
        assert 404 in [c.status for c in ari.calls_to(allowed.id)]
        assert engine.settles == [("acme", allowed.id, 0)]
        later = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, later.id))


async def test_stasis_start_after_a_reconnect_is_answered(ari: AriStandIn) -> None:
    engine = StubEngine()
    async with serving(ari, engine):
        await ari.drop_sockets()
        await ari.wait_connected(2)
        channel = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, channel.id))


async def test_events_missed_while_disconnected_leave_the_settle_to_the_sweeper(
    ari: AriStandIn,
) -> None:
    engine = StubEngine()
    async with serving(ari, engine) as app:
        channel = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, channel.id))
        await ari.drop_sockets()
        ari.answer(channel.id)  # lost: nobody is connected
        await ari.wait_connected(2)
        ari.caller_hangup(channel.id)
        await ari.wait_for(lambda: app.tracked_calls == 0)
    assert engine.settles == []


async def test_live_call_whose_hangup_never_comes_is_forgotten_after_its_deadline(
    ari: AriStandIn,
) -> None:
    now = 1000.0
    engine = StubEngine()
    async with serving(ari, engine, clock=lambda: now) as app:
        lost = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, lost.id))
        assert app.tracked_calls == 1
        now += 120 + 60 + 60 + 1  # max_seconds + ring timeout + grace, and a bit
        later = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, later.id))
        assert app.tracked_calls == 1
        ari.caller_hangup(lost.id)
        ari.caller_hangup(later.id)
        await ari.wait_for(lambda: app.tracked_calls == 0)
    assert engine.settles == [("acme", later.id, 0)]


async def test_burst_of_stasis_starts_all_answered_within_the_bound(ari: AriStandIn) -> None:
    engine = StubEngine(
        decide=lambda a: allow(a) if int(a.call_id.rsplit(".", 1)[1]) % 4 == 0 else deny(a),
        delay=0.002,
    )
    seen = answers = 0

    def all_answered() -> bool:  # counts only the calls recorded since the last poll
        nonlocal seen, answers
        answers += sum(map(is_answer, ari.calls[seen:]))
        seen = len(ari.calls)
        return answers >= 1000

    ari.wait_limit = 15.0
    async with serving(ari, engine, max_handlers=50):
        channels = [ari.stasis(call_data()) for _ in range(1000)]
        await ari.wait_for(all_answered)
    per_channel: dict[str, list[str]] = {}
    for call in filter(is_answer, ari.calls):
        per_channel.setdefault(call.path.split("/")[2], []).append(call.method)
    assert len(engine.attempts) == 1000
    assert sorted(per_channel) == sorted(c.id for c in channels)
    assert all(len(methods) == 1 for methods in per_channel.values())
    assert 2 <= engine.peak <= 50
    assert sum(c.params.get("variable") == "GUARD_RESULT" for c in ari.calls) == 250


async def test_hangup_channel_for_live_call_commands(ari: AriStandIn) -> None:
    engine = StubEngine()
    async with serving(ari, engine) as app:
        channel = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, channel.id))
        with pytest.raises(ValidationError):
            await app.hangup_channel(channel.id, "rejected")
        assert await app.hangup_channel(channel.id, "normal") is True
        assert await app.hangup_channel(channel.id, "normal") is False
        await ari.wait_for(lambda: bool(engine.settles))
    assert engine.settles == [("acme", channel.id, 0)]


async def test_odd_and_malformed_events_are_ignored(ari: AriStandIn) -> None:
    engine = StubEngine()
    async with serving(ari, engine):
        ari.send_raw("{not json")
        ari.push({"type": "StasisStart"})
        ari.push({"type": "StasisStart", "channel": "x"})
        ari.push({"type": "StasisStart", "channel": {"id": 7}})
        ari.push({"type": "ChannelDestroyed", "channel": {"id": "unknown.1"}})
        ari.push({"type": "ChannelVarset", "channel": {"id": "x"}, "variable": "ANSWEREDTIME"})
        ari.push({"type": "BridgeCreated", "bridge": {"id": "b"}})
        odd = ari.add_channel()
        ari.push({"type": "StasisStart", "channel": odd.json(), "args": "not a list"})
        channel = ari.stasis(call_data())
        await ari.wait_for(lambda: answered(ari, channel.id) and answered(ari, odd.id))
    assert [a.call_id for a in engine.attempts] == [channel.id]
    assert summary(ari.calls_to(odd.id)) == [("DELETE", odd.id, {"reason": "congestion"}, 204)]
