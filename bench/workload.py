"""What the benchmarks run against: a throw-away configuration, a call mix, and Guard in a process.

``seed_config`` writes a fresh SQLite configuration (migrated with ``guard.config.db.upgrade``,
filled through ``guard.config.repository`` like an admin would) with T tenants of E extensions each,
on a small UK-style global rate deck. ``CallMix`` draws calls from it: a destination mix (local,
national, mobile, international) and a share of calls that Guard must refuse (a premium number
that the profile does not allow, a scanner User-Agent, an unknown extension), each with the
environment block Asterisk sent in the real transcripts, only the call's own values changed.
``GuardProcess`` runs ``guard serve`` (or any server command) in its own process, so that the load
generator and the server never share an event loop, and stops it with SIGTERM.

Benchmark code: never imported by Guard or its tests.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from guard.agi.testing import Transcript, load_transcripts, replace_environment
from guard.config import db, repository
from guard.domain import DestinationClass, Rate

REPO = Path(__file__).resolve().parents[1]
TRANSCRIPTS = REPO.parent / "shared" / "asterisk" / "agi-sessions.jsonl"
ACTOR = "bench"
USER_AGENT = "Yealink SIP-T46S 66.86.0.15"
SCANNER_USER_AGENT = "friendly-scanner"
#: Daily limits far above what a benchmark spends: the limits are checked, never binding.
DAILY_LIMIT = 10**11

#: Dialed numbers (national format, UK tenant) by destination kind, and their global rates.
DESTINATIONS: Mapping[str, str] = {
    "local": "0207946",
    "national": "0161496",
    "mobile": "07700900",
    "international": "0033140",
}
RATES = (
    Rate("44", "United Kingdom", DestinationClass.NATIONAL, 200, 0, 60, 60),
    Rate("447", "United Kingdom mobile", DestinationClass.MOBILE, 1_000, 0, 60, 60),
    Rate("4420", "London", DestinationClass.LOCAL, 100, 0, 60, 60),
    Rate("4490", "United Kingdom premium", DestinationClass.PREMIUM, 15_000, 0, 60, 60),
    Rate("33", "France", DestinationClass.INTERNATIONAL, 800, 0, 1, 1),
    Rate("1", "USA and Canada", DestinationClass.INTERNATIONAL, 500, 0, 1, 1),
)
#: The rate each destination kind is billed at (its longest matching prefix).
KIND_RATES: Mapping[str, Rate] = {
    "local": RATES[2],
    "national": RATES[0],
    "mobile": RATES[1],
    "international": RATES[4],
}
PREMIUM = "0900123"
DEFAULT_MIX: Mapping[str, float] = {
    "local": 0.4,
    "national": 0.3,
    "mobile": 0.2,
    "international": 0.1,
}


def tenant_name(index: int) -> str:
    return f"t{index:05d}"


def extension_name(index: int) -> str:
    return f"{1000 + index}"


def seed_config(url: str, tenants: int, extensions: int) -> None:
    """Migrate ``url`` and fill it with ``tenants`` tenants of ``extensions`` extensions each."""
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        repository.import_rates(engine, RATES, actor=ACTOR)
        for t in range(tenants):
            name = tenant_name(t)
            repository.add_tenant(
                engine,
                name,
                actor=ACTOR,
                timezone="Europe/London",
                currency="GBP",
                daily_limit=DAILY_LIMIT,
                country_code="44",
            )
            for e in range(extensions):
                repository.add_extension(
                    engine,
                    name,
                    extension_name(e),
                    actor=ACTOR,
                    profile="international",
                    daily_limit=DAILY_LIMIT,
                )
    finally:
        engine.dispose()


@dataclass(frozen=True, slots=True)
class Call:
    """One generated call: its environment blocks and what Guard must answer."""

    uniqueid: str
    tenant: str
    authorize: bytes
    settle: bytes
    must_allow: bool
    billsec: int
    #: The rate an allowed call is billed at (``None`` for a call that must be refused).
    rate: Rate | None


class CallMix:
    """Deterministic calls over ``tenants`` x ``extensions`` with ``refused`` of them refusable."""

    def __init__(
        self,
        port: int,
        tenants: int,
        extensions: int,
        *,
        refused: float = 0.1,
        mix: Mapping[str, float] = DEFAULT_MIX,
        seed: int = 7,
        run_id: str = "",
    ) -> None:
        recorded = load_transcripts(TRANSCRIPTS)
        self._authorize: Transcript = recorded["authorize-pjsip"]
        self._settle: Transcript = recorded["settle-pjsip"]
        self._port = port
        self._tenants = tenants
        self._extensions = extensions
        self._refused = refused
        self._kinds = list(mix)
        self._weights = [mix[kind] for kind in self._kinds]
        self._random = random.Random(seed)
        self._run_id = run_id or f"{os.getpid()}{int(time.time()) % 100_000}"

    def call(self, index: int) -> Call:
        draw = self._random
        tenant = tenant_name(draw.randrange(self._tenants))
        extension = extension_name(draw.randrange(self._extensions))
        user_agent = USER_AGENT
        must_allow = draw.random() >= self._refused
        rate = None
        if must_allow:
            kind = draw.choices(self._kinds, self._weights)[0]
            number = DESTINATIONS[kind] + f"{draw.randrange(10_000):04d}"
            rate = KIND_RATES[kind]
        else:
            number = DESTINATIONS["local"] + f"{draw.randrange(10_000):04d}"
            refusal = index % 3
            if refusal == 0:
                number = PREMIUM + f"{draw.randrange(10_000):04d}"
            elif refusal == 1:
                user_agent = SCANNER_USER_AGENT
            else:
                extension = "9" + extension
        uniqueid = f"{self._run_id}.{index}"
        channel = f"PJSIP/{extension}-{index:08x}"
        source_ip = f"10.{index % 250}.{(index // 250) % 250}.{draw.randrange(1, 250)}"
        script = (
            f"authorize?tenant={quote(tenant)}&ext={quote(extension)}&to={quote(number)}"
            f"&ip={quote(source_ip)}&ua={quote(user_agent, safe='')}&cid={quote(extension)}"
        )
        billsec = draw.randrange(0, 600)
        settle = f"settle?tenant={quote(tenant)}&billsec={billsec}"
        return Call(
            uniqueid=uniqueid,
            tenant=tenant,
            authorize=self._environment(self._authorize, script, uniqueid, channel, number),
            settle=self._environment(self._settle, settle, uniqueid, channel, "h"),
            must_allow=must_allow,
            billsec=billsec,
            rate=rate,
        )

    def _environment(
        self, transcript: Transcript, script: str, uniqueid: str, channel: str, extension: str
    ) -> bytes:
        return replace_environment(
            transcript.environment,
            network_script=script,
            request=f"agi://127.0.0.1:{self._port}/{script}",
            uniqueid=uniqueid,
            channel=channel,
            extension=extension,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and of its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and of its live children (pre-fork workers)."""
    total = cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        for child in children.read_text().split():
            with contextlib.suppress(OSError):
                total += cpu_seconds(int(child))
    return total


class GuardProcess:
    """A server command (``guard serve`` by default) in its own process, with a log file."""

    def __init__(
        self,
        port: int,
        env: Mapping[str, str],
        log_path: Path,
        command: Sequence[str] | None = None,
    ) -> None:
        self.port = port
        self.command = list(command or [str(Path(sys.executable).with_name("guard")), "serve"])
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> GuardProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.command} exited:\n{tail}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as probe,
            ):
                probe.close()
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.command} did not listen on {self.port} within {timeout} s")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def errors(self) -> list[str]:
        """The ERROR lines the server logged."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [line for line in text.splitlines() if " ERROR " in line or '"ERROR"' in line]
