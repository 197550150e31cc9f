"""``guard serve`` end to end: real server, real Redis, SQLite config, the shipped dialplan.

The recorded Asterisk sessions are replayed byte for byte against a running ``serve()``; the
shipped ``dialplan/extensions_guard.conf`` is run by the dialplan interpreter, whose ``AGI()``
application opens real FastAGI sessions the way Asterisk does (the environment block of a real
session, with the request, channel and extension of this call). This is the issue's "done when":
a call within budget goes out with the right limit, one over a limit is refused, the real cost is
settled once, and a burst of parallel calls never overshoots a limit.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from dialplan_sim import Channel, Dialplan

from guard.agi.testing import FakeAsterisk, Transcript, load_transcripts, replace_environment
from guard.config import db, repository
from guard.domain import DestinationClass, Rate
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.money import call_cost, parse_money
from guard.schedule import tenant_day
from guard.service import serve
from guard.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
DIALPLAN = REPO / "dialplan" / "extensions_guard.conf"
UK_NATIONAL = Rate("44", "United Kingdom", DestinationClass.NATIONAL, parse_money("0.02"), 0, 1, 1)
UK_MOBILE = Rate("447", "UK mobile", DestinationClass.MOBILE, parse_money("0.10"), 0, 60, 60)
FRANCE = Rate("33", "France", DestinationClass.INTERNATIONAL, parse_money("0.08"), 0, 1, 1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _configure(url: str) -> None:
    db.upgrade(url)
    engine = db.make_engine(url)
    actor = "test"
    repository.add_tenant(
        engine,
        "acme",
        actor=actor,
        timezone="Europe/London",
        currency="GBP",
        country_code="44",
        daily_limit=parse_money("50"),
        concurrent_limit=20,
    )
    repository.add_extension(
        engine, "acme", "1001", actor=actor, profile="domestic", daily_limit=parse_money("5")
    )
    repository.add_extension(
        engine, "acme", "loopback", actor=actor, profile="domestic", daily_limit=parse_money("5")
    )
    repository.add_extension(
        engine,
        "acme",
        "2002",
        actor=actor,
        profile="domestic",
        daily_limit=parse_money("1"),
        concurrent_limit=100,
    )
    repository.import_rates(engine, [UK_NATIONAL, UK_MOBILE, FRANCE], actor=actor)
    engine.dispose()


class Running:
    def __init__(self, settings: Settings, ledger: RedisLedger, port: int) -> None:
        self.settings = settings
        self.ledger = ledger
        self.port = port
        self.asterisk = FakeAsterisk("127.0.0.1", port)

    async def spent_today(self, extension: str | None = None) -> tuple[int, int]:
        import time

        counters = await self.ledger.counters("acme", tenant_day("Europe/London", time.time()))
        scope = counters.total if extension is None else counters.extensions.get(extension)
        return (scope.spent, scope.reserved) if scope else (0, 0)


@pytest.fixture
async def running(tmp_path: Path, redis_url: str, key_prefix: str) -> AsyncIterator[Running]:
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    await asyncio.to_thread(_configure, url)
    port = _free_port()
    settings = replace(
        load_settings({}),
        database_url=url,
        redis_url=redis_url,
        redis_prefix=key_prefix,
        redis_timeout_ms=1000,
        agi_listen=(("127.0.0.1", port),),
    )
    started = asyncio.Event()
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, drain_seconds=2, started=started, until=stop))
    await asyncio.wait_for(started.wait(), 10)
    ledger = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    try:
        yield Running(settings, ledger, port)
    finally:
        stop.set_result(None)
        await asyncio.wait_for(task, 10)
        await ledger.close()


@pytest.fixture(scope="module")
def transcripts(shared_dir: Path) -> dict[str, Transcript]:
    return load_transcripts(shared_dir / "asterisk" / "agi-sessions.jsonl")


async def test_recorded_sessions_replayed_byte_for_byte(
    running: Running, transcripts: dict[str, Transcript]
) -> None:
    # chan_sip 1001 from 127.0.0.7 dials 00441234567: a UK national number at 0.02/min.
    auth = await running.asterisk.play(transcripts["authorize-chan_sip"])
    assert auth.closed_by_server
    variables = auth.variables
    assert variables["GUARD_RESULT"] == "ALLOW", variables
    assert variables["GUARD_REASON"] == "allowed"
    # 5.00 buys 250 minutes at 0.02: the tenant's 3600 s cap binds.
    assert variables["GUARD_MAX_SECONDS"] == "3600"
    assert variables["GUARD_TENANT"] == "acme"
    spent, reserved = await running.spent_today("1001")
    assert (spent, reserved) == (0, call_cost(UK_NATIONAL, 3600))

    settle = await running.asterisk.play(transcripts["settle-chan_sip"])
    assert settle.variables["GUARD_SETTLED"] == "settled"
    assert await running.spent_today("1001") == (call_cost(UK_NATIONAL, 5), 0)
    # The hangup handler running twice (a retry) changes nothing.
    again = await running.asterisk.play(transcripts["settle-chan_sip"])
    assert again.variables["GUARD_SETTLED"] == "already_settled"
    assert await running.spent_today("1001") == (call_cost(UK_NATIONAL, 5), 0)


async def test_hostile_user_agent_is_refused_as_a_whole_value(
    running: Running, transcripts: dict[str, Transcript]
) -> None:
    # The query carries the UA whole; it is no scanner, so the call itself is allowed and
    # the split quoted arguments (agi_arg_3..5) are never trusted.
    auth = await running.asterisk.play(transcripts["authorize-hostile-ua"])
    assert auth.variables["GUARD_RESULT"] == "ALLOW"
    assert auth.variables["GUARD_MAX_SECONDS"] == "3600"


class AsteriskAGI:
    """The dialplan interpreter's ``AGI()``: a real FastAGI session per call, like Asterisk."""

    def __init__(self, asterisk: FakeAsterisk, base: Transcript, uniqueid: str) -> None:
        self.asterisk = asterisk
        self.base = base
        self.uniqueid = uniqueid

    async def __call__(self, data: str, channel: Channel) -> None:
        url = data.split(",")[0]
        parts = urlsplit(url)
        if parts.port != self.asterisk.port:
            channel.variables["AGISTATUS"] = "FAILURE"  # nobody listens there
            return
        script = parts.path.lstrip("/") + (f"?{parts.query}" if parts.query else "")
        environment = replace_environment(
            self.base.environment,
            network_script=script,
            request=url,
            uniqueid=self.uniqueid,
            extension=channel.variables.get("EXTEN", ""),
        )
        store = self.asterisk.channel(self.uniqueid)
        store.update(channel.variables)
        record = await self.asterisk.play(environment)
        channel.variables.update(record.variables)
        channel.variables["AGISTATUS"] = "SUCCESS"


