"""``guard check`` end to end on SQLite and Redis: the demo's calls are allowed or refused with
the right reason code and exit status, and the dry run reads today's counters, runtime locks, the
IP blocks and threat lists, and shows what shadow mode would do, without writing anything."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
import redis
from cli_support import CLOSED, LONDON, OFFICE_IP, PARIS, REDIS_URL, GuardCli, check_args

from guard.domain import DestinationClass, Rate, UaLockMode
from guard.ledger import RedisLedger, ledger_from_url
from guard.ledger.types import ReserveRequest
from guard.money import parse_money
from guard.shadow import shadow_prefix

_T = TypeVar("_T")


@pytest.fixture
def guard(sqlite_url: str, key_prefix: str) -> Iterator[GuardCli]:
    cli = GuardCli(sqlite_url, key_prefix)
    cli.run("db", "upgrade")
    cli.run("demo")
    yield cli
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{shadow_prefix(key_prefix)}:*", count=1000):
        client.delete(key)
    client.close()


def test_demo_allows_a_local_call_from_the_office(guard: GuardCli) -> None:
    result = guard.run(*check_args("1001", LONDON))
    assert result.stdout.startswith("ALLOW  allowed")
    assert "442079460000" in result.stdout
    assert "4420 United Kingdom - London (local)" in result.stdout
    assert "max seconds  3600" in result.stdout


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (check_args("1001", PARIS), "class_not_allowed"),
        (check_args("1001", LONDON, ip="203.0.113.7"), "source_ip_not_allowed"),
        (check_args("1001", LONDON, at=CLOSED), "outside_time_window"),
        (check_args("1001", LONDON, ua="friendly-scanner"), "scanner_user_agent"),
        (check_args("1002", "09098790000"), "rate_above_cap"),
        (check_args("1002", "008821234567"), "destination_blocked"),
        (check_args("1002", PARIS, ua="Grandstream GXP2170"), "user_agent_mismatch"),
        (check_args("1003", LONDON), "unknown_extension"),
    ],
)
def test_demo_refusals_carry_their_reason_and_exit_1(
    guard: GuardCli, args: list[str], reason: str
) -> None:
    result = guard.run(*args, code=1)
    assert result.stdout.startswith(f"DENY  {reason}")
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert reason in failed[0]


def test_json_lists_every_check_the_destination_and_the_limits(guard: GuardCli) -> None:
    report = guard.json(*check_args("1002", PARIS))
    assert (report["result"], report["reason"]) == ("ALLOW", "allowed")
    assert report["number"] == "33140000000"
    assert report["destination"]["prefix"] == "33"
    assert report["destination"]["rate_per_minute"] == "0.0200"
    assert report["destination"]["rate_per_minute_units"] == 200
    names = [check["name"] for check in report["checks"]]
    assert names[:4] == ["tenant", "number", "extension", "scanner"]
    assert {"source_ip", "time_window", "rate", "destination", "class", "rate_cap"} <= set(names)
    assert names[-2:] == ["runtime_lock", "limits"]
    assert all(check["passed"] for check in report["checks"])
    assert report["limits"]["extension"]["daily_limit"] == "10.0000"
    assert report["limits"]["tenant"]["concurrent_limit"] == 4
    assert report["today"]["day"] == "20300107"
    assert report["today"]["tenant"]["spent_units"] == 0
    assert report["at"] == "2030-01-07T10:00:00+00:00"


def test_json_of_a_refusal_keeps_every_outcome_computed(guard: GuardCli) -> None:
    report = guard.json(*check_args("1001", PARIS, at=CLOSED, ua="sipvicious"), code=1)
    assert report["reason"] == "scanner_user_agent"
    failed = {check["name"]: check["reason"] for check in report["checks"] if not check["passed"]}
    assert failed == {
        "scanner": "scanner_user_agent",
        "time_window": "outside_time_window",
        "class": "class_not_allowed",
    }
    assert report["max_seconds"] == 0


def test_a_time_without_offset_is_the_tenants_local_time(guard: GuardCli) -> None:
    # 06:30 in London is before the 07:00 opening; 06:30 UTC is 07:30 in London (summer time).
    guard.run(*check_args("1001", LONDON, at="2030-07-01T06:30"), code=1)
    report = guard.json(*check_args("1001", LONDON, at="2030-07-01T06:30+00:00"))
    assert report["at"] == "2030-07-01T07:30:00+01:00"


MONDAY = datetime(2030, 1, 7, 9, 0, tzinfo=ZoneInfo("Europe/London")).timestamp()
PREMIUM = Rate("4490", "premium", DestinationClass.PREMIUM, parse_money("5"))


async def _call(ledger: RedisLedger, call_id: str, seconds: int, **changes: Any) -> None:
    """One call of extension 1001 on the demo's Monday, settled after ``seconds``."""
    request = ReserveRequest(
        tenant="demo",
        extension="1001",
        call_id=call_id,
        day="20300107",
        now=MONDAY,
        rate=PREMIUM,
        number="449098790000",
        ext_daily_limit=None,
        tenant_daily_limit=None,
        ext_concurrent_limit=None,
        tenant_concurrent_limit=None,
        max_call_seconds=60,
    )
    await ledger.reserve(dataclasses.replace(request, **changes))
    await ledger.settle("demo", call_id, seconds, MONDAY + seconds)


