"""Helpers shared by the FastAGI tests: a stub engine and a server on an ephemeral port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.agi.routes import GuardRoutes
from guard.agi.server import AGIServer
from guard.agi.testing import FakeAsterisk, Transcript, load_transcripts
from guard.domain import CallAttempt, Decision, DestinationClass, Rate, Reason, Result
from guard.ledger.types import SettleOutcome, SettleResult

UK_FIXED = Rate("441", "United Kingdom fixed", DestinationClass.NATIONAL, 120)
HOSTILE_UA = 'Evil", "9999", "x" ip=6.6.6.6 %0A'


def transcripts(shared_dir: Path) -> dict[str, Transcript]:
    return load_transcripts(shared_dir / "asterisk" / "agi-sessions.jsonl")


def allow(attempt: CallAttempt, max_seconds: int = 120) -> Decision:
    return Decision(
        Result.ALLOW,
        Reason.ALLOWED,
        max_seconds,
        attempt.call_id,
        number=attempt.number,
        destination=UK_FIXED,
        reserved=240,
    )


@dataclass
class StubAuthorizer:
    """Records what the routes ask; answers with ``decide`` (ALLOW 120 s by default)."""

    decide: Callable[[CallAttempt], Decision] = allow
    authorize_error: Exception | None = None
    settle_error: Exception | None = None
    gate: asyncio.Event | None = None
    attempts: list[CallAttempt] = field(default_factory=list)
    settles: list[tuple[str, str, int]] = field(default_factory=list)

    async def authorize(self, attempt: CallAttempt) -> Decision:
        self.attempts.append(attempt)
        if self.gate is not None:
            await self.gate.wait()
        if self.authorize_error is not None:
            raise self.authorize_error
        return self.decide(attempt)

    async def settle(self, tenant: str, call_id: str, billsec: int) -> SettleResult:
        self.settles.append((tenant, call_id, billsec))
        if self.settle_error is not None:
            raise self.settle_error
        return SettleResult(SettleOutcome.SETTLED, tenant, call_id)


@asynccontextmanager
async def running(app: AGIServer) -> AsyncIterator[tuple[str, int]]:
    """Start ``app`` and yield its first address; shut it down (no grace) afterwards."""
    await app.start()
    try:
        yield app.addresses[0]
    finally:
        await app.shutdown(0)


@asynccontextmanager
async def guard_server(
    engine: StubAuthorizer, shared_dir: Path, **options: Any
) -> AsyncIterator[FakeAsterisk]:
    """A server with Guard's routes over ``engine``, and a FakeAsterisk pointed at it."""
    app = AGIServer([("127.0.0.1", 0)], **options)
    GuardRoutes(engine).install(app)
    async with running(app) as (host, port):
        yield FakeAsterisk(host, port, transcripts(shared_dir))


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Wait until ``condition()`` holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
