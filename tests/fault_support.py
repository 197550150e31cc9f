"""Helpers of the fault, worker and security tests: a configuration, `guard serve` in a process of
its own, calls played the way the shipped dialplan makes them, and the books of the money.

``GuardServer`` runs the real ``guard serve`` command (a child process: it can be SIGKILLed,
SIGTERMed and restarted); ``Phone`` plays a call's two FastAGI sessions with
``guard.agi.testing.FakeAsterisk`` (the environment blocks of the real transcripts); ``Books``
reads the ledger's own records from Redis so a test can check that every cent adds up: spend equals
the cost of every closed call (settled at its real cost, or swept at its reservation), each call
closed once, nothing left reserved or live, no limit passed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis

from guard.agi.testing import (
    FakeAsterisk,
    SessionRecord,
    Transcript,
    dialplan_outcome,
    load_transcripts,
    replace_environment,
)
from guard.config import db, repository
from guard.domain import DestinationClass, Rate
from guard.ledger.keys import tenant_base
from guard.money import parse_money

TENANT = "acme"
#: 0.02 a minute, billed by the second: every billsec has its own cost.
UK = Rate("44", "United Kingdom", DestinationClass.NATIONAL, parse_money("0.02"), 0, 1, 1)
NUMBER = "01614960000"
TENANT_DAILY = parse_money("50")
EXT_DAILY = parse_money("20")
EXT_CONCURRENT = 4
GUARD_COMMAND = (sys.executable, "-c", "from guard.cli import main; main()")


def seed(url: str, *, max_call_seconds: int = 3600) -> None:
    """Tenant ``acme`` (Europe/London, 50.00 a day) with extension ``1001`` (20.00 a day,
    4 calls at once) and one per-second UK rate."""
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        repository.add_tenant(
            engine,
            TENANT,
            actor="test",
            timezone="Europe/London",
            currency="GBP",
            country_code="44",
            daily_limit=TENANT_DAILY,
            concurrent_limit=20,
            max_call_seconds=max_call_seconds,
        )
        repository.add_extension(
            engine,
            TENANT,
            "1001",
            actor="test",
            daily_limit=EXT_DAILY,
            concurrent_limit=EXT_CONCURRENT,
        )
        repository.import_rates(engine, [UK], actor="test")
    finally:
        engine.dispose()


def guard_env(
    database_url: str, redis_url: str, prefix: str, port: int, **more: str
) -> dict[str, str]:
    """``GUARD_*`` variables of a test guard: quick sweeps and reloads, logs on stderr."""
    env = {
        "GUARD_DATABASE_URL": database_url,
        "GUARD_REDIS_URL": redis_url,
        "GUARD_REDIS_PREFIX": prefix,
        "GUARD_AGI_LISTEN": f"127.0.0.1:{port}",
        "GUARD_METRICS_LISTEN": "",
        "GUARD_SWEEP_INTERVAL": "0.3",
        "GUARD_RELOAD_INTERVAL": "0.2",
        "GUARD_GRACE_SECONDS": "1",
        "GUARD_REDIS_TIMEOUT_MS": "300",
        # The test phones' office: their refusals (limits, store down) must not block it.
        "GUARD_BLOCK_ALLOW": "127.0.0.0/8,192.0.2.0/24",
    }
    env.update({f"GUARD_{name.upper()}": value for name, value in more.items()})
    return env


class GuardServer:
    """``guard serve`` (and its arguments) in a child process, its output in a file."""

    def __init__(self, workdir: Path, env: Mapping[str, str], *args: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"guard-{time.monotonic_ns()}.log"
        self.env = {**os.environ, **env}
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def launch(self) -> GuardServer:
        """Start it, without waiting."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*GUARD_COMMAND, "serve", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def start(self, serving: int = 1, timeout: float = 30.0) -> GuardServer:
        """Start it and wait until ``serving`` processes log that they serve."""
        self.launch().wait_for("guard serving", count=serving, timeout=timeout)
        return self

    def wait_for(self, text: str, *, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.output.count(text) < count:
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"guard serve exited:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 20 s; the exit status (None if it never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


_TRANSCRIPTS = Path(__file__).resolve().parents[2] / "shared" / "asterisk" / "agi-sessions.jsonl"


class Phone:
    """Plays calls against a FastAGI address as the shipped dialplan does (authorize, settle)."""

    def __init__(self, port: int, transcripts: Mapping[str, Transcript] | None = None) -> None:
        recorded = transcripts or load_transcripts(_TRANSCRIPTS)
        self._authorize = recorded["authorize-pjsip"]
        self._settle = recorded["settle-pjsip"]
        self.port = port
        self.fake = FakeAsterisk("127.0.0.1", port)

    def _environment(self, transcript: Transcript, script: str, call_id: str) -> bytes:
        return replace_environment(
            transcript.environment,
            network_script=script,
            request=f"agi://127.0.0.1:{self.port}/{script}",
            uniqueid=call_id,
            channel=f"PJSIP/1001-{zlib.crc32(call_id.encode()):08x}",
        )

    async def authorize(
        self,
        call_id: str,
        *,
        ext: str = "1001",
        number: str = NUMBER,
        user_agent: str = "Yealink SIP-T46S 66.86.0.15",
        reply_delay: float = 0.0,
    ) -> SessionRecord:
        script = (
            f"authorize?tenant={TENANT}&ext={quote(ext)}&to={quote(number)}&ip=192.0.2.10"
            f"&ua={quote(user_agent, safe='')}"
        )
        return await self.fake.play(
            self._environment(self._authorize, script, call_id),
            reply_delay=reply_delay,
            time_limit=15,
        )

    async def settle(self, call_id: str, billsec: int) -> SessionRecord:
        script = f"settle?tenant={TENANT}&billsec={billsec}"
        return await self.fake.play(self._environment(self._settle, script, call_id), time_limit=15)


def allowed(record: SessionRecord) -> bool:
    """Would the shipped dialplan dial this call?"""
    return dialplan_outcome(record.variables)[0]


@dataclass
class Books:
    """The ledger's records of one tenant, read straight from Redis."""

    spent: int = 0
    reserved: int = 0
    ext_spent: dict[str, int] = field(default_factory=dict)
    live: int = 0
    open_calls: int = 0
    #: Closed call id -> its marker (``state``: settled, swept or orphan; ``cost``).
    closed: dict[str, dict[str, str]] = field(default_factory=dict)

    @staticmethod
    def read(redis_url: str, prefix: str, tenant: str = TENANT) -> Books:
        base = tenant_base(prefix, tenant)
        books = Books()
        with redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5) as client:
            for key in client.scan_iter(match=f"{base}:day:*", count=1000):
                day = client.hgetall(key)
                books.spent += int(day.get("spent", 0))
                books.reserved += int(day.get("reserved", 0))
                for name, value in day.items():
                    kind, _, ext = name.partition(":ext:")
                    if kind == "spent" and ext:
                        books.ext_spent[ext] = books.ext_spent.get(ext, 0) + int(value)
            books.live = int(client.hget(f"{base}:live", "tenant") or 0)
            books.open_calls = int(client.hlen(f"{base}:calls"))
            marker = f"{base}:settled:"
            for key in client.scan_iter(match=f"{marker}*", count=1000):
                books.closed[key[len(marker) :]] = json.loads(client.get(key) or "{}")
        return books

    def check(self, settled: Mapping[str, int]) -> None:
        """Assert the money rules; ``settled`` maps each call Guard reported settled to its cost.

        Spend is the sum of every closed call's cost (real cost once settled, the whole
        reservation if swept): nothing counted twice or lost; nothing is left reserved or live;
        no daily limit is passed.
        """
        for call_id, cost in settled.items():
            marker = self.closed.get(call_id)
            assert marker is not None, f"settled call {call_id} has no record"
            assert int(marker["cost"]) == cost, (call_id, marker, cost)
        charged = sum(int(m["cost"]) for m in self.closed.values() if m["state"] != "orphan")
        assert self.spent == charged, (self.spent, charged)
        assert (self.reserved, self.live, self.open_calls) == (0, 0, 0), self
        assert self.spent <= TENANT_DAILY
        assert all(spent <= EXT_DAILY for spent in self.ext_spent.values()), self.ext_spent


def wait_until_closed(redis_url: str, prefix: str, within: float) -> Books:
    """The books once no reservation is open (the sweeper has charged the lost hangups)."""
    deadline = time.monotonic() + within
    while True:
        books = Books.read(redis_url, prefix)
        if books.open_calls == 0 and books.live == 0:
            return books
        if time.monotonic() > deadline:
            raise AssertionError(f"reservations still open after {within} s: {books}")
        time.sleep(0.1)
