"""``guard ip``, ``guard threat``, ``guard geoip``, ``guard events``, ``guard alerts`` and the
limit raises, run as an admin would, against SQLite and the real Redis; every change audited."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from guard.cli import cli
from guard.config import repository as repo
from guard.config.db import make_engine, upgrade


@pytest.fixture
def env(sqlite_url: str, redis_url: str, key_prefix: str) -> dict[str, str]:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    repo.add_tenant(engine, "acme", actor="setup", daily_limit=500_000)
    repo.add_extension(engine, "acme", "1001", actor="setup", daily_limit=50_000)
    engine.dispose()
    return {
        "GUARD_DATABASE_URL": sqlite_url,
        "GUARD_REDIS_URL": redis_url,
        "GUARD_REDIS_PREFIX": key_prefix,
        "SUDO_USER": "alice",
    }


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def audit_kinds(env: dict[str, str]) -> list[str]:
    engine = make_engine(env["GUARD_DATABASE_URL"])
    try:
        return [e.kind for e in repo.list_audit_events(engine, kind="admin.", limit=100)]
    finally:
        engine.dispose()


def test_ip_block_list_unblock(env: dict[str, str]) -> None:
    assert (
        run(env, "ip", "block", "198.51.100.23", "--for", "2h", "--reason", "abuse").exit_code == 0
    )
    assert run(env, "ip", "block", "::ffff:203.0.113.9").exit_code == 0
    listed = json.loads(run(env, "ip", "list", "--json").output)
    assert [(b["ip"], b["permanent"], b["by"]) for b in listed] == [
        ("198.51.100.23", False, "alice"),
        ("203.0.113.9", True, "alice"),
    ]
    assert run(env, "ip", "unblock", "203.0.113.9").exit_code == 0
    again = run(env, "ip", "unblock", "203.0.113.9")
    assert again.exit_code == 1 and "was not blocked" in again.output
    bad = run(env, "ip", "block", "6.6.6.6 src=1.2.3.4")
    assert bad.exit_code == 2 and "not an IP address" in bad.output
    assert audit_kinds(env)[:3] == ["admin.ip.unblock", "admin.ip.unblock", "admin.ip.block"]


def test_ip_block_writes_the_event_line_of_the_servers_log(env: dict[str, str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    text = run(env | {"GUARD_LOG_FORMAT": "text"}, "ip", "block", "198.51.100.23", "--for", "2h")
    assert text.stdout == "blocked 198.51.100.23 for 7200 s\n"
    (line,) = text.stderr.splitlines()
    assert " WARNING guard.events event kind=ip_blocked reason=admin_block src=198.51.100.23 " in (
        line
    )
    assert 'by=alice note="blocked by an admin"' in line
    replaced = run(
        env | {"GUARD_LOG_FORMAT": "json"}, "ip", "block", "198.51.100.23", "--reason", "abuse"
    )
    assert replaced.stdout.startswith("block replaced:")
    event = json.loads(replaced.stderr)
    assert {key: event[key] for key in ("logger", "kind", "reason", "src", "until", "by")} == {
        "logger": "guard.events",
        "kind": "ip_blocked",
        "reason": "admin_block",
        "src": "198.51.100.23",
        "until": "-",
        "by": "alice",
    }
    # The command's logging is undone after it (the process may go on: tests, a shell).
    assert (root.handlers, root.level) == (handlers, level)
    # Nothing is logged when nothing was blocked.
    assert run(env, "ip", "block", "not-an-ip").stderr.count("event") == 0
    down = run(env | {"GUARD_REDIS_URL": "redis://127.0.0.1:1/0"}, "ip", "block", "192.0.2.1")
    assert down.exit_code == 1 and "kind=ip_blocked" not in down.stderr


def test_ip_allow_and_policy(env: dict[str, str]) -> None:
    assert run(env, "ip", "allow", "add", "192.0.2.0/24", "--note", "office").exit_code == 0
    assert run(env, "ip", "allow", "add", "198.51.100.1", "--tenant", "acme").exit_code == 0
    listed = json.loads(run(env, "ip", "allow", "list", "--json").output)
    assert listed["settings"] == ["127.0.0.0/8", "::1/128"]
    assert [a["cidr"] for a in listed["allow"]] == ["192.0.2.0/24"]
    result = run(
        env, "ip", "policy", "--tenant", "acme", "--block-after", "5", "--block-for", "30m"
    )
    assert result.exit_code == 0 and "5 refused attempts" in result.output
    policy = json.loads(run(env, "ip", "policy", "--tenant", "acme", "--json").output)
    assert (policy["effective_threshold"], policy["effective_seconds"]) == (5, 1800)
    assert "admin.tenant.block_policy" in audit_kinds(env)


def test_threat_import_reports_bad_lines_and_imports_atomically(
    env: dict[str, str], tmp_path: Path
) -> None:
    listing = tmp_path / "apiban.txt"
    listing.write_text("# bad IPs\n198.51.100.23\nnot-an-ip\n203.0.113.0/24 ; SBL\n0.0.0.0/0\n")
    refused = run(env, "threat", "import", str(listing), "--kind", "ip")
    assert refused.exit_code == 2
    assert "line 3:" in refused.output and "line 5:" in refused.output
    assert json.loads(run(env, "threat", "list", "--json").output) == []
    done = run(env, "threat", "import", str(listing), "--kind", "ip", "--skip-bad", "--replace")
    assert done.exit_code == 0 and "2 imported, 2 in the list" in done.output
    numbers = tmp_path / "irsf.csv"
    numbers.write_text("prefix,destination\n+882,satellite\n00979,premium\n")
    assert run(env, "threat", "import", str(numbers), "--kind", "number").exit_code == 0
    lists = json.loads(run(env, "threat", "list", "--json").output)
    assert [(item["name"], item["kind"], item["entries"]) for item in lists] == [
        ("apiban", "ip", 2),
        ("irsf", "number", 2),
    ]
    assert run(env, "threat", "clear", "apiban").exit_code == 0
    assert run(env, "threat", "clear", "apiban").exit_code == 1
    assert audit_kinds(env)[:3] == [
        "admin.threat.clear",
        "admin.threat.import",
        "admin.threat.import",
    ]


def test_limit_raises_for_extensions_and_tenants(env: dict[str, str]) -> None:
    result = run(env, "ext", "raise", "1001", "--tenant", "acme", "--daily", "8", "--for", "4h")
    assert result.exit_code == 0 and "raised the daily limit of extension 1001" in result.output
    assert run(env, "tenant", "raise", "acme", "--daily", "500", "--for", "1d").exit_code == 0
    too_low = run(env, "tenant", "raise", "acme", "--daily", "1", "--for", "1h")
    assert too_low.exit_code == 2 and "not above" in too_low.output
    raises = json.loads(run(env, "raises", "list", "--json").output)
    assert [(r["extension"], r["daily_limit"]) for r in raises] == [
        ("1001", "8.0000"),
        (None, "500.0000"),
    ]
    assert run(env, "raises", "cancel", str(raises[0]["id"])).exit_code == 0
    assert len(json.loads(run(env, "raises", "list", "--json").output)) == 1


def test_events_list_filters_the_audit_log(env: dict[str, str]) -> None:
    run(env, "ip", "block", "198.51.100.23")
    events = json.loads(run(env, "events", "list", "--since", "1h", "--json").output)
    assert events[0]["kind"] == "admin.ip.block" and events[0]["actor"] == "alice"
    only = json.loads(
        run(
            env, "events", "list", "--tenant", "acme", "--kind", "admin.tenant.add", "--json"
        ).output
    )
    assert [e["kind"] for e in only] == ["admin.tenant.add"]
    table = run(env, "events", "list", "--limit", "1")
    assert table.exit_code == 0 and "admin.ip.block" in table.output
    assert run(env, "events", "list", "--since", "yesterday-ish").exit_code == 2


def test_geoip_without_a_database_says_so(env: dict[str, str]) -> None:
    status = run(env, "geoip", "status")
    assert status.exit_code == 1 and "NOT checked" in status.output
    result = run(env, "geoip", "set", "--tenant", "acme", "--allow", "gb,fr")
    assert result.exit_code == 0 and "allow FR,GB" in result.output
    assert "not checked" in result.output  # the warning


def test_alerts_test_reports_each_channel(env: dict[str, str]) -> None:
    ok = run(env, "alerts", "test")
    assert ok.exit_code == 0 and "log: sent" in ok.output
    broken = run(env | {"GUARD_ALERT_WEBHOOKS": "http://127.0.0.1:1/hook/secret"}, "alerts", "test")
    assert broken.exit_code == 1 and "FAILED" in broken.output and "secret" not in broken.output
