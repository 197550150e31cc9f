"""The admin CLI end to end (in process, SQLite and Redis of the test's own; one PostgreSQL run):
writes, listings, JSON, exit statuses, error messages, the version bump and the ledger actions."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from cli_support import LONDON, PARIS, GuardCli

from guard import workers
from guard.cli import cli as root
from guard.config.db import make_engine
from guard.config.repository import read_version
from guard.domain import DestinationClass, Rate
from guard.ledger.types import ReserveRequest
from guard.money import parse_money
from guard.schedule import tenant_day
from guard.settings import SETTINGS, Settings

GOOD_RATES = (
    "prefix,name,class,rate_per_minute,connect_fee,initial_increment,subsequent_increment\n"
    "44,United Kingdom,national,0.02,0,60,60\n"
    "4420,London,local,0.01,0,60,60\n"
    "447,UK mobile,mobile,0.0800,0,1,1\n"
)
BAD_RATES = (
    "prefix,name,class,rate_per_minute,connect_fee,initial_increment,subsequent_increment\n"
    "33,France,international,0.02,0,60,60\n"
    "34,Spain,international,-0.02,0,60,60\n"
    "35x,Bad prefix,international,0.02,0,60,60\n"
    "36,Hungary,moon,0.02,0,60,60\n"
    "37,Ok,international,0.03,0,60,60\n"
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``serve`` and ``sweep`` set up logging on the root logger: undo it after the test."""
    root_logger = logging.getLogger()
    handlers, level = root_logger.handlers[:], root_logger.level
    yield
    root_logger.handlers[:] = handlers
    root_logger.setLevel(level)


@pytest.fixture
def guard(sqlite_url: str, key_prefix: str) -> GuardCli:
    cli = GuardCli(sqlite_url, key_prefix)
    cli.run("db", "upgrade")
    return cli


@pytest.fixture
def acme(guard: GuardCli) -> GuardCli:
    guard.run(
        "tenant", "add", "acme", "--timezone", "Europe/London", "--currency", "GBP",
        "--country-code", "44", "--daily", "50", "--concurrent", "10",
    )  # fmt: skip
    guard.run("ext", "add", "1001", "--tenant", "acme", "--daily", "5")
    return guard


def _csv(tmp_path: Path, text: str, name: str = "rates.csv") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # not group.commands: the root loads them lazily
        command = group.get_command(ctx, name)
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


# --- the command tree --------------------------------------------------------------------------


def test_every_command_has_help(guard: GuardCli) -> None:
    commands = list(_commands(root))
    assert ("tenant", "add") in commands and ("rates", "import") in commands
    for command in commands:
        result = guard.run(*command, "--help")
        assert "Usage: guard" in result.stdout
        assert len(result.stdout.splitlines()) > 3, command


def test_installed_console_script_answers_help() -> None:
    script = shutil.which("guard")
    assert script is not None, "the guard console script is not installed (pip install -e .)"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "guard check" in done.stdout


def test_db_upgrade_is_repeatable_and_current_reports_the_head(guard: GuardCli) -> None:
    result = guard.run("db", "upgrade")
    assert "already at revision" in result.stdout
    current = guard.json("db", "current")
    assert current["up_to_date"] is True
    assert current["revision"] == current["head"]


def test_store_without_schema_says_to_upgrade(tmp_path: Path, key_prefix: str) -> None:
    fresh = GuardCli(f"sqlite:///{tmp_path / 'empty.db'}", key_prefix)
    assert fresh.json("db", "current")["revision"] is None
    result = fresh.run("tenant", "list", code=1)
    assert "guard db upgrade" in result.stderr


# --- tenants and extensions --------------------------------------------------------------------


def test_tenant_json_has_money_as_decimal_and_units(acme: GuardCli) -> None:
    tenant = acme.json("tenant", "show", "acme")
    assert tenant["daily_limit"] == "50.0000"
    assert tenant["daily_limit_units"] == 500_000
    assert tenant["concurrent_limit"] == 10
    assert (tenant["timezone"], tenant["currency"], tenant["country_code"]) == (
        "Europe/London",
        "GBP",
        "44",
    )
    assert tenant["today"]["spent"] == "0.0000"
    assert tenant["counters_error"] is None
    assert [t["name"] for t in acme.json("tenant", "list")] == ["acme"]