def test_todays_spend_counts_against_the_daily_limit(guard: GuardCli) -> None:
    guard.ledger(lambda ledger: _call(ledger, "earlier-call", 60))
    report = guard.json(*check_args("1001", LONDON), code=1)
    assert report["reason"] == "daily_limit_extension"
    assert report["today"]["extension"]["spent"] == "5.0000"
    assert report["today"]["tenant"]["spent_units"] == 50_000
    assert report["checks"][-1] == {
        "name": "limits",
        "passed": False,
        "reason": "daily_limit_extension",
        "detail": "see today's counters below",
    }
    assert guard.run(*check_args("1002", PARIS)).stdout.startswith("ALLOW")


def test_a_runtime_lock_refuses_until_unlocked(guard: GuardCli) -> None:
    guard.ledger(lambda ledger: ledger.lock_extension("demo", "1002", "user_agent_mismatch"))
    result = guard.run(*check_args("1002", PARIS), code=1)
    assert result.stdout.startswith("DENY  extension_locked")
    guard.run("ext", "unlock", "1002", "--tenant", "demo")
    guard.run(*check_args("1002", PARIS))


def test_a_learned_user_agent_that_differs_would_lock(guard: GuardCli) -> None:
    guard.run("ext", "set", "1001", "--tenant", "demo", "--ua-mode", "learn")
    report = guard.json(*check_args("1001", LONDON))
    assert report["checks"][-2]["detail"] == "nothing learned yet: would learn it"

    learn = {"ua_mode": UaLockMode.LEARN, "user_agent": "Yealink T21"}
    guard.ledger(lambda ledger: _call(ledger, "first-call", 0, **learn))
    state = guard.json("ext", "show", "1001", "--tenant", "demo")["runtime"]
    assert state["learned_user_agent"] == "Yealink T21"
    report = guard.json(*check_args("1001", LONDON, ua="Yealink T21"))
    assert report["checks"][-2]["detail"] == "matches the learned User-Agent"
    report = guard.json(*check_args("1001", LONDON, ua="Other phone"), code=1)
    assert report["reason"] == "user_agent_mismatch"


def test_emergency_numbers_pass_whatever_else_fails(guard: GuardCli) -> None:
    report = guard.json(*check_args("1001", "999", at=CLOSED, ua="friendly-scanner"))
    assert (report["result"], report["reason"]) == ("ALLOW", "emergency")
    assert [check["name"] for check in report["checks"]] == ["emergency"]


def test_unknown_tenant_is_refused(guard: GuardCli) -> None:
    result = guard.run(
        "check", "-t", "nobody", "-e", "1001", "--to", LONDON, "--ip", "192.0.2.1", code=1
    )
    assert result.stdout.startswith("DENY  unknown_tenant")


def test_counter_store_down_follows_the_fail_mode(guard: GuardCli) -> None:
    down = {"GUARD_REDIS_URL": "redis://127.0.0.1:1/0"}
    report = guard.json(*check_args("1001", LONDON), code=1, **down)
    assert report["reason"] == "store_unavailable"
    assert "127.0.0.1:1" in report["store_error"]
    guard.run("tenant", "set", "demo", "--fail-mode", "allow_local", code=0, **down)
    report = guard.json(*check_args("1001", LONDON), code=0, **down)
    assert (report["result"], report["reason"]) == ("ALLOW", "store_unavailable")


def test_bad_time_is_a_usage_error(guard: GuardCli) -> None:
    result = guard.run(*check_args("1001", LONDON, at="next monday"), code=2)
    assert "--at" in result.output
    assert "ISO 8601" in result.output


# --- the perimeter: IP blocks and threat lists, read as guard serve reads them -----------------


