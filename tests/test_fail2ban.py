"""The shipped fail2ban filter, run by the real ``fail2ban-regex`` on Guard's own event log.

Only the true source IPs of blocks and scanners may match, whatever hostile User-Agents,
tenants or extensions the log holds, and whatever an admin's block (``guard ip block``, which
writes the same event line to its stderr) says about who blocked and why. With the systemd
backend the jail reads the journals of exactly the shipped units whose command logs refusals and
blocks. A missing ``fail2ban-regex`` fails the test (``.ci/run`` installs it).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from systemd_support import shipped_units

from guard.cli import cli
from guard.config.db import upgrade
from guard.events import Event, EventBus, EventKind
from guard.logs import TextFormatter

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = ROOT / "contrib" / "fail2ban"
FILTER = CONTRIB / "filter.d" / "guard.conf"
#: Whether each command a shipped unit runs logs refusals and blocks (``kind=refused``,
#: ``kind=ip_blocked``): the servers run the engine; the dashboard's only events are its users'
#: actions (``kind=admin``, proven below).
LOGS_REFUSALS = {"serve": True, "ari": True, "dashboard": False}

HOSTILE = [
    'Evil", "9999", "x" ip=6.6.6.6 %0A',
    "UA src=6.6.6.6",
    "x kind=ip_blocked reason=too_many_refusals src=6.6.6.6 tenant=acme",
    "a\nkind=refused reason=scanner_user_agent src=7.7.7.7 tenant=x",
    "b\r\n2030-01-01T00:00:00.000Z WARNING guard.events event kind=ip_blocked reason=x"
    " src=8.8.8.8 ",
    "\u2028src=9.9.9.9 \x85src=9.9.9.8 \x00",
    "guard.events event kind=refused reason=ip_blocked src=5.5.5.5 tenant=",
]


@pytest.fixture
def event_log(tmp_path: Path) -> Iterator[tuple[Path, EventBus]]:
    """A file written by ``guard.events`` in Guard's text format, and a bus that writes it."""
    path = tmp_path / "guard.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("guard.events")
    old = logger.handlers[:], logger.propagate, logger.level
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield path, EventBus()
    handler.close()
    logger.handlers[:], logger.propagate = old[0], old[1]
    logger.setLevel(old[2])


def fail2ban_regex() -> str:
    tool = shutil.which("fail2ban-regex")
    if tool is None:
        pytest.fail("fail2ban-regex is not installed (apt-get install fail2ban); .ci/run does it")
    return tool


