"""FastAGI load generator: Asterisk's side of many calls, against Guard or the bare responder.

Each call is what the shipped dialplan makes of it: an ``authorize`` session when the call starts
and, for a call that must be allowed, a ``settle`` session from the hangup handler when it ends.
Every session is a new connection played by ``guard.agi.testing.FakeAsterisk``: the environment
block of the real transcripts with the call's own values, each command answered as Asterisk 16
answered it. Calls come from ``bench.workload.CallMix`` (tenants x extensions, a destination mix,
a share that Guard must refuse) and are paced open-loop (``--rate`` calls a second, whatever the
answers' speed; ``--concurrency`` caps the calls in flight) or, with ``--rate 0``, closed-loop at
saturation (``--concurrency`` calls back to back).

The generator sets up everything and throws it away: a SQLite configuration in a temporary
directory, a Redis key prefix of its own (deleted after), and the server in its own process
(``guard serve`` with ``GUARD_*`` variables, or ``bench/bare_agi.py``), stopped with SIGTERM.
It reports sessions a second, the latency of authorize and settle sessions (first byte of the
environment sent -> connection closed by the server) as p50/p95/p99/max, the server's CPU time a
session, and errors: a session the server did not close, a decision other than the expected one,
a settle not ``settled``, an ERROR in the server's log, and money that does not add up afterwards
(spend must equal the cost of every settled call; nothing may stay reserved or live).

    python bench/agi_load.py compare --runs 3          # the README's table
    python bench/agi_load.py run --target guard --workers 2 --rate 500 --calls 5000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.workload import (
    Call,
    CallMix,
    GuardProcess,
    free_port,
    seed_config,
    tree_cpu_seconds,
)
from guard.agi.testing import FakeAsterisk, dialplan_outcome
from guard.ledger import ledger_from_url
from guard.money import call_cost
from guard.schedule import tenant_day
from guard.workers import run

BARE = [sys.executable, str(Path(__file__).with_name("bare_agi.py"))]
#: Longest wait for one session; a session that takes longer counts as an error.
SESSION_LIMIT = 10.0
#: A paced call started this much after its time counts as late (the generator fell behind).
LATE_SECONDS = 0.005
#: ``guard serve`` with an optional dependency hidden, to measure what it brings.
WITHOUT = "import sys; sys.modules[{name!r}] = None; from guard.cli import main; main()"


@dataclass(frozen=True, slots=True)
class Summary:
    """Latency percentiles in milliseconds."""

    count: int
    p50: float
    p95: float
    p99: float
    max: float

    @staticmethod
    def of(seconds: Sequence[float]) -> Summary:
        if not seconds:
            return Summary(0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(seconds)

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

        return Summary(len(ordered), pick(0.5), pick(0.95), pick(0.99), pick(1.0))


@dataclass
class Measurement:
    """One measured phase against one server."""

    target: str
    workers: int
    rate: float
    concurrency: int
    calls: int
    sessions: int = 0
    seconds: float = 0.0
    sessions_per_s: float = 0.0
    authorize: Summary = field(default_factory=lambda: Summary.of([]))
    settle: Summary = field(default_factory=lambda: Summary.of([]))
    server_cpu_us_per_session: float = 0.0
    redis_cpu_us_per_session: float = 0.0
    #: The load generator's own CPU (this process): on these two shared cores it bounds the rest.
    generator_cpu_us_per_session: float = 0.0
    late_calls: int = 0
    #: Errors while warming up (a cold pool of Redis connections), reported apart.
    warmup_errors: int = 0
    errors: list[str] = field(default_factory=list)


class Driver:
    """Plays calls against ``port`` and collects what they saw."""

    def __init__(self, port: int, *, check: bool, hold: float) -> None:
        self.fake = FakeAsterisk("127.0.0.1", port)
        self.check = check
        self.hold = hold
        self.authorize: list[float] = []
        self.settle: list[float] = []
        self.sessions = 0
        self.errors: list[str] = []
        self.settled: list[Call] = []
        #: Allowed calls whose settle failed (Redis too slow): it may or may not have run.
        self.unsettled: list[Call] = []

    async def call(self, call: Call) -> None:
        try:
            await self._call(call)
        except OSError as exc:
            self.errors.append(f"{call.uniqueid}: {type(exc).__name__}: {exc}")
        finally:
            self.fake.channels.pop(call.uniqueid, None)

    async def _call(self, call: Call) -> None:
        record = await self.fake.play(call.authorize, time_limit=SESSION_LIMIT)
        if not record.closed_by_server:
            self.errors.append(f"{call.uniqueid}: authorize session not closed by the server")
            return
        self.sessions += 1
        self.authorize.append(record.ended - record.started)
        if self.check and dialplan_outcome(record.variables)[0] is not call.must_allow:
            reason = record.variables.get("GUARD_REASON")
            self.errors.append(f"{call.uniqueid}: expected allow={call.must_allow}, got {reason}")
            return
        if not call.must_allow:
            return
        if self.hold:
            await asyncio.sleep(self.hold)
        self.fake.channel(call.uniqueid)["CDR(billsec)"] = str(call.billsec)
        record = await self.fake.play(call.settle, time_limit=SESSION_LIMIT)
        if not record.closed_by_server:
            self.errors.append(f"{call.uniqueid}: settle session not closed by the server")
            return
        self.sessions += 1
        self.settle.append(record.ended - record.started)
        if self.check and record.variables.get("GUARD_SETTLED") != "settled":
            outcome = record.variables.get("GUARD_SETTLED")
            self.errors.append(f"{call.uniqueid}: settle answered {outcome}")
            self.unsettled.append(call)
            return
        self.settled.append(call)

    async def paced(self, calls: Sequence[Call], rate: float, concurrency: int) -> int:
        """Start ``rate`` calls a second (at most ``concurrency`` at once); the late ones."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(concurrency)
        tasks: list[asyncio.Task[None]] = []
        late = 0
        start = loop.time()
        for index, call in enumerate(calls):
            delay = start + index / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            if loop.time() - (start + index / rate) > LATE_SECONDS:
                late += 1
            task = asyncio.create_task(self.call(call))
            task.add_done_callback(lambda _: slots.release())
            tasks.append(task)
        await asyncio.gather(*tasks)
        return late

    async def saturate(self, calls: Sequence[Call], concurrency: int) -> None:
        """``concurrency`` calls in flight at all times until ``calls`` are done."""
        pending = iter(calls)

        async def worker() -> None:
            for call in pending:
                await self.call(call)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


