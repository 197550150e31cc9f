"""``Engine.preview`` says what ``authorize`` would return: the same decision for the same call on
a copy of the same state, in shadow mode too (the refusals that stand and the ones let go), with
the verdict if enforced beside it, and without a trace (no event)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from factories import (
    ACME,
    PARIS,
    UK_MOBILE,
    make_attempt,
    make_extension,
    make_snapshot,
    make_tenant,
    money,
)

from guard.domain import CallAttempt, Reason, Result, UaLockMode
from guard.engine import Engine, EngineSettings, Preview, SnapshotHolder
from guard.events import Event, EventBus
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.shadow import shadow_prefix
from guard.snapshot import Snapshot

NOON = datetime(2024, 6, 5, 12, 0, tzinfo=UTC).timestamp()  # a Wednesday
#: Appended to the live and shadow prefixes for the copy of the counters.
TWIN = "-twin"

Twin = Callable[[Engine], Awaitable[Engine]]


@pytest.fixture
async def twin(redis_url: str, key_prefix: str, async_redis: aioredis.Redis) -> AsyncIterator[Twin]:
    """An engine like the one given, on a copy of its counters (live and shadow) made now, so
    that ``authorize`` there leaves alone the state the original previews."""
    prefixes = (key_prefix, shadow_prefix(key_prefix))
    ledgers: list[RedisLedger] = []

    async def clear() -> None:
        for prefix in prefixes:
            async for key in async_redis.scan_iter(match=f"{prefix}{TWIN}:*", count=1000):
                await async_redis.delete(key)

    async def copy(engine: Engine) -> Engine:
        await clear()
        for prefix in prefixes:
            async for key in async_redis.scan_iter(match=f"{prefix}:*", count=1000):
                name = prefix + TWIN + key.decode()[len(prefix) :]
                ttl, value = max(await async_redis.pttl(key), 0), await async_redis.dump(key)
                assert value is not None
                await async_redis.restore(name, ttl, value, replace=True)
        live, shadow = (ledger_from_url(redis_url, prefix=p + TWIN, timeout=1.0) for p in prefixes)
        ledgers.extend((live, shadow))
        return Engine(
            engine.snapshots,
            live,
            EventBus(),
            engine.settings,
            clock=engine.clock,
            perimeter=engine.perimeter,
            shadow_ledger=None if engine.shadow_ledger is None else shadow,
        )

    yield copy
    for ledger in ledgers:
        await ledger.close()
    await clear()


def _engine(
    live: RedisLedger, shadow: RedisLedger | None, snapshot: Snapshot
) -> tuple[Engine, list[Event]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.add_sink(seen.append)
    engine = Engine(
        SnapshotHolder(snapshot),
        live,
        bus,
        EngineSettings(grace_seconds=30),
        clock=lambda: NOON,
        shadow_ledger=shadow,
    )
    return engine, seen


async def _preview(
    engine: Engine, events: list[Event], twin: Twin, attempt: CallAttempt
) -> Preview:
    """``engine``'s preview of ``attempt``, checked to decide what ``authorize`` returns for it
    on a copy of the same state (but the reservation), and to emit nothing."""
    copy = await twin(engine)
    emitted = len(events)
    preview = await engine.preview(attempt)
    assert len(events) == emitted
    authorized = await copy.authorize(attempt)
    await copy.drain()
    assert preview.decision == dataclasses.replace(authorized, reserved=0)
    return preview


def _verdict(preview: Preview) -> tuple[Result, Reason, int, str]:
    decision = preview.decision
    return decision.result, decision.reason, decision.max_seconds, decision.detail


def _enforced(preview: Preview) -> tuple[Result, Reason, int]:
    assert preview.enforced is not None
    return preview.enforced.result, preview.enforced.reason, preview.enforced.max_seconds


def _runtime(preview: Preview) -> list[tuple[str, Reason | None]]:
    return [(outcome.name, outcome.reason) for outcome in preview.runtime]


def _in_shadow(**tenant: Any) -> Snapshot:
    """acme in shadow mode (1001: 5.00 a day, 2 calls; 1002: international, 20.00, 4 calls)."""
    return make_snapshot(tenants=[make_tenant(shadow=True, **tenant)])


# --- shadow mode -------------------------------------------------------------------------------


async def test_an_allowed_call_goes_out_for_the_tenants_longest_call(
    live: RedisLedger, shadow: RedisLedger, twin: Twin
) -> None:
    engine, events = _engine(live, shadow, _in_shadow())
    preview = await _preview(engine, events, twin, make_attempt(number=UK_MOBILE))
    assert _verdict(preview) == (Result.ALLOW, Reason.ALLOWED, 3600, "shadow")
    # Enforced, 5.00 buys 3000 s of mobile.
    assert _enforced(preview) == (Result.ALLOW, Reason.ALLOWED, 3000)
    assert _runtime(preview) == [("runtime_lock", None), ("shadow_lock", None)]


async def test_a_limit_of_the_shadow_counters_is_let_go_as_shadow(
    live: RedisLedger, shadow: RedisLedger, twin: Twin
) -> None:
    engine, events = _engine(live, shadow, _in_shadow())
    await engine.authorize(make_attempt(number=UK_MOBILE, call_id="first"))
    preview = await _preview(engine, events, twin, make_attempt(number=UK_MOBILE))
    assert _verdict(preview) == (Result.ALLOW, Reason.SHADOW, 3600, "daily_limit_extension")
    assert _enforced(preview) == (Result.DENY, Reason.DAILY_LIMIT_EXTENSION, 0)
    assert preview.limits is not None and preview.limits.reason is Reason.DAILY_LIMIT_EXTENSION
    assert preview.tenant_today is not None and preview.tenant_today.reserved == money("5")


@pytest.mark.parametrize(
    ("tenant", "extension", "attempt", "verdict"),
    [
        # A check's refusal is let go...
        ({}, {}, {"number": PARIS}, (Result.ALLOW, Reason.SHADOW)),
        # ... but an always enforced one stands (an admin's lock in the configuration) ...
        ({}, {"locked": True}, {}, (Result.DENY, Reason.EXTENSION_LOCKED)),
        # ... and a perimeter one while the tenant enforces its perimeter.
        ({}, {}, {"user_agent": "friendly-scanner"}, (Result.DENY, Reason.SCANNER_USER_AGENT)),
        (
            {"shadow_enforce_perimeter": False},
            {},
            {"user_agent": "friendly-scanner"},
            (Result.ALLOW, Reason.SHADOW),
        ),
    ],
)
async def test_a_refusal_of_the_checks_stands_if_shadow_mode_enforces_its_reason(
    live: RedisLedger,
    shadow: RedisLedger,
    twin: Twin,
    tenant: dict[str, Any],
    extension: dict[str, Any],
    attempt: dict[str, Any],
    verdict: tuple[Result, Reason],
) -> None:
    snapshot = make_snapshot(
        tenants=[make_tenant(shadow=True, **tenant)], extensions=[make_extension(**extension)]
    )
    engine, events = _engine(live, shadow, snapshot)
    preview = await _preview(engine, events, twin, make_attempt(**attempt))
    assert (preview.decision.result, preview.decision.reason) == verdict
    assert preview.enforced is not None and preview.enforced.result is Result.DENY
    assert preview.decision.detail in ("", preview.enforced.reason)
    assert preview.limits is None and preview.runtime == ()


async def test_a_lock_in_the_live_counters_stands(
    live: RedisLedger, shadow: RedisLedger, twin: Twin
) -> None:
    await live.lock_extension(ACME, "1001", "admin", now=NOON)
    engine, events = _engine(live, shadow, _in_shadow())
    preview = await _preview(engine, events, twin, make_attempt())
    assert _verdict(preview) == (Result.DENY, Reason.EXTENSION_LOCKED, 0, "")
    assert _enforced(preview) == (Result.DENY, Reason.EXTENSION_LOCKED, 0)
    assert _runtime(preview) == [("runtime_lock", Reason.EXTENSION_LOCKED)]
    assert preview.limits is not None and preview.limits.allowed  # read, for the record


async def test_a_lock_in_the_shadow_counters_is_let_go(
    live: RedisLedger, shadow: RedisLedger, twin: Twin
) -> None:
    await shadow.lock_extension(ACME, "1001", "user_agent_mismatch", now=NOON)
    engine, events = _engine(live, shadow, _in_shadow())
    preview = await _preview(engine, events, twin, make_attempt())
    assert _verdict(preview) == (Result.ALLOW, Reason.SHADOW, 3600, "extension_locked")
    assert _enforced(preview) == (Result.DENY, Reason.EXTENSION_LOCKED, 0)
    assert _runtime(preview) == [("runtime_lock", None), ("shadow_lock", Reason.EXTENSION_LOCKED)]


async def test_a_user_agent_learned_in_the_shadow_counters_that_differs_is_let_go(
    live: RedisLedger, shadow: RedisLedger, twin: Twin
) -> None:
    snapshot = make_snapshot(
        tenants=[make_tenant(shadow=True)],
        extensions=[make_extension("1001", ua_mode=UaLockMode.LEARN)],
    )
    engine, events = _engine(live, shadow, snapshot)
    await engine.authorize(make_attempt(call_id="first", user_agent="Yealink"))
    preview = await _preview(engine, events, twin, make_attempt(user_agent="MicroSIP"))
    assert _verdict(preview) == (Result.ALLOW, Reason.SHADOW, 3600, "user_agent_mismatch")
    assert not (await shadow.extension_state(ACME, "1001")).locked  # the copy's is, by now


async def test_no_shadow_counters_let_the_call_go_but_a_live_lock_stands(
    live: RedisLedger, twin: Twin
) -> None:
    engine, events = _engine(live, None, _in_shadow())
    preview = await _preview(engine, events, twin, make_attempt())
    assert _verdict(preview) == (Result.ALLOW, Reason.SHADOW, 3600, "store_unavailable")
    assert _enforced(preview) == (Result.DENY, Reason.STORE_UNAVAILABLE, 0)  # fail mode deny
    assert preview.store_error == "no shadow counters in this process"
    assert _runtime(preview) == [("runtime_lock", None)]
    await live.lock_extension(ACME, "1001", "admin", now=NOON)
    preview = await _preview(engine, events, twin, make_attempt())
    assert _verdict(preview) == (Result.DENY, Reason.EXTENSION_LOCKED, 0, "")


async def test_emergency_calls_are_not_shadowed(
    live: RedisLedger, shadow: RedisLedger, twin: Twin
) -> None:
    engine, events = _engine(live, shadow, _in_shadow())
    preview = await _preview(engine, events, twin, make_attempt(number="112"))
    assert preview.decision.reason is Reason.EMERGENCY
    assert preview.enforced is None and not preview.shadow


# --- enforced: the ledger's checks before the limits -------------------------------------------


async def test_enforced_an_allowed_call_and_a_runtime_lock(
    live: RedisLedger, shadow: RedisLedger, twin: Twin
) -> None:
    engine, events = _engine(live, shadow, make_snapshot())
    preview = await _preview(engine, events, twin, make_attempt(number=UK_MOBILE))
    assert _verdict(preview) == (Result.ALLOW, Reason.ALLOWED, 3000, "")
    assert preview.enforced is None and not preview.shadow
    await live.lock_extension(ACME, "1001", "admin", now=NOON)
    preview = await _preview(engine, events, twin, make_attempt(number=UK_MOBILE))
    assert _verdict(preview) == (Result.DENY, Reason.EXTENSION_LOCKED, 0, "")
    assert _runtime(preview) == [("runtime_lock", Reason.EXTENSION_LOCKED)]
    assert preview.limits is not None and preview.limits.allowed


async def test_enforced_a_learned_user_agent_that_differs(
    live: RedisLedger, shadow: RedisLedger, twin: Twin
) -> None:
    snapshot = make_snapshot(extensions=[make_extension("1001", ua_mode=UaLockMode.LEARN)])
    engine, events = _engine(live, shadow, snapshot)
    await engine.authorize(make_attempt(call_id="first", user_agent="Yealink"))
    preview = await _preview(engine, events, twin, make_attempt(user_agent="MicroSIP"))
    assert _verdict(preview) == (Result.DENY, Reason.USER_AGENT_MISMATCH, 0, "")
    assert preview.runtime[0].detail.startswith("differs from the learned User-Agent 'Yealink'")
    assert not (await live.extension_state(ACME, "1001")).locked