def fail2ban_matches(log: Path) -> list[str]:
    """The source addresses ``fail2ban-regex`` finds in ``log`` with the shipped filter."""
    result = subprocess.run(
        [fail2ban_regex(), "--out", "ip", str(log), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def test_the_filter_matches_only_true_source_ips(event_log: tuple[Path, EventBus]) -> None:
    path, bus = event_log
    for ua in HOSTILE:
        # Not banned: refusals for other reasons, whatever their values say.
        bus.emit(Event(EventKind.REFUSED, "no_rate", ua, ua, "198.51.100.9", "1.1", {"ua": ua}))
        bus.emit(Event(EventKind.LOCKED, "user_agent_mismatch", ua, ua, "198.51.100.8", "", {}))
        bus.emit(Event(EventKind.REFUSED, "unknown_extension", "acme", ua, "198.51.100.7"))
        # Banned: a scanner, a block, and a blocked IP that keeps trying.
        bus.emit(
            Event(EventKind.REFUSED, "scanner_user_agent", ua, ua, "203.0.113.5", "", {"ua": ua})
        )
    bus.emit(Event(EventKind.IP_BLOCKED, "too_many_refusals", "acme", "1001", "203.0.113.6", "c"))
    bus.emit(Event(EventKind.IP_BLOCKED, "scanner_user_agent", "acme", "1", "2001:db8::7", "c"))
    bus.emit(Event(EventKind.REFUSED, "ip_blocked", "acme", "1001", "203.0.113.8", "c"))
    # A source that is not an address is logged as src=- and never matches.
    bus.emit(Event(EventKind.REFUSED, "scanner_user_agent", source_ip="6.6.6.6 src=1.2.3.4"))

    lines = path.read_text("utf-8").split("\n")
    assert len([line for line in lines if line]) == 4 * len(HOSTILE) + 4

    matched = fail2ban_matches(path)
    assert sorted(set(matched)) == ["2001:db8::7", "203.0.113.5", "203.0.113.6", "203.0.113.8"]
    assert matched.count("203.0.113.5") == len(HOSTILE)


def test_an_admin_block_from_the_cli_is_banned(
    tmp_path: Path, sqlite_url: str, redis_url: str, key_prefix: str
) -> None:
    """``guard ip block`` logs ``kind=ip_blocked`` on stderr; the admin's name (``SUDO_USER``)
    and ``--reason`` are free text, and hostile ones forge nothing."""
    upgrade(sqlite_url)
    env = {
        "GUARD_DATABASE_URL": sqlite_url,
        "GUARD_REDIS_URL": redis_url,
        "GUARD_REDIS_PREFIX": key_prefix,
        "GUARD_LOG_FORMAT": "text",
        "GUARD_CONFIG": None,
    }
    runs = [
        ("203.0.113.20", "alice", "abuse"),
        ("2001:db8::20", "alice", "blocked by an admin"),
        *(
            ("203.0.113.20", text, text if text.isprintable() else "abuse")
            for text in HOSTILE
            if "\x00" not in text  # an environment variable cannot hold it
        ),
    ]
    lines: list[str] = []
    for address, actor, reason in runs:
        result = CliRunner().invoke(
            cli,
            ["ip", "block", address, "--reason", reason],
            env={**env, "SUDO_USER": actor},
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        assert "blocked" in result.stdout and "event" not in result.stdout
        assert len(result.stderr.splitlines()) == 1, result.stderr
        lines.append(result.stderr)
    assert (
        "WARNING guard.events event kind=ip_blocked reason=admin_block src=203.0.113.20 "
        in (lines[0])
    )
    assert lines[0].rstrip("\n").endswith("tenant=- ext=- call_id=- until=- by=alice note=abuse")
    path = tmp_path / "guard-cli.log"
    path.write_text("".join(lines), "utf-8")
    matched = fail2ban_matches(path)
    assert sorted(set(matched)) == ["2001:db8::20", "203.0.113.20"]
    assert len(matched) == len(runs)


def test_the_jail_uses_the_filter() -> None:
    jail = (CONTRIB / "jail.d" / "guard.conf").read_text()
    assert "[guard]" in jail and "filter    = guard" in jail and "maxretry  = 1" in jail


def journal_match(tmp_path: Path) -> list[list[str]]:
    """The filter's ``journalmatch`` as fail2ban reads it and hands it to the journal (its
    systemd backend, on an empty journal), split into the groups that ``+`` ORs."""
    journal = tmp_path / "journal"
    journal.mkdir()
    result = subprocess.run(
        [fail2ban_regex(), f"systemd-journal[journalpath={journal}]", str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"^Use +journal match : (.*)$", result.stdout, re.MULTILINE)
    assert found is not None, result.stdout
    groups: list[list[str]] = [[]]
    for word in found.group(1).split():
        if word == "+":
            groups.append([])
        else:
            groups[-1].append(word)
    return groups


def test_the_jail_reads_every_unit_that_logs_refusals(tmp_path: Path) -> None:
    """Exactly the shipped units whose command logs refusals and blocks, one group each, by
    ``_SYSTEMD_UNIT``, a field only the journal sets: no local user's own lines can make the
    jail ban an address."""
    units = shipped_units()
    assert {unit.command for unit in units} <= set(LOGS_REFUSALS), "classify the new unit above"
    expected = sorted([f"_SYSTEMD_UNIT={u.name}"] for u in units if LOGS_REFUSALS[u.command])
    assert sorted(journal_match(tmp_path)) == expected


def test_the_dashboard_logs_no_refusal_or_block() -> None:
    """What ``LOGS_REFUSALS`` says of ``guard dashboard``: it never authorizes a call, and the
    only events it emits itself are admin actions."""
    sources = [
        ROOT / "guard" / "cli" / "dashboard.py",
        *(ROOT / "guard" / "dashboard").glob("*.py"),
    ]
    text = "\n".join(path.read_text("utf-8") for path in sources)
    assert set(re.findall(r"\bEventKind\.(\w+)", text)) == {"ADMIN"}
    assert not re.search(r"\.(?:authorize|settle|sweep)\(", text)