@dataclass
class Target:
    """A server under test: a name, the command that runs it, and its environment."""

    name: str
    workers: int
    command: list[str] | None
    env: dict[str, str]
    checks: bool


def guard_target(database_url: str, redis_url: str, workers: int, *, without: str = "") -> Target:
    command = [str(Path(sys.executable).with_name("guard")), "serve"]
    if without:
        command = [sys.executable, "-c", WITHOUT.format(name=without), "serve"]
    if workers > 1:
        command += ["--workers", str(workers)]
    name = f"guard w={workers}" + (f" without {without}" if without else "")
    env = {
        "GUARD_DATABASE_URL": database_url,
        "GUARD_REDIS_URL": redis_url,
        "GUARD_LOG_LEVEL": "warning",
        "GUARD_AGI_MAX_SESSIONS": "5000",
        "GUARD_METRICS_LISTEN": "",
    }
    return Target(name, workers, command, env, checks=True)


def bare_target() -> Target:
    return Target("bare responder", 1, None, {}, checks=False)


def agi_only_target() -> Target:
    """Guard's FastAGI server without the engine (``bench/agi_only.py``)."""
    root = str(Path(__file__).resolve().parent.parent)
    command = [sys.executable, "-m", "bench.agi_only"]
    return Target("guard AGI layer only", 1, command, {"PYTHONPATH": root}, checks=False)


@contextmanager
def started(target: Target, workdir: Path, redis_url: str) -> Iterator[tuple[GuardProcess, str]]:
    """The target running on a free port with its own Redis key prefix (deleted afterwards)."""
    port = free_port()
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    env = {**target.env, "GUARD_AGI_LISTEN": f"127.0.0.1:{port}", "GUARD_REDIS_PREFIX": prefix}
    command = target.command or [*BARE, "--listen", f"127.0.0.1:{port}"]
    log_path = workdir / f"{target.name.replace(' ', '_')}-{port}.log"
    server = GuardProcess(port, env, log_path, command).start()
    try:
        yield server, prefix
    finally:
        server.stop()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


