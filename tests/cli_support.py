"""Helpers shared by the CLI tests: run ``guard`` in process against a store of the test's own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from click.testing import CliRunner, Result

from guard.cli import cli
from guard.ledger import RedisLedger, ledger_from_url

_T = TypeVar("_T")
REDIS_URL = "redis://127.0.0.1:6379/0"
#: A Monday 10:00 and a Sunday 10:00 in London: inside and outside the demo's windows.
OPEN = "2030-01-07T10:00"
CLOSED = "2030-01-06T10:00"
OFFICE_IP = "192.0.2.10"
PHONE = "Yealink SIP-T46S 66.86.0.15"
LONDON = "02079460000"
PARIS = "0033140000000"


class GuardCli:
    """``guard`` invoked in process with its own environment; checks the exit status."""

    def __init__(self, database_url: str, key_prefix: str, redis_url: str = REDIS_URL) -> None:
        self.env: dict[str, str | None] = {
            "GUARD_DATABASE_URL": database_url,
            "GUARD_REDIS_URL": redis_url,
            "GUARD_REDIS_PREFIX": key_prefix,
            "GUARD_CONFIG": None,
        }
        self.key_prefix = key_prefix
        self.redis_url = redis_url

    def run(self, *args: str, code: int = 0, **env: str) -> Result:
        result = CliRunner().invoke(cli, list(args), env={**self.env, **env})
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception,
            result.output,
        )
        assert "Traceback" not in result.output, result.output
        assert result.exit_code == code, (result.exit_code, result.output)
        return result

    def json(self, *args: str, code: int = 0, **env: str) -> Any:
        return json.loads(self.run(*args, "--json", code=code, **env).stdout)

    def ledger(self, operation: Callable[[RedisLedger], Awaitable[_T]]) -> _T:
        """Run ``operation`` on the test's ledger (the same keys as the CLI's)."""

        async def run() -> _T:
            async with ledger_from_url(self.redis_url, prefix=self.key_prefix, timeout=2) as ledger:
                return await operation(ledger)

        return asyncio.run(run())


def check_args(
    ext: str, number: str, *extra: str, ua: str = PHONE, at: str = OPEN, ip: str = OFFICE_IP
) -> list[str]:
    """``guard check`` arguments for a call of the demo tenant from the office."""
    return [
        "check",
        "--tenant",
        "demo",
        "--ext",
        ext,
        "--to",
        number,
        "--ip",
        ip,
        "--ua",
        ua,
        "--at",
        at,
        *extra,
    ]