def test_set_changes_only_what_is_given_and_none_clears_a_limit(acme: GuardCli) -> None:
    acme.run("tenant", "set", "acme", "--daily", "none", "--fail-mode", "allow_local")
    tenant = acme.json("tenant", "show", "acme")
    assert (tenant["daily_limit"], tenant["daily_limit_units"]) == (None, None)
    assert tenant["fail_mode"] == "allow_local"
    assert tenant["concurrent_limit"] == 10
    acme.run("ext", "set", "1001", "--tenant", "acme", "--daily", "2.5", "--concurrent", "2")
    ext = acme.json("ext", "show", "1001", "--tenant", "acme")
    assert (ext["daily_limit"], ext["daily_limit_units"], ext["concurrent_limit"]) == (
        "2.5000",
        25_000,
        2,
    )
    assert ext["profile"] == "domestic"


def test_tenant_show_prints_todays_counters(acme: GuardCli) -> None:
    result = acme.run("tenant", "show", "acme")
    assert "daily limit       50.0000 GBP" in result.stdout
    assert "spent 0.0000 + reserved 0.0000 of 50.0000 GBP, 0 of 10 live calls" in result.stdout


def test_counters_unavailable_are_said_not_fatal(acme: GuardCli) -> None:
    result = acme.run("tenant", "show", "acme", GUARD_REDIS_URL="redis://127.0.0.1:1/0")
    assert "counters unavailable: counter store redis://127.0.0.1:1/0" in result.stdout
    result = acme.run("ext", "show", "1001", "-t", "acme", GUARD_REDIS_URL="memory://")
    assert "counters unavailable: the memory:// counter store" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["net", "add", "--tenant", "acme", "10.0.0.1/8"],
            "error: cidr: host bits set in 10.0.0.1/8, did you mean 10.0.0.0/8?",
        ),
        (["net", "add", "--tenant", "acme", "10.0.0.300"], "error: cidr: not an IPv4 or IPv6"),
        (["tenant", "add", "x", "--timezone", "Mars/Olympus"], "error: timezone: unknown time"),
        (["tenant", "set", "acme", "--currency", "EURO"], "error: currency: invalid 'EURO'"),
        (["tenant", "set", "acme", "--daily", "-5"], "Invalid value for '--daily'"),
        (["tenant", "set", "acme", "--daily", "1e9"], "Invalid value for '--daily'"),
        (["tenant", "set", "acme", "--daily", "99999999999"], "absurdly large"),
        (["tenant", "set", "acme", "--daily", "0.00001"], "more than 4 decimal places"),
        (["tenant", "set", "acme", "--concurrent", "-1"], "error: concurrent_limit:"),
        (["tenant", "set", "acme", "--max-call-seconds", "0"], "error: max_call_seconds:"),
        (["tenant", "set", "acme"], "error: changes: nothing to change"),
        (["tenant", "add", "global"], "error: name: 'global' is reserved"),
        (["tenant", "add", "acme"], "error: name: tenant 'acme' already exists"),
        (["ext", "set", "1001", "-t", "acme", "--ua-mode", "pin"], "error: ua_value: the pin"),
        (["ext", "set", "1001", "-t", "acme", "--ua-mode", "sometimes"], "'--ua-mode'"),
        (["window", "add", "-t", "acme", "--days", "mon-fri", "--hours", "8-19"], "error: hours"),
        (["window", "add", "-t", "acme", "--days", "funday", "--hours", "08:00-19:00"], "weekday"),
        (["profile", "add", "vip", "--classes", "local,moon"], "error: classes: invalid 'moon'"),
        (["block", "add", "--prefix", "88x"], "error: prefix: invalid '88x'"),
        (["block", "add", "--class", "premium", "--max-rate", "-1"], "'--max-rate'"),
        (["emergency", "add", "112"], "error: number: 112 is a built-in"),
        (["rates", "lookup", "12ab"], "error: number: only digits"),
        (["serve", "--listen", "nowhere"], "Invalid value for '--listen'"),
    ],
)
def test_invalid_values_name_the_field_and_exit_2(
    acme: GuardCli, args: list[str], message: str
) -> None:
    result = acme.run(*args, code=2)
    assert message in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tenant", "show", "nobody"], "tenant 'nobody' does not exist"),
        (["ext", "add", "1002", "--tenant", "nobody"], "tenant 'nobody' does not exist"),
        (["ext", "show", "9999", "--tenant", "acme"], "extension '9999' of tenant 'acme' does"),
        (["ext", "add", "1002", "-t", "acme", "--profile", "nosuch"], "profile 'nosuch' exists"),
        (["net", "remove", "--tenant", "acme", "192.0.2.0/24"], "192.0.2.0/24 is not allowed"),
        (["window", "remove", "--tenant", "acme", "42"], "time window 42 of tenant 'acme'"),
        (["block", "remove", "42"], "destination rule 42 does not exist"),
        (["scanner", "remove", "nosuch"], "scanner pattern 'nosuch' is not configured"),
        (["rates", "list", "--tenant", "nobody"], "tenant 'nobody' does not exist"),
    ],
)
def test_what_does_not_exist_is_refused_with_exit_1(
    acme: GuardCli, args: list[str], message: str
) -> None:
    result = acme.run(*args, code=1)
    assert result.stderr.startswith("error: ")
    assert message in result.stderr