def test_a_blocked_source_ip_is_refused_with_ip_blocked(guard: GuardCli) -> None:
    guard.run("ip", "block", OFFICE_IP, "--reason", "abuse")
    result = guard.run(*check_args("1001", LONDON), code=1)
    assert result.stdout.startswith("DENY  ip_blocked")
    assert f"FAIL    ip_block  ip_blocked  {OFFICE_IP} is blocked until unblocked: abuse" in (
        result.stdout
    )
    report = guard.json(*check_args("1001", LONDON), code=1)
    assert (report["result"], report["reason"], report["max_seconds"]) == ("DENY", "ip_blocked", 0)
    assert [(c["name"], c["reason"]) for c in report["checks"]] == [("ip_block", "ip_blocked")]
    assert report["perimeter_error"] is None and report["shadow"] is None
    # Another address of the office is not blocked; emergency numbers pass a block.
    guard.run(*check_args("1001", LONDON, ip="192.0.2.11"))
    assert guard.json(*check_args("1001", "999"))["reason"] == "emergency"
    guard.run("ip", "unblock", OFFICE_IP)
    guard.run(*check_args("1001", LONDON))


def test_a_timed_block_is_judged_at_the_time_checked(guard: GuardCli) -> None:
    guard.run("ip", "block", OFFICE_IP, "--for", "1h")
    guard.run(*check_args("1001", LONDON))  # --at 2030: the block has ended by then
    now = [arg for arg in check_args("1001", LONDON) if arg not in ("--at", "2030-01-07T10:00")]
    assert guard.run(*now, code=1).stdout.startswith("DENY  ip_blocked")


def test_an_allow_listed_address_is_never_blocked(guard: GuardCli) -> None:
    guard.run("ip", "block", OFFICE_IP)
    guard.run("ip", "allow", "add", "192.0.2.0/24", "--tenant", "demo")
    guard.run(*check_args("1001", LONDON))


def test_threat_lists_are_read(guard: GuardCli, tmp_path: Path) -> None:
    ips, numbers = tmp_path / "ips.txt", tmp_path / "numbers.txt"
    ips.write_text(f"{OFFICE_IP}\n")
    numbers.write_text("4420\n")
    guard.run("threat", "import", str(numbers), "--kind", "number")
    result = guard.run(*check_args("1001", LONDON), code=1)
    assert result.stdout.startswith("DENY  threat_number")
    guard.run("threat", "import", str(ips), "--kind", "ip")
    assert guard.json(*check_args("1001", LONDON), code=1)["reason"] == "threat_list"


