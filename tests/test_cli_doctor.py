"""``guard doctor``: says what works, what is switched off, and fails when Guard cannot work."""

from __future__ import annotations

import json
from pathlib import Path

from cli_support import GuardCli


def _findings(cli: GuardCli, *, code: int, **env: str) -> dict[str, dict[str, str]]:
    result = cli.run("doctor", "--json", code=code, **env)
    return {item["check"]: item for item in json.loads(result.output)}


def test_a_healthy_installation_passes_and_says_what_is_off(
    sqlite_url: str, key_prefix: str
) -> None:
    cli = GuardCli(sqlite_url, key_prefix)
    cli.run("db", "upgrade")
    found = _findings(cli, code=0)
    assert found["sql"]["status"] == "ok"
    assert found["counter store"]["status"] == "ok"
    assert found["geoip"]["status"] == "warn"
    assert "country lists are NOT checked" in found["geoip"]["detail"]
    assert found["ari"]["status"] == "warn"


def test_the_embedded_store_is_flagged(sqlite_url: str, key_prefix: str) -> None:
    cli = GuardCli(sqlite_url, key_prefix, redis_url="memory://")
    cli.run("db", "upgrade")
    found = _findings(cli, code=0)
    assert found["counter store"]["status"] == "warn"
    assert "NOT shared" in found["counter store"]["detail"]


def test_unreachable_redis_and_missing_migrations_fail(sqlite_url: str, key_prefix: str) -> None:
    cli = GuardCli(sqlite_url, key_prefix, redis_url="redis://:s3cret@127.0.0.1:1/0")
    result = cli.run("doctor", code=1)
    assert "FAIL" in result.output
    assert "guard db upgrade" in result.output
    assert "s3cret" not in result.output


def test_an_unreadable_geoip_database_fails(
    sqlite_url: str, key_prefix: str, tmp_path: Path
) -> None:
    cli = GuardCli(sqlite_url, key_prefix)
    cli.run("db", "upgrade")
    found = _findings(cli, code=1, GUARD_GEOIP_DB=str(tmp_path / "missing.mmdb"))
    assert found["geoip"]["status"] == "FAIL"