def test_sql_down_is_exit_1_with_the_password_masked(acme: GuardCli) -> None:
    result = acme.run(
        "--database-url",
        "postgresql://guard:s3cr3t-pw@127.0.0.1:1/guard",
        "tenant",
        "list",
        code=1,
    )
    assert result.stderr.startswith("error: config store postgresql+psycopg2://guard:***@")
    assert "s3cr3t-pw" not in result.output


def test_tenant_remove_asks_first(acme: GuardCli) -> None:
    acme.run("tenant", "remove", "acme", code=1)
    assert acme.json("tenant", "list")
    acme.run("tenant", "remove", "acme", "--yes")
    assert acme.json("tenant", "list") == []


# --- the config version and the ledger ---------------------------------------------------------


def test_every_write_bumps_the_version_in_redis(acme: GuardCli, sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        before = acme.ledger(lambda ledger: ledger.config_version())
        assert before == read_version(engine)
        acme.run("ext", "set", "1001", "--tenant", "acme", "--daily", "7")
        after = acme.ledger(lambda ledger: ledger.config_version())
        assert after == read_version(engine) > before
    finally:
        engine.dispose()


def test_a_write_with_redis_down_succeeds_with_a_warning(acme: GuardCli) -> None:
    result = acme.run(
        "tenant", "set", "acme", "--daily", "60", GUARD_REDIS_URL="redis://127.0.0.1:1/0"
    )
    assert "warning: counter store redis://127.0.0.1:1/0" in result.stderr
    assert "within ~30 s" in result.stderr
    assert acme.json("tenant", "show", "acme")["daily_limit"] == "60.0000"
    quiet = acme.run("tenant", "set", "acme", "--daily", "61", GUARD_REDIS_URL="memory://")
    assert quiet.stderr == ""


def test_unlock_clears_the_ledger_lock_and_can_forget_the_user_agent(acme: GuardCli) -> None:
    acme.run("ext", "set", "1001", "--tenant", "acme", "--ua-mode", "learn")
    acme.run("ext", "lock", "1001", "--tenant", "acme", "--reason", "stolen phone")
    ext = acme.json("ext", "show", "1001", "--tenant", "acme")
    assert (ext["locked"], ext["lock_reason"]) == (True, "stolen phone")
    assert ext["runtime"]["locked"] is True
    assert ext["runtime"]["lock_reason"] == "stolen phone"

    result = acme.run("ext", "unlock", "1001", "--tenant", "acme")
    assert "the runtime lock lifted" in result.stdout
    state = acme.ledger(lambda ledger: ledger.extension_state("acme", "1001"))
    assert not state.locked
    ext = acme.json("ext", "show", "1001", "--tenant", "acme")
    assert (ext["locked"], ext["runtime"]["locked"]) == (False, False)

    acme.ledger(lambda ledger: ledger.lock_extension("acme", "1001", "user_agent_mismatch"))
    acme.run("ext", "unlock", "1001", "--tenant", "acme", "--forget-ua")
    state = acme.ledger(lambda ledger: ledger.extension_state("acme", "1001"))
    assert (state.locked, state.learned_user_agent) == (False, None)


def test_unlock_with_redis_down_says_the_runtime_lock_may_remain(acme: GuardCli) -> None:
    result = acme.run(
        "ext", "unlock", "1001", "-t", "acme", code=1, GUARD_REDIS_URL="redis://127.0.0.1:1/0"
    )
    assert "error: unlocked in the configuration, but the runtime lock may remain" in result.stderr


# --- networks, windows, profiles, rules, emergency numbers, scanners --------------------------


def test_networks_and_windows_add_list_remove(acme: GuardCli) -> None:
    acme.run("net", "add", "--tenant", "acme", "192.0.2.0/24", "--note", "office")
    acme.run("net", "add", "--tenant", "acme", "--ext", "1001", "2001:db8::/48")
    networks = acme.json("net", "list", "--tenant", "acme")
    assert [(n["cidr"], n["extension"], n["note"]) for n in networks] == [
        ("192.0.2.0/24", None, "office"),
        ("2001:db8::/48", "1001", ""),
    ]
    acme.run("net", "remove", "--tenant", "acme", "--ext", "1001", "2001:db8::/48")
    assert len(acme.json("net", "list", "--tenant", "acme")) == 1

    added = acme.json("window", "add", "-t", "acme", "--days", "mon-fri", "--hours", "08:00-19:00")
    assert (added[0]["day"], added[0]["start"], added[0]["end"]) == ("mon", "08:00", "19:00")
    assert len(added) == 5
    acme.run("window", "add", "-t", "acme", "-e", "1001", "--days", "sat", "--hours", "22:00-06:00")
    listed = acme.json("window", "list", "-t", "acme")
    assert listed[-1] == {
        "id": listed[-1]["id"],
        "tenant": "acme",
        "extension": "1001",
        "day": "sat",
        "start": "22:00",
        "end": "06:00",
    }
    ids = [str(w["id"]) for w in added[:2]]
    result = acme.run("window", "remove", "-t", "acme", *ids)
    assert "removed 2 window(s)" in result.stdout
    assert len(acme.json("window", "list", "-t", "acme")) == 4
    assert "(whole tenant)  tue  08:00-19:00" not in acme.run("window", "list", "-t", "acme").stdout


def test_profiles_rules_emergency_numbers_and_scanners(acme: GuardCli) -> None:
    acme.run("profile", "add", "sales", "--classes", "local,national,international", "-t", "acme")
    acme.run("profile", "set", "sales", "--classes", "national,local", "-t", "acme")
    profiles = acme.json("profile", "list", "--tenant", "acme")
    assert {"tenant": "acme", "name": "sales", "classes": ["local", "national"]} in profiles
    acme.run("ext", "set", "1001", "-t", "acme", "--profile", "sales")
    assert acme.json("ext", "show", "1001", "-t", "acme")["profile"] == "sales"

    cap = acme.json("block", "add", "--class", "premium", "--max-rate", "0.50", "-t", "acme")
    assert (cap["class"], cap["max_rate"], cap["max_rate_units"]) == ("premium", "0.5000", 5000)
    acme.run("block", "add", "--prefix", "882", "--note", "satellite")
    rules = acme.json("block", "list", "--tenant", "acme")
    assert [(r["tenant"], r["prefix"], r["class"]) for r in rules] == [
        ("acme", None, "premium"),
        (None, "882", None),
    ]
    assert "cap 0.5000/min" in acme.run("block", "list", "-t", "acme").stdout
    acme.run("block", "remove", str(cap["id"]))
    assert len(acme.json("block", "list", "--tenant", "acme")) == 1

    acme.run("emergency", "add", "116117", "--tenant", "acme")
    numbers = acme.json("emergency", "list", "--tenant", "acme")
    assert {"number": "112", "tenant": None, "builtin": True} in numbers
    assert {"number": "116117", "tenant": "acme", "builtin": False} in numbers
    acme.run("emergency", "remove", "116117", "--tenant", "acme")

    acme.run("scanner", "add", "EvilScan")
    patterns = acme.json("scanner", "list")
    assert {"pattern": "evilscan", "builtin": False} in patterns
    assert {"pattern": "friendly-scanner", "builtin": True} in patterns
    acme.run("scanner", "remove", "evilscan")


# --- rate decks --------------------------------------------------------------------------------


def test_bad_rows_are_reported_by_line_and_nothing_is_imported(
    acme: GuardCli, tmp_path: Path
) -> None:
    bad = _csv(tmp_path, BAD_RATES)
    result = acme.run("rates", "import", bad, code=2)
    assert result.stderr.splitlines()[:3] == [
        "line 3: rate_per_minute: must not be negative: '-0.02'",
        "line 4: prefix: invalid '35x': 1-32 digits",
        "line 5: class: invalid 'moon': one of emergency, local, national, mobile, tollfree, "
        "international, premium, satellite, special",
    ]
    assert "nothing imported" in result.stderr
    assert "import the 2 good row(s) with --skip-bad" in result.stderr
    assert acme.json("rates", "list") == []
    report = acme.json("rates", "import", bad, code=2)
    assert [error["line"] for error in report["errors"]] == [3, 4, 5]
    assert report["imported"] == 0

    result = acme.run("rates", "import", bad, "--skip-bad")
    assert "warning: skipped 3 bad row(s)" in result.stderr
    assert [r["prefix"] for r in acme.json("rates", "list")] == ["33", "37"]


def test_import_replaces_or_merges_a_tenant_deck(acme: GuardCli, tmp_path: Path) -> None:
    result = acme.run("rates", "import", _csv(tmp_path, GOOD_RATES), "--tenant", "acme")
    assert "imported 3 rate(s) into the acme deck (replace)" in result.stdout
    extra = _csv(tmp_path, BAD_RATES.split("34,")[0], "extra.csv")
    report = acme.json("rates", "import", extra, "--tenant", "acme", "--merge")
    assert (report["imported"], report["total"]) == (1, 4)
    report = acme.json("rates", "import", extra, "--tenant", "acme")
    assert (report["deleted"], report["total"]) == (4, 1)


def test_broken_csv_is_never_imported_even_with_skip_bad(acme: GuardCli, tmp_path: Path) -> None:
    broken = _csv(
        tmp_path, GOOD_RATES + '45,"Denmark,international,0.1,0,1,1\n46,x,local,1,0,1,1\n'
    )
    result = acme.run("rates", "import", broken, "--skip-bad", code=2)
    assert "broken CSV" in result.stderr
    assert "nothing imported" in result.stderr
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(GOOD_RATES.replace("London", "Londres é").encode("latin-1"))
    assert "not UTF-8" in acme.run("rates", "import", str(latin), code=2).stderr


def test_lookup_normalizes_with_the_tenants_dialing_rules(acme: GuardCli, tmp_path: Path) -> None:
    acme.run("rates", "import", _csv(tmp_path, GOOD_RATES), "--tenant", "acme")
    found = acme.json("rates", "lookup", LONDON, "--tenant", "acme")
    assert (found["dialed"], found["normalized"]) == (LONDON, "442079460000")
    assert found["rate"]["prefix"] == "4420"
    assert found["rate"]["rate_per_minute"] == "0.0100"
    assert found["rate"]["initial_increment"] == 60
    human = acme.run("rates", "lookup", "07700900123", "-t", "acme").stdout
    assert "prefix       447" in human and "increments   1/1 s" in human
    assert acme.json("rates", "lookup", "112", "-t", "acme")["emergency"] is True
    missing = acme.run("rates", "lookup", PARIS, "--tenant", "acme", code=1)
    assert "no rate for 33140000000" in missing.stderr
    assert acme.json("rates", "lookup", "+442079460000", code=1)["rate"] is None


def test_rates_list_honours_the_limit(acme: GuardCli, tmp_path: Path) -> None:
    acme.run("rates", "import", _csv(tmp_path, GOOD_RATES))
    assert [r["prefix"] for r in acme.json("rates", "list", "--limit", "2")] == ["44", "4420"]
    result = acme.run("rates", "list", "--limit", "2")
    assert "(2 of 3 rates shown: --limit 3 for all)" in result.stdout


# --- settings, demo, serve and sweep -----------------------------------------------------------


def test_config_show_never_prints_a_password(acme: GuardCli) -> None:
    secrets = {
        "GUARD_DATABASE_URL": "postgresql://guard:pg-s3cret@db.example/guard?sslpassword=ssl-s3cret",
        "GUARD_REDIS_URL": "redis+sentinel://:redis-s3cret@h1:26379,h2:26379/guard",
    }
    for args in (["config", "show"], ["config", "show", "--json"]):
        result = acme.run(*args, **secrets)
        assert "s3cret" not in result.output
        assert "guard:***@db.example" in result.output
        assert ":***@h1:26379,h2:26379" in result.output
    settings = acme.json("config", "show")
    assert settings["agi_listen"] == ["127.0.0.1:4573"]
    assert settings["redis_prefix"] == acme.key_prefix


def test_config_vars_is_a_markdown_table_of_every_setting(acme: GuardCli) -> None:
    lines = acme.run("config", "vars").stdout.splitlines()
    assert lines[0] == "| Variable | Default | Meaning |"
    assert len(lines) == 2 + 1 + len(SETTINGS)
    assert all(f"`{spec.env}`" in "\n".join(lines) for spec in SETTINGS)
    assert lines[3].startswith("| `GUARD_DATABASE_URL` | `sqlite:///guard.db` |")


def test_demo_is_idempotent(guard: GuardCli) -> None:
    first = guard.run("demo")
    assert "DEMO DATA" in first.stdout
    assert "created  extension 1002: international, 10.0000 a day" in first.stdout
    assert "guard check -t demo -e 1001" in first.stdout
    again = guard.run("demo")
    assert "created" not in again.stdout
    assert len(guard.json("ext", "list", "--tenant", "demo")) == 2
    assert len(guard.json("window", "list", "--tenant", "demo")) == 6
    assert len(guard.json("block", "list", "--tenant", "demo")) == 3


def test_serve_runs_the_service_with_the_given_addresses(
    guard: GuardCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Settings, float]] = []

    def fake_serve(settings: Settings, *, drain_seconds: float, **_: Any) -> int:
        calls.append((settings, drain_seconds))
        return 0

    monkeypatch.setattr(workers, "serve_forever", fake_serve)  # imported when serve runs
    guard.run("serve", "--listen", "0.0.0.0:4573", "--listen", "[::1]:4574", "--drain-seconds", "3")
    settings, drain = calls[0]
    assert settings.agi_listen == (("0.0.0.0", 4573), ("::1", 4574))
    assert drain == 3
    result = guard.run("serve", GUARD_REDIS_URL="memory://")
    assert "*** WARNING: ledger store memory://" in result.stderr
    assert calls[1][0].agi_listen == (("127.0.0.1", 4573),)