def test_an_unreadable_perimeter_is_said_and_the_rest_still_checked(guard: GuardCli) -> None:
    down = {"GUARD_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = guard.run(*check_args("1001", LONDON), code=1, **down)
    assert "warning: IP blocks and threat lists not read, so not checked" in result.stderr
    assert result.stdout.startswith("DENY  store_unavailable")
    report = guard.json(*check_args("1001", LONDON), code=1, **down)
    assert "127.0.0.1:1" in report["perimeter_error"]


# --- shadow mode ---------------------------------------------------------------------------------


def shadow_ledger(guard: GuardCli, operation: Callable[[RedisLedger], Awaitable[_T]]) -> _T:
    """Run ``operation`` on the shadow counters beside the test's ledger."""

    async def run() -> _T:
        prefix = shadow_prefix(guard.key_prefix)
        async with ledger_from_url(guard.redis_url, prefix=prefix, timeout=2) as ledger:
            return await operation(ledger)

    return asyncio.run(run())


def test_shadow_mode_lets_a_refused_call_go_and_tells_the_enforced_reason(
    guard: GuardCli,
) -> None:
    guard.run("tenant", "set", "demo", "--shadow", "on")
    result = guard.run(*check_args("1001", PARIS))
    lines = result.stdout.splitlines()
    assert lines[0] == "ALLOW  shadow"
    assert lines[1].split() == [
        "shadow", "on", "(tenant):", "goes", "out;", "if", "enforced:", "DENY", "class_not_allowed"
    ]  # fmt: skip
    assert "max seconds  3600" in result.stdout
    assert "limits today (20300107, shadow counters)" not in result.stdout  # refused by a check
    report = guard.json(*check_args("1001", PARIS))
    assert (report["result"], report["reason"], report["max_seconds"]) == ("ALLOW", "shadow", 3600)
    assert report["shadow"] == {
        "scope": "tenant",
        "counters": "shadow",
        "enforced_result": "DENY",
        "enforced_reason": "class_not_allowed",
        "enforced_max_seconds": 0,
        "refusal_stands": False,
    }
    allowed = guard.json(*check_args("1001", LONDON))
    assert (allowed["result"], allowed["reason"], allowed["max_seconds"]) == (
        "ALLOW",
        "allowed",
        3600,
    )
    assert allowed["shadow"]["enforced_reason"] == "allowed"
    assert allowed["shadow"]["enforced_max_seconds"] == 3600
    assert (
        "limits today (20300107, shadow counters)" in guard.run(*check_args("1001", LONDON)).stdout
    )
    guard.run("tenant", "set", "demo", "--shadow", "off")
    assert guard.json(*check_args("1001", PARIS), code=1)["shadow"] is None


def test_shadow_mode_enforces_a_block_unless_the_perimeter_is_shadowed(guard: GuardCli) -> None:
    guard.run("ext", "set", "1001", "-t", "demo", "--shadow", "on")
    guard.run("ip", "block", OFFICE_IP)
    result = guard.run(*check_args("1001", LONDON), code=1)
    assert result.stdout.startswith("DENY  ip_blocked")
    assert "refused even in shadow mode (ip_blocked is enforced)" in result.stdout
    report = guard.json(*check_args("1001", LONDON), code=1)
    assert report["shadow"]["scope"] == "extension" and report["shadow"]["refusal_stands"]
    # The extension 1002 is not in shadow mode.
    assert guard.json(*check_args("1002", PARIS), code=1)["shadow"] is None

    guard.run("tenant", "set", "demo", "--shadow-enforce-perimeter", "off")
    report = guard.json(*check_args("1001", LONDON))
    assert (report["result"], report["reason"]) == ("ALLOW", "shadow")
    assert report["shadow"]["enforced_reason"] == "ip_blocked"
    assert not report["shadow"]["refusal_stands"]


def test_shadow_mode_judges_the_limits_on_the_shadow_counters(guard: GuardCli) -> None:
    guard.run("ext", "set", "1001", "-t", "demo", "--shadow", "on")
    shadow_ledger(guard, lambda ledger: _call(ledger, "shadow-call", 60))
    report = guard.json(*check_args("1001", LONDON))
    assert (report["result"], report["reason"]) == ("ALLOW", "shadow")
    assert report["shadow"]["enforced_reason"] == "daily_limit_extension"
    assert report["today"]["extension"]["spent"] == "5.0000"
    assert report["checks"][-1]["reason"] == "daily_limit_extension"
    # The live counters are untouched: the same call, enforced, is allowed.
    guard.run("ext", "set", "1001", "-t", "demo", "--shadow", "off")
    assert guard.json(*check_args("1001", LONDON))["today"]["extension"]["spent_units"] == 0


def test_a_live_lock_stands_in_shadow_mode_a_shadow_lock_does_not(guard: GuardCli) -> None:
    guard.run("tenant", "set", "demo", "--shadow", "on")
    shadow_ledger(
        guard, lambda ledger: ledger.lock_extension("demo", "1002", "user_agent_mismatch")
    )
    report = guard.json(*check_args("1002", PARIS))
    assert (report["result"], report["reason"]) == ("ALLOW", "shadow")
    assert report["shadow"]["enforced_reason"] == "extension_locked"
    assert [c["name"] for c in report["checks"]][-3:] == ["runtime_lock", "shadow_lock", "limits"]
    assert report["checks"][-2]["passed"] is False

    guard.ledger(lambda ledger: ledger.lock_extension("demo", "1002", "admin"))
    report = guard.json(*check_args("1002", PARIS), code=1)
    assert (report["result"], report["reason"]) == ("DENY", "extension_locked")
    assert report["shadow"]["refusal_stands"]


def redis_state(prefix: str) -> dict[bytes, Any]:
    """Every key under the live and shadow prefixes, with its value."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        state = {}
        for match in (f"{prefix}:*", f"{shadow_prefix(prefix)}:*"):
            for key in client.scan_iter(match=match, count=1000):
                state[key] = client.dump(key)
        return state
    finally:
        client.close()


def test_check_writes_nothing(guard: GuardCli) -> None:
    guard.run("ip", "block", "203.0.113.9")
    guard.run("ext", "set", "1002", "-t", "demo", "--shadow", "on")
    guard.run("ext", "set", "1001", "-t", "demo", "--ua-mode", "learn")
    shadow_ledger(guard, lambda ledger: _call(ledger, "shadow-call", 60, extension="1002"))
    before = redis_state(guard.key_prefix)
    events = guard.json("events", "list", "--limit", "1000")
    runs = [
        (check_args("1001", LONDON, ip="203.0.113.9"), 1),  # blocked
        (check_args("1001", LONDON, ua="friendly-scanner"), 1),  # a scanner: would block at once
        (check_args("1001", PARIS), 1),  # refused by a check, counted by a live call
        (check_args("1001", LONDON), 0),  # would learn the User-Agent
        (check_args("1002", "09098790000"), 0),  # shadowed: a shadow_refused event if live
        (check_args("1002", PARIS), 0),  # would reserve on the shadow counters
    ]
    for args, code in runs * 3:
        guard.run(*args, code=code)
    assert redis_state(guard.key_prefix) == before
    assert guard.json("events", "list", "--limit", "1000") == events
