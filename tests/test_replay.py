"""CDR replay: Master.csv in, a week of real calls through a proposed policy, a report out."""

from __future__ import annotations

import json
import random
import tomllib
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from click.testing import CliRunner
from factories import (
    ACME,
    LONDON,
    PARIS,
    UK_MOBILE,
    demo_rates,
    make_extension,
    make_snapshot,
    make_tenant,
    money,
    rate,
)

from guard.cli import cli
from guard.config import db
from guard.config import repository as repo
from guard.domain import DestinationClass, Reason, UaLockMode
from guard.errors import NotFoundError, ValidationError
from guard.ledger import RedisLedger, ledger_from_url
from guard.ledger.storage import private_memory_ledger
from guard.money import call_cost
from guard.replay import (
    CUT_SHORT,
    NEUTRAL_SOURCE_IP,
    CdrCall,
    apply_policy,
    extension_of,
    load_policy,
    neutral_source_ip,
    neutral_user_agent,
    parse_policy,
    read_cdr,
    replay,
    summarize,
)
from guard.snapshot import DestinationRule, Snapshot

LONDON_TZ = ZoneInfo("Europe/London")
#: A Cuban number dialed internationally: rated 53, "international" at 1.20/min, billed 1/1.
CUBA = "005371234567"
FRAUD_EXT = "1002"
#: The burst starts at 02:00 on Saturday 8 June 2024 (London time).
FRAUD_START = datetime(2024, 6, 8, 2, 0, tzinfo=LONDON_TZ)
FRAUD_CALLS = 30
FRAUD_SECONDS = 1200
PROPOSED = """
[tenant]
daily_limit = 100

[all_extensions]
daily_limit = "15"
concurrent_limit = 3
"""


def _rates() -> dict[str, Any]:
    rates = demo_rates()
    rates["53"] = rate("53", "Cuba", DestinationClass.INTERNATIONAL, "1.20", increments=(1, 1))
    return rates


def unlimited_snapshot() -> Snapshot:
    """acme as a customer without Guard's limits: nothing stops a burst."""
    return make_snapshot(
        tenants=[make_tenant(daily_limit=None, concurrent_limit=None)],
        extensions=[
            make_extension("1001", daily_limit=None, concurrent_limit=None),
            make_extension("1002", daily_limit=None, concurrent_limit=None),
        ],
        rates=_rates(),
    )


def _cell(value: object) -> str:
    """One cdr_csv cell as Asterisk writes it: strings quoted (quotes doubled), numbers bare."""
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace('"', '""') + '"'


def master_row(
    ext: str,
    number: str,
    start: datetime,
    billsec: int,
    *,
    ring: int = 5,
    seq: int = 1,
    extra: tuple[object, ...] = (),
) -> str:
    """One Master.csv line of an outbound call from ``PJSIP/<ext>`` (times: London wall clock)."""
    answer = start + timedelta(seconds=ring)
    end = answer + timedelta(seconds=billsec)
    stamp = "%Y-%m-%d %H:%M:%S"
    cells: tuple[object, ...] = (
        "",
        ext,
        number,
        "from-internal",
        f'"{ext}" <{ext}>',
        f"PJSIP/{ext}-{seq:08x}",
        f"PJSIP/trunk-{seq + 1:08x}",
        "Dial",
        f"PJSIP/{number}@trunk,60,L(3600000)",
        start.strftime(stamp),
        answer.strftime(stamp) if billsec else "",
        end.strftime(stamp),
        ring + billsec,
        billsec,
        "ANSWERED" if billsec else "NO ANSWER",
        "DOCUMENTATION",
        *extra,
    )
    return ",".join(_cell(cell) for cell in cells)


def week_of_calls(seed: int = 7) -> tuple[list[str], set[int]]:
    """A week of normal daytime traffic, then an overnight burst from 1002 to Cuba.

    Returns the Master.csv lines (in the order Asterisk writes them: by end time) and the line
    numbers of the fraud calls.
    """
    chooser = random.Random(seed)
    calls: list[tuple[datetime, str, str, int, bool]] = []
    for day in range(5):  # Monday 3 June .. Friday 7 June
        for hour in range(9, 17):
            start = datetime(2024, 6, 3 + day, hour, chooser.randrange(50), tzinfo=LONDON_TZ)
            number = chooser.choice([LONDON, UK_MOBILE])
            calls.append((start, "1001", number, chooser.randrange(60, 600), False))
            other = start + timedelta(minutes=chooser.randrange(5, 9))
            calls.append((other, "1002", chooser.choice([PARIS, LONDON]), 300, False))
    for index in range(FRAUD_CALLS):
        start = FRAUD_START + timedelta(minutes=7 * index)
        calls.append((start, FRAUD_EXT, CUBA, FRAUD_SECONDS, True))
    calls.sort(key=lambda call: call[0] + timedelta(seconds=call[3]))
    lines, fraud = [], set()
    for line, (start, ext, number, billsec, is_fraud) in enumerate(calls, start=1):
        lines.append(master_row(ext, number, start, billsec, seq=2 * line))
        if is_fraud:
            fraud.add(line)
    return lines, fraud