def test_sweep_charges_expired_reservations_once(guard: GuardCli) -> None:
    guard.run("demo")
    started = time.time() - 3600
    request = ReserveRequest(
        tenant="demo",
        extension="1001",
        call_id="lost-hangup",
        day=tenant_day("Europe/London", started),
        now=started,
        rate=Rate("4420", "London", DestinationClass.LOCAL, parse_money("0.01"), 0, 60, 60),
        number="442079460000",
        ext_daily_limit=None,
        tenant_daily_limit=None,
        ext_concurrent_limit=None,
        tenant_concurrent_limit=None,
        max_call_seconds=120,
        grace_seconds=0,
    )
    assert guard.ledger(lambda ledger: ledger.reserve(request)).allowed
    swept = guard.json("sweep")
    assert [(s["tenant"], s["extension"], s["call_id"]) for s in swept] == [
        ("demo", "1001", "lost-hangup")
    ]
    assert (swept[0]["charged"], swept[0]["charged_units"]) == ("0.0200", 200)
    assert "nothing to sweep" in guard.run("sweep").stdout
    assert "nothing to sweep here" in guard.run("sweep", GUARD_REDIS_URL="memory://").stderr


def test_a_few_commands_on_postgresql(pg_url: str, key_prefix: str, tmp_path: Path) -> None:
    guard = GuardCli(pg_url, key_prefix)
    assert "revision" in guard.run("db", "upgrade").stdout
    guard.run("tenant", "add", "acme", "--country-code", "44", "--daily", "50")
    guard.run("ext", "add", "1001", "--tenant", "acme", "--daily", "5")
    guard.run("rates", "import", _csv(tmp_path, GOOD_RATES), "--tenant", "acme")
    guard.run("net", "add", "--tenant", "acme", "192.0.2.0/24")
    assert guard.json("tenant", "show", "acme")["daily_limit_units"] == 500_000
    allowed = guard.json("check", "-t", "acme", "-e", "1001", "--to", LONDON, "--ip", "192.0.2.7")
    assert allowed["destination"]["prefix"] == "4420"
    refused = guard.run(
        "check", "-t", "acme", "-e", "1001", "--to", LONDON, "--ip", "198.51.100.1", code=1
    )
    assert refused.stdout.startswith("DENY  source_ip_not_allowed")
    guard.run("rates", "import", _csv(tmp_path, BAD_RATES), code=2)
    assert len(guard.json("rates", "list", "--tenant", "acme")) == 3