async def run_call(
    running: Running,
    base: Transcript,
    uniqueid: str,
    number: str,
    *,
    endpoint: str = "loopback",
    answered: int = 0,
    agi_port: int | None = None,
) -> Channel:
    """One PJSIP call through the shipped dialplan: authorize, dial, then the hangup handler."""
    asterisk = running.asterisk
    if agi_port is not None:
        asterisk = FakeAsterisk("127.0.0.1", agi_port)
    # The operator's ADAPT line: where guard serve listens.
    text = DIALPLAN.read_text().replace("agi://127.0.0.1:4573", f"agi://127.0.0.1:{running.port}")
    assert str(running.port) in text
    dialplan = Dialplan(text, agi=AsteriskAGI(asterisk, base, uniqueid))
    channel = Channel(
        variables={"GUARD_TENANT": "acme"},
        functions={
            "CHANNEL(endpoint)": endpoint,
            "CHANNEL(pjsip,remote_addr)": "127.0.0.8:5063",
            "PJSIP_HEADER(read,User-Agent)": 'Grandstream GXP2170 "(evil" ip=6.6.6.6',
            "CALLERID(num)": "1001",
        },
    )
    await dialplan.run("guard-outbound-pjsip", number, channel)
    if channel.dialed and answered:
        channel.variables["ANSWEREDTIME"] = str(answered)
    await dialplan.run_hangup_handlers(channel)
    return channel


