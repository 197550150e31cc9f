"""``guard check`` end to end on SQLite and Redis: the demo's calls are allowed or refused with
the right reason code and exit status, and the dry run reads today's counters and runtime locks."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cli_support import CLOSED, LONDON, PARIS, GuardCli, check_args

from guard.domain import DestinationClass, Rate, UaLockMode
from guard.ledger import RedisLedger
from guard.ledger.types import ReserveRequest
from guard.money import parse_money


@pytest.fixture
def guard(sqlite_url: str, key_prefix: str) -> GuardCli:
    cli = GuardCli(sqlite_url, key_prefix)
    cli.run("db", "upgrade")
    cli.run("demo")
    return cli


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
    guard.run("tenant", "set", "demo", "--fail-mode", "allow_local", **down)
    report = guard.json(*check_args("1001", LONDON), **down)
    assert (report["result"], report["reason"]) == ("ALLOW", "store_unavailable")


def test_bad_time_is_a_usage_error(guard: GuardCli) -> None:
    result = guard.run(*check_args("1001", LONDON, at="next monday"), code=2)
    assert "--at" in result.output
    assert "ISO 8601" in result.output