def redis_cpu_seconds(redis_url: str) -> float:
    with redis.Redis.from_url(redis_url) as client:
        info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def check_money(redis_url: str, prefix: str, driver: Driver, days: set[str]) -> str:
    """What is wrong with the money ("" if nothing): spend must equal the settled calls' cost,
    and nothing may stay reserved or live.

    A settle that failed (its answer came too late) may still have run: it is sent again, as a
    retried hangup would be, and counted once either way (settle is exactly once).
    """
    ledger = ledger_from_url(redis_url, prefix=prefix, timeout=5.0)
    expected: dict[str, int] = {}
    for call in [*driver.settled, *driver.unsettled]:
        assert call.rate is not None
        expected[call.tenant] = expected.get(call.tenant, 0) + call_cost(call.rate, call.billsec)
    try:
        for call in driver.unsettled:
            await ledger.settle(call.tenant, call.uniqueid, call.billsec, time.time())
        for tenant in sorted(expected):
            spent = reserved = live = 0
            for day in days:
                counters = await ledger.counters(tenant, day)
                spent += counters.total.spent
                reserved += counters.total.reserved
                live = counters.total.live_calls
            if (spent, reserved, live) != (expected[tenant], 0, 0):
                return (
                    f"money of {tenant}: spent {spent} (expected {expected[tenant]}),"
                    f" reserved {reserved}, live {live}"
                )
    finally:
        await ledger.close()
    return ""


def measure(
    target: Target,
    workdir: Path,
    redis_url: str,
    mix: Callable[[int], CallMix],
    *,
    calls: int,
    rate: float,
    concurrency: int,
    warmup: int,
    hold: float = 0.0,
) -> Measurement:
    """Start the target, warm it up, measure one phase, check the money, stop it."""
    result = Measurement(target.name, target.workers, rate, concurrency, calls)
    with started(target, workdir, redis_url) as (server, prefix):
        calls_mix = mix(server.port)
        warm = [calls_mix.call(i) for i in range(warmup)]
        measured = [calls_mix.call(warmup + i) for i in range(calls)]
        driver = Driver(server.port, check=target.checks, hold=hold)
        days = {tenant_day("Europe/London", time.time())}

        async def phase() -> None:
            await driver.saturate(warm, min(concurrency, 32))
            result.warmup_errors = len(driver.errors)
            driver.errors.clear()
            driver.authorize.clear()
            driver.settle.clear()
            driver.sessions = 0
            cpu, redis_cpu = tree_cpu_seconds(server.pid), redis_cpu_seconds(redis_url)
            generator_cpu = time.process_time()
            began = time.perf_counter()
            if rate > 0:
                result.late_calls = await driver.paced(measured, rate, concurrency)
            else:
                await driver.saturate(measured, concurrency)
            result.seconds = time.perf_counter() - began
            generator_cpu = time.process_time() - generator_cpu
            cpu = tree_cpu_seconds(server.pid) - cpu
            redis_cpu = redis_cpu_seconds(redis_url) - redis_cpu
            result.sessions = driver.sessions
            result.sessions_per_s = round(driver.sessions / result.seconds, 1)
            per_session = 1e6 / max(driver.sessions, 1)
            result.server_cpu_us_per_session = round(cpu * per_session, 1)
            result.generator_cpu_us_per_session = round(generator_cpu * per_session, 1)
            if target.checks:
                result.redis_cpu_us_per_session = round(redis_cpu * per_session, 1)
            days.add(tenant_day("Europe/London", time.time()))
            if target.checks:
                problem = await check_money(redis_url, prefix, driver, days)
                if problem:
                    driver.errors.append(problem)

        # The generator's own full collections would walk the prebuilt calls and stall it for
        # tens of ms, which it would then report as the server's latency: freeze them.
        gc.collect()
        gc.freeze()
        try:
            run(phase())
        finally:
            gc.unfreeze()
        result.authorize = Summary.of(driver.authorize)
        result.settle = Summary.of(driver.settle)
        result.errors = driver.errors[:20] + [f"server log: {line}" for line in server.errors()[:5]]
    return result