@pytest.fixture(params=["private", "redis"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[RedisLedger]:
    """The throw-away ledger: the private in-process store, or the real Redis under a prefix."""
    if request.param == "private":
        store = private_memory_ledger(prefix="guard-replay", timeout=5.0)
    else:
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("key_prefix")
        store = ledger_from_url(url, prefix=prefix, timeout=5.0)
    yield store
    await store.close()


def _calls(lines: list[str]) -> tuple[CdrCall, ...]:
    cdr = read_cdr(lines, timezone="Europe/London")
    assert cdr.bad_rows == ()
    return cdr.calls


async def test_proposed_daily_limit_stops_the_night_burst_and_spares_the_week(
    ledger: RedisLedger,
) -> None:
    lines, fraud = week_of_calls()
    calls = _calls(lines)
    snapshot = apply_policy(unlimited_snapshot(), ACME, parse_policy(tomllib.loads(PROPOSED)))

    outcomes = await replay(calls, snapshot, ACME, ledger)
    report = summarize(outcomes, ACME, snapshot.tenant(ACME))

    normal = [o for o in outcomes if o.call.line not in fraud]
    burst = [o for o in outcomes if o.call.line in fraud]
    assert len(normal) == 80 and len(burst) == FRAUD_CALLS
    assert all(o.decision.allowed and o.cut_seconds == 0 for o in normal)
    assert all(o.policy_cost == o.actual_cost for o in normal)
    # The first fraud call gets the extension's whole budget and is cut when it is spent.
    first, *rest = burst
    assert first.decision.allowed and first.policy_cost == money("15")
    assert first.cut_seconds == FRAUD_SECONDS - 750
    assert all(o.decision.reason is Reason.DAILY_LIMIT_EXTENSION for o in rest)

    assert [r.reason for r in report.reasons] == [Reason.DAILY_LIMIT_EXTENSION]
    stopped = report.reasons[0]
    assert stopped.tally.calls == FRAUD_CALLS - 1
    assert stopped.tally.cost == (FRAUD_CALLS - 1) * money("24")
    assert stopped.first.call.start == (FRAUD_START + timedelta(minutes=7)).timestamp()
    assert report.cut_short is not None and report.cut_short.reason == CUT_SHORT
    assert report.cut_short.tally.cost == money("24") - money("15")
    assert [hour for hour, _ in report.refused_by_hour] == [2, 3, 4, 5]
    assert [name for name, _ in report.refused_by_class] == ["international"]
    days = {day.day: day for day in report.days}
    assert sorted(days) == [f"2024-06-0{d}" for d in range(3, 9)]
    for name in ("2024-06-03", "2024-06-04", "2024-06-05", "2024-06-06", "2024-06-07"):
        assert days[name].refused == 0 and days[name].actual == days[name].under_policy
    assert days["2024-06-08"].actual == FRAUD_CALLS * money("24")
    assert days["2024-06-08"].under_policy == money("15")
    assert report.actual - report.under_policy == FRAUD_CALLS * money("24") - money("15")


async def test_current_policy_without_limits_lets_the_burst_through(ledger: RedisLedger) -> None:
    lines, _ = week_of_calls()
    snapshot = unlimited_snapshot()
    outcomes = await replay(_calls(lines), snapshot, ACME, ledger)
    report = summarize(outcomes, ACME, snapshot.tenant(ACME))
    assert report.refused == 0 and report.cut_short is None
    assert report.under_policy == report.actual


async def test_concurrent_limit_sees_overlapping_calls_and_frees_slots_at_hangup(
    ledger: RedisLedger,
) -> None:
    noon = datetime(2024, 6, 5, 12, 0, tzinfo=LONDON_TZ)
    lines = [
        master_row("1001", LONDON, noon, 295, seq=1),  # 12:00:00 .. 12:05:00
        master_row("1001", LONDON, noon + timedelta(minutes=1), 60, seq=3),  # overlaps: refused
        master_row("1001", LONDON, noon + timedelta(minutes=5), 60, seq=5),  # starts at the end
    ]
    snapshot = make_snapshot(
        extensions=[make_extension("1001", concurrent_limit=1)], rates=_rates()
    )
    outcomes = await replay(_calls(lines), snapshot, ACME, ledger)
    assert [o.decision.reason for o in outcomes] == [
        Reason.ALLOWED,
        Reason.CONCURRENT_LIMIT_EXTENSION,
        Reason.ALLOWED,
    ]


async def test_unknown_extension_and_unrated_numbers_are_reported_not_dropped(
    ledger: RedisLedger,
) -> None:
    noon = datetime(2024, 6, 5, 12, 0, tzinfo=LONDON_TZ)
    lines = [
        master_row("1009", LONDON, noon, 60, seq=1),
        master_row("1001", "s", noon + timedelta(minutes=1), 60, seq=3),
        master_row("1001", "0123456", noon + timedelta(minutes=2), 60, seq=5),
        master_row("1001", "112", noon + timedelta(minutes=3), 60, seq=7),
    ]
    snapshot = make_snapshot(rates={"4420": demo_rates()["4420"]})
    outcomes = await replay(_calls(lines), snapshot, ACME, ledger)
    report = summarize(outcomes, ACME, snapshot.tenant(ACME))
    assert [o.decision.reason for o in outcomes] == [
        Reason.UNKNOWN_EXTENSION,
        Reason.INVALID_NUMBER,
        Reason.NO_RATE,
        Reason.EMERGENCY,
    ]
    assert outcomes[0].actual_cost == money("0.01")
    assert report.unrated == 2
    assert {r.reason: r.tally.calls for r in report.reasons} == {
        "unknown_extension": 1,
        "invalid_number": 1,
        "no_rate": 1,
    }


async def test_max_call_seconds_of_a_proposed_policy_cuts_long_calls(ledger: RedisLedger) -> None:
    noon = datetime(2024, 6, 5, 12, 0, tzinfo=LONDON_TZ)
    lines = [master_row("1002", PARIS, noon, 1800, seq=1)]
    policy = parse_policy({"tenant": {"max_call_seconds": 600}})
    snapshot = apply_policy(unlimited_snapshot(), ACME, policy)
    (outcome,) = await replay(_calls(lines), snapshot, ACME, ledger)
    paris = demo_rates()["33"]
    assert outcome.decision.max_seconds == 600 and outcome.cut_seconds == 1200
    assert outcome.policy_cost == call_cost(paris, 600)
    assert outcome.actual_cost == call_cost(paris, 1800)


# --- reading CDR files --------------------------------------------------------------------------


def test_master_csv_layouts_from_16_to_21_columns() -> None:
    start = datetime(2024, 6, 5, 12, 0, tzinfo=LONDON_TZ)
    uniqueid = "1717588800.42"
    variants = {
        (): "",
        (uniqueid,): uniqueid,
        ("billing-note",): "",
        (uniqueid, "note"): uniqueid,
        ("", "1717588800.40", 3): "",
        (uniqueid, "", "1717588800.40", 3): uniqueid,
        ("note", "", "1717588800.40", 3): "",
        (uniqueid, "note", "", "1717588800.40", 3): uniqueid,
    }
    for extra, expected in variants.items():
        cdr = read_cdr([master_row("1001", LONDON, start, 42, extra=extra)], timezone="UTC")
        assert cdr.bad_rows == (), extra
        (call,) = cdr.calls
        assert (call.extension, call.number, call.billsec, call.duration) == (
            "1001",
            LONDON,
            42,
            47,
        )
        assert call.uniqueid == expected, extra
        assert call.disposition == "ANSWERED"


def test_cdr_times_are_read_in_the_given_zone() -> None:
    row = master_row("1001", LONDON, datetime(2024, 6, 5, 13, 0), 42)
    (london,) = read_cdr([row], timezone="Europe/London").calls
    (utc,) = read_cdr([row], timezone="UTC").calls
    assert london.start == datetime(2024, 6, 5, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()
    assert utc.start - london.start == 3600


def test_bad_rows_are_reported_by_line_number() -> None:
    good = master_row("1001", LONDON, datetime(2024, 6, 5, 12, 0), 42)
    broken_time = good.replace("2024-06-05 12:00:00", "yesterday noon")
    negative = good.replace(',42,"ANSWERED"', ',-5,"ANSWERED"')
    empty_dst = good.replace(f'"{LONDON}","from-internal"', '"","from-internal"')
    lines = [good, "", broken_time, '"just","three","columns"', negative, empty_dst, good]
    cdr = read_cdr(lines, timezone="UTC")
    assert len(cdr.calls) == 2
    assert [bad.line for bad in cdr.bad_rows] == [3, 4, 5, 6]
    messages = [bad.message for bad in cdr.bad_rows]
    assert "start is not a time" in messages[0]
    assert "3 columns" in messages[1]
    assert "billsec" in messages[2]
    assert "dst is empty" in messages[3]


def test_line_numbers_count_physical_lines_of_quoted_newlines() -> None:
    good = master_row("1001", LONDON, datetime(2024, 6, 5, 12, 0), 42)
    multiline = good.replace('"Dial"', '"Di\nal"')
    cdr = read_cdr([*f"{multiline}\nbroken\n{good}\n".splitlines(keepends=True)], timezone="UTC")
    assert [bad.line for bad in cdr.bad_rows] == [3]
    assert [call.line for call in cdr.calls] == [1, 4]


def test_csv_with_a_header_names_its_columns() -> None:
    text = (
        "uniqueid,start,extension,dst,duration,billsec,source_ip,user_agent,dcontext,extra\n"
        "a.1,2024-06-05T12:00:00+00:00,1001,02079460000,70,60,192.0.2.10,Yealink T46,out,x\n"
        "a.2,1717589000,1002,0033140000000,,30,,,out,y\n"
        "a.3,2024-06-05 12:10:00,1002,0033140000000,5,5,,,in,z\n"
    )
    cdr = read_cdr(text.splitlines(keepends=True), timezone="UTC", contexts=["out"])
    assert cdr.layout == "header" and cdr.skipped == 1 and cdr.bad_rows == ()
    first, second = cdr.calls
    assert (first.extension, first.source_ip, first.user_agent, first.duration) == (
        "1001",
        "192.0.2.10",
        "Yealink T46",
        70,
    )
    assert (second.start, second.duration, second.uniqueid) == (1717589000.0, 30, "a.2")


def test_csv_with_a_header_takes_the_extension_from_the_channel_then_src() -> None:
    text = (
        "start,src,channel,dst,billsec\n"
        "1717589000,0207946,PJSIP/alice-smith-0000000f,02079460000,10\n"
        "1717589001,1003,Local/1003@from-internal-00000001;1,02079460000,10\n"
    )
    calls = read_cdr(text.splitlines(keepends=True), timezone="UTC").calls
    assert [call.extension for call in calls] == ["alice-smith", "1003"]


def test_extension_of_channel_names() -> None:
    assert extension_of("PJSIP/1001-0000000f") == "1001"
    assert extension_of("SIP/1001-00000a3c") == "1001"
    assert extension_of("IAX2/branch-1-0000beef") == "branch-1"
    assert extension_of("DAHDI/1-1", "1001") == "1001"
    assert extension_of("PJSIP/1001", "1001") == "1001"


# --- neutral values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    ["Yealink*", "Yealink SIP-T4?S *", "[YZ]ealink*", "Snom[!0-9]*", "a[]]b", "[!]x]", "x["],
)
def test_neutral_user_agent_matches_a_pinned_glob(pattern: str) -> None:
    ext = make_extension("1001", ua_mode=UaLockMode.PIN, ua_value=pattern)
    assert fnmatchcase(neutral_user_agent(ext), pattern)


def test_neutral_user_agent_of_learned_and_unlocked_extensions() -> None:
    learned = make_extension("1001", ua_mode=UaLockMode.LEARN, ua_value="Yealink T46")
    assert neutral_user_agent(learned) == "Yealink T46"
    assert neutral_user_agent(make_extension("1001")) == "guard-replay"


def test_neutral_source_ip_lies_inside_every_configured_network() -> None:
    tenant = make_tenant(networks=(ip_network("10.0.0.0/8"), ip_network("192.0.2.0/24")))
    ext = make_extension(
        "1001", networks=(ip_network("198.51.100.0/24"), ip_network("10.1.0.0/16"))
    )
    assert neutral_source_ip(tenant, ext) == "10.1.0.0"
    assert neutral_source_ip(tenant, make_extension("1001")) == "10.0.0.0"
    assert neutral_source_ip(make_tenant(), make_extension("1001")) == NEUTRAL_SOURCE_IP


# --- policy files -------------------------------------------------------------------------------


def test_policy_file_overrides_only_what_it_names(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        """
[tenant]
daily_limit = "none"
max_call_seconds = 1800

[extensions.1001]
daily_limit = 2.5
profile = "night"

[extensions.2001]
concurrent_limit = 1

[profiles]
night = ["local", "national"]

[[rate_caps]]
class = "international"
max_rate = "0.05"

[[blocked]]
prefix = "882"
"""
    )
    current = make_snapshot(global_rules=(DestinationRule(prefix="44"),))
    before = current.tenant(ACME)
    assert before is not None
    snapshot = apply_policy(current, ACME, load_policy(path))
    tenant = snapshot.tenant(ACME)
    assert tenant is not None
    assert (tenant.daily_limit, tenant.max_call_seconds) == (None, 1800)
    assert tenant.concurrent_limit == before.concurrent_limit
    assert tenant.rules == (
        DestinationRule(dest_class=DestinationClass.INTERNATIONAL, max_rate=money("0.05")),
        DestinationRule(prefix="882"),
    )
    assert snapshot.global_rules == current.global_rules
    ext = snapshot.extension(ACME, "1001")
    assert ext is not None and ext.daily_limit == money("2.5") and ext.profile == "night"
    assert ext.allowed_classes == {DestinationClass.LOCAL, DestinationClass.NATIONAL}
    assert snapshot.extension(ACME, "1002") == current.extension(ACME, "1002")
    added = snapshot.extension(ACME, "2001")
    assert added is not None and added.concurrent_limit == 1 and added.profile == "domestic"
    assert current.tenant(ACME) == before  # the current snapshot is untouched


def test_policy_file_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("all_extensions:\n  daily_limit: 3\n  concurrent_limit: none\n")
    snapshot = apply_policy(make_snapshot(), ACME, load_policy(path))
    for name in ("1001", "1002"):
        ext = snapshot.extension(ACME, name)
        assert ext is not None and (ext.daily_limit, ext.concurrent_limit) == (money("3"), None)


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ({"tenant": {"dialy_limit": 5}}, "tenant"),
        ({"tenant": {"daily_limit": -5}}, "tenant.daily_limit"),
        ({"tenant": {"max_call_seconds": 0}}, "tenant.max_call_seconds"),
        ({"extensions": {"1001": {"concurrent_limit": 1.5}}}, "extensions.1001.concurrent_limit"),
        ({"profiles": {"night": ["local", "moon"]}}, "profiles.night"),
        ({"rate_caps": [{"prefix": "44"}]}, "rate_caps[0]"),
        ({"blocked": [{"prefix": "+44"}]}, "blocked[0].prefix"),
        ({"limits": {}}, "policy"),
    ],
)
def test_policy_errors_name_the_key(document: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_policy(document)
    assert named in caught.value.field


def test_policy_with_an_unknown_profile_or_tenant_is_refused() -> None:
    with pytest.raises(ValidationError, match="'vip'"):
        apply_policy(make_snapshot(), ACME, parse_policy({"all_extensions": {"profile": "vip"}}))
    with pytest.raises(NotFoundError):
        apply_policy(make_snapshot(), "nobody", parse_policy({}))


# --- the command --------------------------------------------------------------------------------


@pytest.fixture
def configured(sqlite_url: str) -> Iterator[str]:
    """A SQLite configuration with acme as ``unlimited_snapshot`` describes it."""
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    repo.add_tenant(
        engine,
        ACME,
        actor="test",
        timezone="Europe/London",
        currency="GBP",
        country_code="44",
    )
    repo.add_extension(engine, ACME, "1001", actor="test")
    repo.add_extension(engine, ACME, "1002", actor="test", profile="international")
    repo.import_rates(engine, _rates().values(), actor="test")
    engine.dispose()
    yield sqlite_url


def _invoke(database_url: str, *args: str, env: dict[str, str] | None = None) -> Any:
    runner = CliRunner()
    return runner.invoke(
        cli,
        ["--database-url", database_url, "replay", *args],
        env={"GUARD_REDIS_URL": "memory://", **(env or {})},
        catch_exceptions=False,
    )


def test_command_reports_the_burst_as_json(configured: str, tmp_path: Path) -> None:
    lines, fraud = week_of_calls()
    cdr = tmp_path / "Master.csv"
    cdr.write_text("\n".join(lines) + "\n")
    policy = tmp_path / "proposed.toml"
    policy.write_text(PROPOSED)
    result = _invoke(configured, str(cdr), "--tenant", ACME, "--policy", str(policy), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["file"]["calls"] == 80 + FRAUD_CALLS and report["file"]["bad_rows"] == []
    assert [r["reason"] for r in report["refused"]] == ["daily_limit_extension"]
    refused = report["refused"][0]
    assert refused["calls"] == FRAUD_CALLS - 1
    assert refused["first"]["extension"] == FRAUD_EXT
    assert refused["first"]["start"] == "2024-06-08T02:07:00+01:00"
    assert refused["first"]["line"] in fraud
    assert report["cut_short"]["calls"] == 1
    assert report["days"][-1]["under_policy"] == "15.0000"
    assert report["totals"]["neutral_source"] == 80 + FRAUD_CALLS


def test_command_prints_a_table_for_people(configured: str, tmp_path: Path) -> None:
    lines, _ = week_of_calls()
    cdr = tmp_path / "Master.csv"
    cdr.write_text("\n".join(lines) + "\n")
    policy = tmp_path / "proposed.toml"
    policy.write_text(PROPOSED)
    result = _invoke(configured, str(cdr), "-t", ACME, "--policy", str(policy))
    assert result.exit_code == 0, result.output
    assert "daily_limit_extension  29" in result.stdout
    assert "2024-06-08 02:07:00 line" in result.stdout
    assert "(cut_short)" in result.stdout


def test_command_refuses_bad_rows_unless_told_to_skip_them(configured: str, tmp_path: Path) -> None:
    good = master_row("1001", LONDON, datetime(2024, 6, 5, 12, 0), 42)
    cdr = tmp_path / "Master.csv"
    cdr.write_text(f"{good}\nnot,a,cdr\n{good}\n")
    refused = _invoke(configured, str(cdr), "-t", ACME, "--json")
    assert refused.exit_code == 2
    assert refused.stdout == ""
    assert "line 2: 3 columns" in refused.stderr
    assert "nothing replayed" in refused.stderr
    skipped = _invoke(configured, str(cdr), "-t", ACME, "--json", "--skip-bad")
    assert skipped.exit_code == 0
    report = json.loads(skipped.stdout)
    assert report["file"]["bad_rows"] == [
        {"line": 2, "message": "3 columns: a cdr_csv row has 16 to 21"}
    ]
    assert report["totals"]["calls"] == 2


def test_command_with_redis_leaves_no_key_behind(
    configured: str, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    lines, _ = week_of_calls()
    cdr = tmp_path / "Master.csv"
    cdr.write_text("\n".join(lines) + "\n")
    env = {"GUARD_REDIS_URL": redis_url, "GUARD_REDIS_PREFIX": key_prefix}
    result = _invoke(configured, str(cdr), "-t", ACME, "--redis", "--json", env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["refused"] == 0
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=f"{key_prefix}*")) == []
    client.close()


def test_command_for_an_unknown_tenant_warns_and_refuses_every_call(
    configured: str, tmp_path: Path
) -> None:
    cdr = tmp_path / "Master.csv"
    cdr.write_text(master_row("1001", LONDON, datetime(2024, 6, 5, 12, 0), 42) + "\n")
    result = _invoke(configured, str(cdr), "-t", "nobody", "--json")
    assert result.exit_code == 0
    assert "does not exist" in result.stderr
    assert json.loads(result.stdout)["refused"][0]["reason"] == "unknown_tenant"


def test_the_shipped_example_policy_applies() -> None:
    path = Path(__file__).resolve().parents[1] / "contrib" / "policy-example.toml"
    snapshot = apply_policy(make_snapshot(), ACME, load_policy(path))
    tenant = snapshot.tenant(ACME)
    assert tenant is not None and tenant.daily_limit == money("200")
    reception = snapshot.extension(ACME, "reception")
    assert reception is not None and reception.profile == "office-hours-local"
    assert DestinationClass.INTERNATIONAL not in reception.allowed_classes


def test_a_field_beyond_the_csv_size_limit_is_a_bad_row() -> None:
    good = master_row("1001", LONDON, datetime(2024, 6, 5, 12, 0), 42)
    huge = good.replace('"Dial"', '"' + "x" * 200_000 + '"')
    cdr = read_cdr([good + "\n", huge + "\n", good + "\n"], timezone="UTC")
    assert [bad.line for bad in cdr.bad_rows] == [2]
    assert "not CSV" in cdr.bad_rows[0].message
    assert [call.line for call in cdr.calls] == [1, 3]