async def test_shipped_dialplan_allows_within_budget_with_the_right_limit(
    running: Running, transcripts: dict[str, Transcript]
) -> None:
    base = transcripts["authorize-pjsip"]
    channel = await run_call(running, base, "900.1", "07700900123", answered=61)
    # 5.00 at 0.10/min in 60 s steps: 50 minutes; the dialplan dials with L(3000000).
    assert channel.dialed == ["PJSIP/07700900123@carrier,60,L(3000000)"]
    assert channel.variables["GUARD_SETTLED"] == "settled"
    assert await running.spent_today("loopback") == (call_cost(UK_MOBILE, 61), 0)


async def test_shipped_dialplan_refuses_a_call_over_the_limit(
    running: Running, transcripts: dict[str, Transcript]
) -> None:
    base = transcripts["authorize-pjsip"]
    first = await run_call(running, base, "901.1", "07700900123", answered=3000)
    assert first.dialed and first.variables["GUARD_SETTLED"] == "settled"
    second = await run_call(running, base, "901.2", "07700900124")
    assert second.dialed == []
    assert second.hangup_cause == "21"
    assert second.variables["GUARD_REASON"] == "daily_limit_extension"
    assert "GUARD_SETTLED" not in second.variables  # nothing reserved, nothing to settle
    assert await running.spent_today("loopback") == (parse_money("5"), 0)


async def test_shipped_dialplan_refuses_a_profile_without_international(
    running: Running, transcripts: dict[str, Transcript]
) -> None:
    channel = await run_call(running, transcripts["authorize-pjsip"], "902.1", "0033140000000")
    assert channel.dialed == [] and channel.variables["GUARD_REASON"] == "class_not_allowed"


async def test_shipped_dialplan_fails_closed_when_guard_is_down(
    running: Running, transcripts: dict[str, Transcript]
) -> None:
    channel = await run_call(
        running, transcripts["authorize-pjsip"], "903.1", "07700900123", agi_port=_free_port()
    )
    assert channel.variables["AGISTATUS"] == "FAILURE"
    assert channel.dialed == [] and channel.hangup_cause == "21"


async def test_parallel_burst_never_overshoots_the_daily_limit(
    running: Running, transcripts: dict[str, Transcript]
) -> None:
    # 2002 has 1.00 a day; a UK mobile minute costs 0.10: exactly 10 one-minute calls fit.
    # Cap the call length to one minute so each reservation is one minimal call.
    engine = db.make_engine(running.settings.database_url)
    repository.set_tenant(engine, "acme", actor="test", max_call_seconds=60)
    version = repository.read_version(engine)
    engine.dispose()
    await running.ledger.bump_config_version(version)
    await asyncio.sleep(running.settings.reload_interval + 1)

    base = transcripts["authorize-local"]  # tenant acme, ext 2002, from 203.0.113.50

    async def attempt(i: int) -> dict[str, str]:
        environment = replace_environment(
            base.environment,
            uniqueid=f"904.{i}",
            extension="07700900123",
            network_script=base.request.replace("ip=203.0.113.50", "ip=192.0.2.1"),
        )
        return (await running.asterisk.play(environment)).variables

    results = await asyncio.gather(*(attempt(i) for i in range(60)))
    allowed = [r for r in results if r.get("GUARD_RESULT") == "ALLOW"]
    assert len(allowed) == 10
    assert all(r["GUARD_MAX_SECONDS"] == "60" for r in allowed)
    refused = {r.get("GUARD_REASON") for r in results if r.get("GUARD_RESULT") != "ALLOW"}
    assert refused == {"daily_limit_extension"}
    spent, reserved = await running.spent_today("2002")
    assert spent + reserved == parse_money("1.00")
