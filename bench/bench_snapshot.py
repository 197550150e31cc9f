"""Benchmark of the snapshot loader: build time, memory and rating lookups at production size.

Generates 10k tenants, 100k extensions and a 1M-row global rate deck into a SQLite file (Core
executemany, no ORM), then measures ``build_snapshot`` from nothing (median of several runs)
and again given the previous snapshot, whose unchanged rate deck it takes over (what a reload
after a tenant or extension change does), its memory
(tracemalloc peak and RSS growth while the snapshot is held) and ``Snapshot.rate_for``
(µs per lookup, median of several passes; the first pass is also shown on its own, as it makes
the ``Rate`` of every prefix it finds, which later lookups reuse). ``--import-url`` also times a
CSV parse and a replace/merge ``import_rates`` of the same deck into that store (SQLite or
PostgreSQL).

    python bench/bench_snapshot.py            # full size, takes a few minutes
    python bench/bench_snapshot.py --small    # 1k / 10k / 100k, seconds
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import os
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from guard.config import db, loader
from guard.config import repository as repo
from guard.config.models import Base
from guard.domain import DestinationClass
from guard.money import format_money
from guard.snapshot import Snapshot

ZONES = ("UTC", "Europe/Paris", "Europe/London", "America/New_York", "Asia/Tokyo")
CLASSES = (
    [DestinationClass.NATIONAL] * 30
    + [DestinationClass.MOBILE] * 30
    + [DestinationClass.INTERNATIONAL] * 30
    + [DestinationClass.PREMIUM, DestinationClass.SATELLITE, DestinationClass.SPECIAL] * 3
    + [DestinationClass.TOLLFREE]
)
CHUNK = 20_000


@dataclass(frozen=True)
class Size:
    tenants: int
    extensions_per_tenant: int
    rates: int


FULL = Size(tenants=10_000, extensions_per_tenant=10, rates=1_000_000)
SMALL = Size(tenants=1_000, extensions_per_tenant=10, rates=100_000)


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), CHUNK):
        yield rows[start : start + CHUNK]


def rate_rows(size: Size, rng: random.Random) -> list[dict[str, Any]]:
    """Unique prefixes of 3 to 9 digits with a pool of names, classes, prices and increments."""
    prefixes: set[str] = set()
    while len(prefixes) < size.rates:
        length = rng.randint(3, 9)
        prefixes.add(str(rng.randrange(10 ** (length - 1), 10**length)))
    prices = [rng.randrange(50, 50_000) for _ in range(500)]
    increments = [(60, 60), (1, 1), (30, 6), (60, 1)]
    rows = []
    for prefix in sorted(prefixes):
        initial, subsequent = rng.choice(increments)
        rows.append(
            {
                "deck_id": 1,
                "prefix": prefix,
                "name": f"Destination {int(prefix[:4]) % 2_000}",
                "dest_class": rng.choice(CLASSES).value,
                "rate_per_minute": rng.choice(prices),
                "connect_fee": rng.choice((0, 0, 0, 500)),
                "initial_increment": initial,
                "subsequent_increment": subsequent,
            }
        )
    return rows


def generate(url: str, size: Size, rates: list[dict[str, Any]]) -> None:
    """Fill an empty store directly with Core executemany (ids given, so no round trips)."""
    db.upgrade(url)
    tables = Base.metadata.tables
    domestic = ",".join(c.value for c in repo.DEFAULT_PROFILES["domestic"])
    international = ",".join(c.value for c in repo.DEFAULT_PROFILES["international"])
    tenants, profiles, extensions, networks, windows = [], [], [], [], []
    for t in range(1, size.tenants + 1):
        tenants.append(
            {
                "id": t,
                "name": f"tenant{t:05d}",
                "timezone": ZONES[t % len(ZONES)],
                "daily_limit": 500_000 if t % 3 else None,
                "concurrent_limit": 20 if t % 2 else None,
            }
        )
        profiles += [
            {"id": 2 * t - 1, "tenant_id": t, "name": "domestic", "classes": domestic},
            {"id": 2 * t, "tenant_id": t, "name": "international", "classes": international},
        ]
        networks.append({"tenant_id": t, "cidr": f"10.{t // 256 % 256}.{t % 256}.0/24"})
        if t % 10 == 0:
            windows += [
                {"tenant_id": t, "weekday": d, "start_minute": 480, "end_minute": 1080}
                for d in range(5)
            ]
        for e in range(size.extensions_per_tenant):
            extension_id = (t - 1) * size.extensions_per_tenant + e + 1
            extensions.append(
                {
                    "id": extension_id,
                    "tenant_id": t,
                    "name": str(100 + e),
                    "profile_id": 2 * t if e % 4 == 0 else None,
                    "daily_limit": 50_000 if e % 2 else None,
                    "ua_mode": ("off", "pin", "learn")[e % 3],
                    "ua_value": "Yealink*" if e % 3 == 1 else None,
                }
            )
            if e == 0:
                networks.append(
                    {"tenant_id": t, "extension_id": extension_id, "cidr": "192.0.2.0/24"}
                )
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            for table, rows in (
                ("tenants", tenants),
                ("routing_profiles", profiles),
                ("extensions", extensions),
                ("networks", networks),
                ("time_windows", windows),
                # Stamped as import_rates stamps a deck (RateDeck.stamp).
                ("rate_decks", [{"id": 1, "name": repo.GLOBAL_DECK, "stamp": "bench"}]),
                ("rates", rates),
            ):
                for chunk in _chunks(rows):
                    connection.execute(sa.insert(tables[table]), chunk)
            meta = tables["config_meta"]
            connection.execute(sa.update(meta).values(value=1))
    finally:
        engine.dispose()


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def cpu_timed(action: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and CPU seconds: on a shared machine the CPU time is the steadier figure."""
    cpu = time.process_time()
    wall, result = timed(action)
    return wall, time.process_time() - cpu, result


