"""Live calls: listing them from the ledger, hanging them up over ARI (the stand-in) from the CLI
and from the alert rule on a User-Agent mismatch, and the audit trail of every admin hang-up.
Calls of tenants in shadow mode, on the shadow counters: listed, marked, never hung up.

The CLI runs in a thread (``guard`` calls ``asyncio.run`` itself) while the ARI stand-in serves on
the test's event loop; the ledger is the real Redis under the test's key prefix."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from cli_support import GuardCli
from click.testing import Result
from factories import LONDON, make_attempt, make_extension, make_snapshot
from ledger_support import DAY, NOW, request

from guard.ari.client import AriClient
from guard.ari.testing import AriStandIn
from guard.calls import HangupIncomplete, HangupOnMismatch, hangup_calls
from guard.config.db import make_engine
from guard.domain import Reason, UaLockMode
from guard.domain import Result as Verdict
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.events import Event, EventBus, EventKind
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger

PASSWORD = "s3cret-Pa55"


@pytest.fixture
async def ari() -> AsyncIterator[AriStandIn]:
    async with AriStandIn(username="guard", password=PASSWORD) as standin:
        yield standin


@pytest.fixture
async def ledger(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    store = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    yield store
    await store.close()


@pytest.fixture
async def guard(sqlite_url: str, key_prefix: str, ari: AriStandIn) -> GuardCli:
    cli = GuardCli(sqlite_url, key_prefix)
    cli.env.update(
        GUARD_ARI_URL=ari.base_url, GUARD_ARI_PASSWORD=PASSWORD, GUARD_LOG_LEVEL="warning"
    )

    def configure() -> None:
        cli.run("db", "upgrade")
        cli.run("tenant", "add", "acme", "--daily", "50")
        cli.run("tenant", "add", "other")
        for name in ("100", "200"):
            cli.run("ext", "add", name, "--tenant", "acme")

    await asyncio.to_thread(configure)
    return cli


async def run(guard: GuardCli, *args: str, code: int = 0) -> Result:
    return await asyncio.to_thread(guard.run, *args, code=code)


async def live(
    ledger: RedisLedger,
    ari: AriStandIn,
    call_id: str,
    *,
    tenant: str = "acme",
    ext: str = "100",
    now: float = NOW,
) -> None:
    """A call that came in by FastAGI (its channel never in Stasis) and holds a reservation on
    ``ledger`` (the live counters, or the shadow ones for a call in shadow mode)."""
    channel = ari.add_channel(channel_id=call_id)
    granted = await ledger.reserve(
        request(tenant=tenant, extension=ext, call_id=call_id, channel=channel.name, now=now)
    )
    assert granted.allowed


async def acme_counters(ledger: RedisLedger, shadow: RedisLedger) -> tuple[object, ...]:
    """Everything both counters hold for acme today: spend, reservations, calls."""
    return (
        await ledger.counters("acme", DAY),
        await shadow.counters("acme", DAY),
        await ledger.live_calls("acme"),
        await shadow.live_calls("acme"),
    )


def hung_up(ari: AriStandIn) -> list[str]:
    return sorted(c.path.rsplit("/", 1)[-1] for c in ari.calls if c.method == "DELETE")


def audit(guard: GuardCli) -> list[dict[str, Any]]:
    engine = make_engine(guard.env["GUARD_DATABASE_URL"] or "")
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT tenant, extension, actor, detail FROM audit_events "
                    "WHERE kind = 'admin.calls.hangup' ORDER BY id"
                )
            ).all()
    finally:
        engine.dispose()
    return [{"tenant": t, "extension": e, "actor": a, **json.loads(d)} for t, e, a, d in rows]


async def test_calls_hangup_of_a_tenant_ends_every_live_call_and_audits_it(
    guard: GuardCli, ledger: RedisLedger, ari: AriStandIn
) -> None:
    for call_id, ext in (("c1", "100"), ("c2", "100"), ("c3", "200")):
        await live(ledger, ari, call_id, ext=ext)
    await live(ledger, ari, "elsewhere", tenant="other")
    result = await run(guard, "calls", "hangup", "--tenant", "acme")
    assert "hung up 3 live call(s) of tenant acme" in result.output
    assert hung_up(ari) == ["c1", "c2", "c3"]
    assert all(c.status == 204 and c.params == {"reason": "normal"} for c in ari.calls)
    (row,) = await asyncio.to_thread(audit, guard)
    assert (row["tenant"], row["extension"], sorted(row["hung_up"])) == (
        "acme",
        "",
        ["c1", "c2", "c3"],
    )
    assert row["actor"] and row["failed"] is False


async def test_calls_hangup_of_one_extension_or_one_channel(
    guard: GuardCli, ledger: RedisLedger, ari: AriStandIn
) -> None:
    for call_id, ext in (("c1", "100"), ("c2", "200"), ("c3", "200")):
        await live(ledger, ari, call_id, ext=ext)
    await run(guard, "calls", "hangup", "--tenant", "acme", "--ext", "200")
    assert hung_up(ari) == ["c2", "c3"]
    result = await run(guard, "calls", "hangup", "--channel", "c1")
    assert "hung up 1 live call(s) of channel c1" in result.output
    gone = await run(guard, "calls", "hangup", "--channel", "c1")  # already gone: nothing
    assert "hung up 0 live call(s)" in gone.output
    rows = await asyncio.to_thread(audit, guard)
    assert [(r["extension"], r["channel"], r["hung_up"]) for r in rows] == [
        ("200", None, ["c2", "c3"]),
        ("", "c1", ["c1"]),
        ("", "c1", []),
    ]


async def test_calls_list_shows_the_live_calls(
    guard: GuardCli, ledger: RedisLedger, ari: AriStandIn
) -> None:
    await live(ledger, ari, "c1")
    await live(ledger, ari, "c2", ext="200")
    listed = json.loads(
        (await run(guard, "calls", "list", "--tenant", "acme", "--ext", "200", "--json")).stdout
    )
    assert [(c["channel_id"], c["extension"], c["number"], c["mode"]) for c in listed] == [
        ("c2", "200", "33123456789", "call")
    ]
    assert listed[0]["max_seconds"] == 3600 and listed[0]["started"].startswith("2024-05-01")
    table = (await run(guard, "calls", "list")).output
    assert "c1" in table and "c2" in table and "France" in table


async def test_calls_list_marks_the_shadow_calls_of_tenants_in_shadow_mode(
    guard: GuardCli, ledger: RedisLedger, shadow: RedisLedger, ari: AriStandIn
) -> None:
    await run(guard, "tenant", "set", "acme", "--shadow", "on")
    await run(guard, "ext", "add", "300", "--tenant", "other")
    await live(ledger, ari, "c1")  # reserved before acme went into shadow mode
    await live(shadow, ari, "s1", ext="200", now=NOW + 1)
    await live(ledger, ari, "o1", tenant="other", ext="300", now=NOW + 2)
    # Left over from an earlier trial of other's: not read while other enforces.
    await live(shadow, ari, "o2", tenant="other", ext="300", now=NOW + 3)
    listed = json.loads((await run(guard, "calls", "list", "--json")).stdout)
    assert [(c["channel_id"], c["tenant"], c["shadow"]) for c in listed] == [
        ("c1", "acme", False),
        ("s1", "acme", True),
        ("o1", "other", False),
    ]
    only = json.loads(
        (await run(guard, "calls", "list", "--tenant", "acme", "--ext", "200", "--json")).stdout
    )
    assert [(c["channel_id"], c["shadow"]) for c in only] == [("s1", True)]
    table = (await run(guard, "calls", "list")).output.splitlines()
    marks = {line.split()[3]: line.split()[0] for line in table[1:] if "SIP/" in line}
    assert marks == {"c1": "live", "s1": "SHADOW", "o1": "live"}
    assert table[0].startswith("COUNTERS") and table[-1].startswith("SHADOW calls:")
    # One extension of other in shadow mode puts other in shadow mode: its shadow calls show.
    await run(guard, "ext", "set", "300", "--tenant", "other", "--shadow", "on")
    listed = json.loads((await run(guard, "calls", "list", "--tenant", "other", "--json")).stdout)
    assert [(c["channel_id"], c["shadow"]) for c in listed] == [("o1", False), ("o2", True)]


async def test_calls_hangup_refuses_a_shadow_call_and_changes_no_counter(
    guard: GuardCli, ledger: RedisLedger, shadow: RedisLedger, ari: AriStandIn
) -> None:
    await run(guard, "tenant", "set", "acme", "--shadow", "on")
    await live(shadow, ari, "s1")
    before = await acme_counters(ledger, shadow)
    for scope in ([], ["--tenant", "acme"]):
        result = await run(guard, "calls", "hangup", "--channel", "s1", *scope, code=1)
        assert "channel s1 is a call in shadow mode of tenant acme" in result.output
        assert "nothing was hung up" in result.output
    assert ari.calls == []  # ARI never asked
    assert await acme_counters(ledger, shadow) == before
    rows = await asyncio.to_thread(audit, guard)
    assert [(r["channel"], r["hung_up"], r["shadow"]) for r in rows] == [("s1", [], ["s1"])] * 2


async def test_hangup_of_a_tenant_or_extension_leaves_its_shadow_calls_running(
    guard: GuardCli, ledger: RedisLedger, shadow: RedisLedger, ari: AriStandIn
) -> None:
    await run(guard, "ext", "set", "200", "--tenant", "acme", "--shadow", "on")
    await live(ledger, ari, "c1")
    await live(shadow, ari, "s1", ext="200")
    await live(shadow, ari, "s2", ext="200")
    shadow_before = (await shadow.counters("acme", DAY), await shadow.live_calls("acme"))
    result = await run(guard, "calls", "hangup", "--tenant", "acme")
    assert "hung up 1 live call(s) of tenant acme" in result.stdout
    assert "2 call(s) in shadow mode of tenant acme left running" in result.stderr
    locked = await run(guard, "ext", "lock", "200", "--tenant", "acme", "--hangup")
    assert "hung up 0 live call(s) of extension 200" in locked.stdout
    assert "2 call(s) in shadow mode of extension 200 of tenant acme left" in locked.stderr
    assert hung_up(ari) == ["c1"]
    assert (await shadow.counters("acme", DAY), await shadow.live_calls("acme")) == shadow_before
    rows = await asyncio.to_thread(audit, guard)
    assert [(r["extension"], r["hung_up"], r["shadow"]) for r in rows] == [
        ("", ["c1"], ["s1", "s2"]),
        ("200", [], ["s1", "s2"]),
    ]


async def test_ext_lock_with_hangup_locks_and_cuts_the_extension_calls(
    guard: GuardCli, ledger: RedisLedger, ari: AriStandIn
) -> None:
    await live(ledger, ari, "c1")
    await live(ledger, ari, "c2", ext="200")
    result = await run(guard, "ext", "lock", "100", "--tenant", "acme", "--hangup")
    assert "hung up 1 live call(s) of extension 100" in result.output
    assert hung_up(ari) == ["c1"]
    assert (await ledger.extension_state("acme", "100")).locked
    (row,) = await asyncio.to_thread(audit, guard)
    assert (row["extension"], row["hung_up"]) == ("100", ["c1"])
    await run(guard, "ext", "lock", "200", "--tenant", "acme")  # without --hangup: calls go on
    assert hung_up(ari) == ["c1"]


async def test_hangup_commands_need_ari_and_a_known_tenant(
    guard: GuardCli, ledger: RedisLedger, ari: AriStandIn
) -> None:
    await live(ledger, ari, "c1")
    unset = await asyncio.to_thread(
        guard.run, "calls", "hangup", "--tenant", "acme", code=2, GUARD_ARI_URL=""
    )
    assert "GUARD_ARI_URL" in unset.output
    missing = await run(guard, "calls", "hangup", "--tenant", "nope", code=1)
    assert "nope" in missing.output
    usage = await run(guard, "calls", "hangup", code=2)
    assert "--tenant" in usage.output
    assert hung_up(ari) == []


async def test_ari_down_reports_what_was_not_hung_up_and_still_audits(
    guard: GuardCli, ledger: RedisLedger, ari: AriStandIn
) -> None:
    await live(ledger, ari, "c1")
    result = await asyncio.to_thread(
        guard.run,
        "calls",
        "hangup",
        "--tenant",
        "acme",
        code=1,
        GUARD_ARI_URL="http://127.0.0.1:9/ari",
        GUARD_ARI_TIMEOUT="0.5",
    )
    assert "1 call(s) not hung up" in result.output
    (row,) = await asyncio.to_thread(audit, guard)
    assert (row["hung_up"], row["failed"]) == ([], True)


async def test_hangup_calls_skips_channels_already_gone(
    ledger: RedisLedger, ari: AriStandIn
) -> None:
    await live(ledger, ari, "c1")
    await ledger.reserve(request(call_id="ghost"))  # its channel is gone: a lost hang-up
    async with AriClient(ari.base_url, "guard", PASSWORD) as client:
        assert await hangup_calls(ledger, client, "acme") == ["c1"]
        assert await hangup_calls(ledger, client, "acme", "200") == []
    async with AriClient("http://127.0.0.1:9/ari", "guard", PASSWORD, timeout=0.5) as down:
        with pytest.raises(HangupIncomplete) as caught:
            await hangup_calls(ledger, down, "acme")
    assert caught.value.hung_up == [] and len(caught.value.failed) == 2


async def test_user_agent_mismatch_locks_the_extension_and_hangs_up_its_calls(
    ledger: RedisLedger, ari: AriStandIn
) -> None:
    snapshot = make_snapshot(extensions=[make_extension("1001", ua_mode=UaLockMode.LEARN)])
    bus = EventBus()
    seen: list[Event] = []
    bus.add_sink(seen.append)
    engine = Engine(SnapshotHolder(snapshot), ledger, bus, EngineSettings(), clock=lambda: NOW)
    async with AriClient(ari.base_url, "guard", PASSWORD) as client:
        sink = HangupOnMismatch(ledger, client, bus)
        bus.add_sink(sink)
        ari.add_channel(channel_id="legit")
        first = await engine.authorize(make_attempt(call_id="legit", number=LONDON))
        assert first.result is Verdict.ALLOW
        stolen = await engine.authorize(
            make_attempt(call_id="intruder", user_agent="friendly-phone 1.0")
        )
        assert stolen.reason is Reason.USER_AGENT_MISMATCH
        await sink.drain()
    assert hung_up(ari) == ["legit"]
    assert (await ledger.extension_state("acme", "1001")).locked
    cut = [e for e in seen if e.kind == EventKind.CALL_CUT]
    assert [(e.reason, e.extension, e.call_id) for e in cut] == [
        (Reason.USER_AGENT_MISMATCH, "1001", "legit")
    ]


async def test_guard_ari_without_ari_settings_is_a_usage_error(guard: GuardCli) -> None:
    result = await asyncio.to_thread(guard.run, "ari", code=2, GUARD_ARI_URL="")
    assert "GUARD_ARI_URL" in result.output