def _print(result: Measurement) -> None:
    mode = f"{result.rate:g}/s paced" if result.rate else f"saturation c={result.concurrency}"
    print(
        f"{result.target:<28} {mode:<20} {result.sessions_per_s:>8.0f} sess/s"
        f"  authorize p50/p99/max {result.authorize.p50:.2f}/{result.authorize.p99:.2f}/"
        f"{result.authorize.max:.1f} ms  settle p99 {result.settle.p99:.2f} ms"
        f"  cpu {result.server_cpu_us_per_session:.0f} us/sess"
        f" (generator {result.generator_cpu_us_per_session:.0f})"
        f"  errors {len(result.errors)} (+{result.warmup_errors} warming up)"
        f"  late {result.late_calls}",
        flush=True,
    )
    for error in result.errors[:5]:
        print(f"    ! {error}", flush=True)


def _median(results: Sequence[Measurement], pick: Callable[[Measurement], float]) -> float:
    return round(statistics.median(pick(r) for r in results), 2)


def compare(args: argparse.Namespace, workdir: Path, database_url: str) -> dict[str, Any]:
    """The README's table: bare, Guard's AGI layer alone, Guard (1 and 2 workers, without
    uvloop)."""
    mix = _mix(args)
    saturation = [
        bare_target(),
        agi_only_target(),
        guard_target(database_url, args.redis_url, 1),
        guard_target(database_url, args.redis_url, 2),
        guard_target(database_url, args.redis_url, 1, without="uvloop"),
    ]
    paced = [
        (rate, target)
        for rate in args.paced_rates
        for target in (
            bare_target(),
            guard_target(database_url, args.redis_url, 1),
            guard_target(database_url, args.redis_url, 2),
        )
    ]
    rows: dict[str, list[Measurement]] = {}
    # The VM's speed drifts by tens of % between minutes: a target is compared with the bare
    # responder of its own run (measured minutes apart at most), and the ratios' median is shown.
    ratios: dict[str, list[tuple[float, float]]] = {}
    phases = [(0.0, target) for target in saturation] + paced
    for _ in range(args.runs):
        bare_now: Measurement | None = None
        for rate, target in phases:
            try:
                result = measure(
                    target,
                    workdir,
                    args.redis_url,
                    mix,
                    calls=int(rate * args.paced_seconds) if rate else args.calls,
                    rate=rate,
                    concurrency=args.concurrency * 8 if rate else args.concurrency,
                    warmup=args.warmup,
                )
            except RuntimeError as exc:  # the server did not start: that run is left out
                print(f"{target.name}: not measured: {exc}", flush=True)
                continue
            _print(result)
            load = f"{rate:g} calls/s" if rate else "saturation"
            name = f"{target.name} | {load}"
            rows.setdefault(name, []).append(result)
            if not rate and target.command is None:
                bare_now = result
            elif not rate and bare_now is not None:
                ratios.setdefault(name, []).append(
                    (
                        result.sessions_per_s / bare_now.sessions_per_s,
                        result.server_cpu_us_per_session / bare_now.server_cpu_us_per_session,
                    )
                )
    bare = _median(rows["bare responder | saturation"], lambda r: r.sessions_per_s)
    table = [Row.of(name, results, ratios.get(name)) for name, results in rows.items()]
    print(f"\nmedians over {args.runs} runs (bare responder: {bare:.0f} sessions/s)")
    print(
        "| server | load | sessions/s | vs bare | authorize p50 / p95 / p99 ms | settle p99 ms"
        " | server CPU µs/session | CPU vs bare | Redis CPU µs/session | errors |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in table:
        print(row.markdown())
    return {
        "table": [asdict(row) for row in table],
        "runs": {name: [asdict(r) for r in results] for name, results in rows.items()},
    }


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the README's table: the medians of a server under one load."""

    server: str
    load: str
    runs: int
    sessions_per_s: float
    #: Median over the runs of sessions/s ÷ the same run's bare responder (saturation only).
    vs_bare: float | None
    authorize_p50_ms: float
    authorize_p95_ms: float
    authorize_p99_ms: float
    settle_p99_ms: float
    server_cpu_us_per_session: float
    #: Median over the runs of CPU per session ÷ the same run's bare responder's.
    cpu_vs_bare: float | None
    #: Redis's own CPU per session (0 for the servers that do not use it).
    redis_cpu_us_per_session: float
    errors: int

    @staticmethod
    def of(
        name: str, results: Sequence[Measurement], ratios: Sequence[tuple[float, float]] | None
    ) -> Row:
        server, load = name.split(" | ")
        bare = server == "bare responder" and load == "saturation"

        def median_ratio(index: int) -> float | None:
            if bare:
                return 1.0
            return round(statistics.median(r[index] for r in ratios), 3) if ratios else None

        return Row(
            server=server,
            load=load,
            runs=len(results),
            sessions_per_s=_median(results, lambda r: r.sessions_per_s),
            vs_bare=median_ratio(0),
            authorize_p50_ms=_median(results, lambda r: r.authorize.p50),
            authorize_p95_ms=_median(results, lambda r: r.authorize.p95),
            authorize_p99_ms=_median(results, lambda r: r.authorize.p99),
            settle_p99_ms=_median(results, lambda r: r.settle.p99),
            server_cpu_us_per_session=_median(results, lambda r: r.server_cpu_us_per_session),
            cpu_vs_bare=median_ratio(1),
            redis_cpu_us_per_session=_median(results, lambda r: r.redis_cpu_us_per_session),
            errors=sum(len(r.errors) for r in results),
        )

    def markdown(self) -> str:
        ratio = "-" if self.vs_bare is None else f"{self.vs_bare:.0%}"
        cpu = "-" if self.cpu_vs_bare is None else f"{self.cpu_vs_bare:.2f}×"
        redis_cpu = f"{self.redis_cpu_us_per_session:.0f}" if self.redis_cpu_us_per_session else "-"
        return (
            f"| {self.server} | {self.load} | {self.sessions_per_s:.0f} | {ratio} | "
            f"{self.authorize_p50_ms:.2f} / {self.authorize_p95_ms:.2f} / "
            f"{self.authorize_p99_ms:.2f} | {self.settle_p99_ms:.2f} | "
            f"{self.server_cpu_us_per_session:.0f} | {cpu} | {redis_cpu} | {self.errors} |"
        )


def _mix(args: argparse.Namespace) -> Callable[[int], CallMix]:
    def make(port: int) -> CallMix:
        return CallMix(port, args.tenants, args.extensions, refused=args.refused, seed=args.seed)

    return make


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["run", "compare"])
    parser.add_argument("--target", choices=["guard", "bare", "agi-only"], default="guard")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--calls", type=int, default=6000, help="measured calls per phase")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rate", type=float, default=0, help="calls/s, 0 = saturation")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds between the sessions")
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--extensions", type=int, default=50, help="per tenant")
    parser.add_argument("--refused", type=float, default=0.1, help="share of refused calls")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3, help="compare: repetitions")
    parser.add_argument(
        "--paced-rates",
        type=lambda text: [float(rate) for rate in text.split(",")],
        default=[150.0, 500.0],
        help="compare: open-loop rates (calls/s), comma-separated",
    )
    parser.add_argument("--paced-seconds", type=float, default=10)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        workdir = Path(tmp)
        database_url = f"sqlite:///{workdir / 'guard.db'}"
        began = time.perf_counter()
        seed_config(database_url, args.tenants, args.extensions)
        print(
            f"config: {args.tenants} tenants x {args.extensions} extensions seeded in"
            f" {time.perf_counter() - began:.1f} s",
            flush=True,
        )
        if args.mode == "compare":
            output = compare(args, workdir, database_url)
            failed = any(row["errors"] for row in output["table"])
        else:
            targets: dict[str, Callable[[], Target]] = {
                "bare": bare_target,
                "agi-only": agi_only_target,
                "guard": lambda: guard_target(database_url, args.redis_url, args.workers),
            }
            target = targets[args.target]()
            result = measure(
                target,
                workdir,
                args.redis_url,
                _mix(args),
                calls=args.calls,
                rate=args.rate,
                concurrency=args.concurrency,
                warmup=args.warmup,
                hold=args.hold,
            )
            _print(result)
            output = asdict(result)
            failed = bool(result.errors)
    if args.json:
        args.json.write_text(json.dumps(output, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