def lookup_numbers(
    snapshot: Snapshot, rates: list[dict[str, Any]], rng: random.Random, count: int
) -> list[tuple[str, str]]:
    """(tenant, number): 90 % numbers under a known prefix, 10 % random 11-12 digit ones."""
    tenants = list(snapshot.tenants)
    numbers = []
    for _ in range(count):
        if rng.random() < 0.9:
            prefix = rng.choice(rates)["prefix"]
            digits = prefix + "".join(rng.choice("0123456789") for _ in range(12 - len(prefix)))
        else:
            digits = str(rng.randrange(10**10, 10**12))
        numbers.append((rng.choice(tenants), digits))
    return numbers


def bench_lookups(snapshot: Snapshot, numbers: list[tuple[str, str]], passes: int) -> list[float]:
    rate_for = snapshot.rate_for
    per_lookup = []
    for _ in range(passes):
        started = time.perf_counter()
        for tenant, number in numbers:
            rate_for(tenant, number)
        per_lookup.append((time.perf_counter() - started) / len(numbers) * 1e6)
    return per_lookup


def bench_import(url: str, rates: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Parse the deck as CSV, then replace and merge it into the store at ``url``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(repo.RATE_COLUMNS)
    for r in rates:
        writer.writerow(
            (
                r["prefix"],
                r["name"],
                r["dest_class"],
                format_money(r["rate_per_minute"]),
                format_money(r["connect_fee"]),
                r["initial_increment"],
                r["subsequent_increment"],
            )
        )
    buffer.seek(0)
    parse_seconds, (parsed, errors) = timed(lambda: repo.parse_rate_csv(buffer))
    assert not errors, errors[:3]
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        replace_seconds, _ = timed(lambda: repo.import_rates(engine, parsed, actor="bench"))
        tenth = parsed[::10]
        merge_seconds, _ = timed(
            lambda: repo.import_rates(engine, tenth, mode="merge", actor="bench")
        )
        build_seconds, _ = timed(lambda: loader.build_snapshot(engine))
    finally:
        engine.dispose()
    where = engine.url.get_backend_name()
    return [
        (f"parse_rate_csv, {len(parsed):,} rows", f"{parse_seconds:.1f} s"),
        (f"import_rates replace, {len(parsed):,} rows ({where})", f"{replace_seconds:.1f} s"),
        (f"import_rates merge, {len(tenth):,} rows ({where})", f"{merge_seconds:.1f} s"),
        (f"build_snapshot from that store ({where})", f"{build_seconds:.2f} s"),
    ]


def run(path: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    size = SMALL if args.small else FULL
    url = f"sqlite:///{path}"
    rng = random.Random(42)
    rates = rate_rows(size, rng)
    generate_seconds, _ = timed(lambda: generate(url, size, rates))
    engine = db.make_engine(url)
    gc.collect()
    before = rss_bytes()
    first_seconds, first_cpu, snapshot = cpu_timed(lambda: loader.build_snapshot(engine))
    gc.collect()
    rss_growth = rss_bytes() - before
    builds, cpus = [first_seconds], [first_cpu]
    for _ in range(args.runs - 1):
        del snapshot
        gc.collect()
        seconds, cpu, snapshot = cpu_timed(lambda: loader.build_snapshot(engine))
        builds.append(seconds)
        cpus.append(cpu)
    rebuilds = []
    rebuild = partial(loader.build_snapshot, engine, previous=snapshot)
    for _ in range(args.runs):
        gc.collect()
        seconds, rebuilt = timed(rebuild)
        assert rebuilt.global_rates is snapshot.global_rates, "the unchanged deck was read again"
        rebuilds.append(seconds)
        del rebuilt
    del rebuild
    numbers = lookup_numbers(snapshot, rates, rng, args.lookups)
    lookups = bench_lookups(snapshot, numbers, args.passes)
    hits = sum(snapshot.rate_for(t, n) is not None for t, n in numbers)
    counts = (len(snapshot.tenants), len(snapshot.extensions), len(snapshot.global_rates))
    del snapshot
    gc.collect()
    tracemalloc.start()
    loader.build_snapshot(engine)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    engine.dispose()

    results = [
        ("tenants / extensions / global rates", " / ".join(f"{n:,}" for n in counts)),
        ("generate SQLite store (Core executemany)", f"{generate_seconds:.1f} s"),
        (
            f"build_snapshot, median of {len(builds)}",
            f"{statistics.median(builds):.2f} s (runs: {', '.join(f'{s:.2f}' for s in builds)})",
        ),
        (
            "build_snapshot CPU time, median",
            f"{statistics.median(cpus):.2f} s (runs: {', '.join(f'{s:.2f}' for s in cpus)})",
        ),
        (
            f"rebuild with the previous snapshot, rate deck unchanged, median of {len(rebuilds)}",
            f"{statistics.median(rebuilds):.2f} s "
            f"(runs: {', '.join(f'{s:.2f}' for s in rebuilds)})",
        ),
        ("RSS growth while the snapshot is held", f"{rss_growth / 2**20:.0f} MiB"),
        ("tracemalloc peak during a build", f"{peak / 2**20:.0f} MiB"),
        (
            f"rate_for, median of {len(lookups)} passes x {len(numbers):,}",
            f"{statistics.median(lookups):.2f} µs/lookup ({hits / len(numbers):.0%} found)",
        ),
        ("rate_for, first pass (makes the Rate of each prefix found)", f"{lookups[0]:.2f} µs"),
    ]
    if args.import_url:
        results += bench_import(args.import_url, rates)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="1k tenants, 100k rates")
    parser.add_argument("--path", type=Path, help="SQLite file to create and keep")
    parser.add_argument("--runs", type=int, default=3, help="snapshot builds to time")
    parser.add_argument("--lookups", type=int, default=100_000, help="numbers per lookup pass")
    parser.add_argument("--passes", type=int, default=5, help="lookup passes")
    parser.add_argument("--import-url", help="also time CSV parse + import_rates into this store")
    args = parser.parse_args()
    if args.path is not None:
        if args.path.exists():
            parser.error(f"{args.path} exists: give a new file")
        results = run(args.path, args)
    else:
        with tempfile.TemporaryDirectory(prefix="guard-bench-") as scratch:
            results = run(Path(scratch) / "guard.db", args)
    print(f"\nSnapshot benchmark ({'small' if args.small else 'full'} size)\n")
    print("| measure | result |\n|---|---|")
    for name, value in results:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
