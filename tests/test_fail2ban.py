"""The shipped fail2ban filter, run by the real ``fail2ban-regex`` on Guard's own event log.

Only the true source IPs of blocks and scanners may match, whatever hostile User-Agents,
tenants or extensions the log holds, and whatever an admin's block (``guard ip block``, which
writes the same event line to its stderr) says about who blocked and why. A missing
``fail2ban-regex`` fails the test (``.ci/run`` installs it).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.cli import cli
from guard.config.db import upgrade
from guard.events import Event, EventBus, EventKind
from guard.logs import TextFormatter

CONTRIB = Path(__file__).resolve().parents[1] / "contrib" / "fail2ban"
FILTER = CONTRIB / "filter.d" / "guard.conf"

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


def fail2ban_matches(log: Path) -> list[str]:
    """The source addresses ``fail2ban-regex`` finds in ``log`` with the shipped filter."""
    tool = shutil.which("fail2ban-regex")
    if tool is None:
        pytest.fail("fail2ban-regex is not installed (apt-get install fail2ban); .ci/run does it")
    result = subprocess.run(
        [tool, "--out", "ip", str(log), str(FILTER)],
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
