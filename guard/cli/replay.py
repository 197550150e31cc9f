"""``guard replay``: replay a CDR file through the current or a proposed policy, harmlessly.

The calls of the file run through the real engine in time order (``guard.replay``) against
throw-away counters: a private in-process store by default, or the configured Redis under a key
prefix of their own (``--redis``, deleted afterwards). The live counters, the live log and the
audit table never see a replayed call. The report says which calls the policy would have refused
and why, what they cost (saved money if they were fraud, calls your users could not make if
they were not: only the operator can tell), and the spend per day as it was and under the policy.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from guard.cli.common import (
    CliState,
    Invalid,
    json_option,
    money,
    money_json,
    pass_state,
    print_json,
    print_table,
    tenant_option,
    warn,
)
from guard.domain import DestinationClass
from guard.schedule import zone
from guard.snapshot import Snapshot

if TYPE_CHECKING:
    from guard.ledger import RedisLedger
    from guard.replay import CallOutcome, CdrFile, ReasonTally, ReplayReport, Tally

#: Bound of one operation on the throw-away counters (the in-process store runs Lua slowly).
REPLAY_TIMEOUT: Final = 5.0


def _profiles(state: CliState, tenant: str) -> dict[str, frozenset[DestinationClass]]:
    """The routing profiles the tenant may use: its own first, then the global ones."""
    from guard.config.repository import list_profiles

    found: dict[str, frozenset[DestinationClass]] = {}
    for profile in list_profiles(state.sql, tenant=tenant):
        found.setdefault(profile.name, frozenset(profile.classes))
    return found


def _ledger(state: CliState, use_redis: bool) -> RedisLedger:
    from guard.ledger import ledger_from_url
    from guard.ledger.storage import private_memory_ledger

    settings = state.admin_settings
    if use_redis and not state.memory_store:
        prefix = f"{settings.redis_prefix}-replay-{uuid.uuid4().hex[:12]}"
        return ledger_from_url(settings.redis_url, prefix=prefix, timeout=settings.redis_timeout)
    if use_redis:
        warn("GUARD_REDIS_URL is memory://: replaying in process memory")
    return private_memory_ledger(prefix="guard-replay", timeout=REPLAY_TIMEOUT)


async def _forget(ledger: RedisLedger) -> None:
    """Delete every key of the throw-away prefix."""
    client = ledger.client
    async for key in client.scan_iter(match=f"{ledger.prefix}:*", count=1000):
        await client.delete(key)


def _run(
    state: CliState, cdr: CdrFile, snapshot: Snapshot, tenant: str, use_redis: bool
) -> list[CallOutcome]:
    """Replay the file's calls on throw-away counters, deleted afterwards."""
    import asyncio

    from guard.engine import EngineSettings
    from guard.replay import replay as run_replay

    settings = state.settings
    engine_settings = EngineSettings(
        grace_seconds=settings.grace_seconds,
        fail_open_max_seconds=settings.fail_open_max_seconds,
        emergency_max_seconds=settings.emergency_max_seconds,
    )

    async def run() -> list[CallOutcome]:
        async with _ledger(state, use_redis) as ledger:
            try:
                return await run_replay(cdr.calls, snapshot, tenant, ledger, engine_settings)
            finally:
                await _forget(ledger)

    return asyncio.run(run())


@click.command()
@click.argument("cdr_path", metavar="CDR.csv", type=click.Path(dir_okay=False, path_type=Path))
@tenant_option(help="Tenant whose calls the file holds.")
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="A proposed policy (TOML; YAML with PyYAML) laid over the current configuration; "
    "see contrib/policy-example.toml. Default: the current configuration.",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Skip the rows that cannot be read (they are listed); without it such rows stop the "
    "replay before it starts (exit status 2).",
)
@click.option(
    "--redis",
    "use_redis",
    is_flag=True,
    help="Count in the configured Redis under a throw-away key prefix (deleted afterwards), "
    "faster for big files. Default: a private store in this process.",
)
@click.option(
    "--cdr-timezone",
    metavar="ZONE",
    help="Time zone of the file's times: Asterisk's local zone (default: the tenant's), or UTC "
    "if cdr.conf has usegmtime=yes.",
)
@click.option(
    "--context",
    "contexts",
    multiple=True,
    metavar="CONTEXT",
    help="Only rows whose dcontext is this (repeatable): the outbound contexts, so that "
    "incoming calls are left out.",
)
@json_option
@pass_state
def replay(
    state: CliState,
    cdr_path: Path,
    tenant: str,
    policy_path: Path | None,
    skip_bad: bool,
    use_redis: bool,
    cdr_timezone: str | None,
    contexts: tuple[str, ...],
    as_json: bool,
) -> None:
    """Replay a CDR file through the current or a proposed policy, on throw-away counters.

    CDR.csv is Asterisk's Master.csv (cdr_csv columns, no header: accountcode, src, dst,
    dcontext, clid, channel, dstchannel, lastapp, lastdata, start, answer, end, duration,
    billsec, disposition, amaflags, then uniqueid, userfield, peeraccount, linkedid, sequence
    when cdr.conf logs them), or a CSV whose header names at least start, dst, billsec and
    extension (or channel, or src); duration, disposition, source_ip, user_agent, uniqueid and
    dcontext are read when present. The extension is the endpoint of the channel
    (PJSIP/1001-0000000f), else src. A missing source IP or User-Agent is replaced by a value
    the extension's checks accept.

    Every call is authorized at its start time and settled when it ended, cut at the max
    duration the policy would have given it. The report lists the calls the policy would have
    refused, by reason, with what they really cost and the first call each reason stops; the
    calls it would have cut short; refusals by hour and by destination class; and the spend per
    day, as it was and under the policy. A refused call may be fraud (money saved) or a call
    your users needed: judge by hour and destination.
    """
    from guard.config.loader import build_snapshot
    from guard.replay import apply_policy, load_policy, read_cdr, summarize

    try:
        handle = cdr_path.open(encoding="utf-8", errors="replace", newline="")
    except OSError as exc:
        raise Invalid(f"cannot read {cdr_path}: {exc.strerror}") from None
    snapshot = build_snapshot(state.sql)
    config = snapshot.tenant(tenant)
    timezone = cdr_timezone or (config.timezone if config is not None else "UTC")
    zone(timezone)
    with handle:
        cdr = read_cdr(handle, timezone=timezone, contexts=contexts)
    for bad in cdr.bad_rows:
        click.echo(f"{'warning' if skip_bad else 'error'}: {cdr_path}: {bad}", err=True)
    if cdr.bad_rows and not skip_bad:
        raise Invalid(
            f"{len(cdr.bad_rows)} bad row(s) in {cdr_path}: nothing replayed "
            "(fix them, or pass --skip-bad to replay the others)"
        )
    if policy_path is not None:
        snapshot = apply_policy(
            snapshot, tenant, load_policy(policy_path), _profiles(state, tenant)
        )
    elif config is None:
        warn(f"tenant {tenant!r} does not exist: every call is refused as unknown_tenant")
    outcomes = _run(state, cdr, snapshot, tenant, use_redis)
    report = summarize(outcomes, tenant, snapshot.tenant(tenant))
    policy_name = str(policy_path) if policy_path is not None else None
    if as_json:
        print_json(report_json(report, cdr, str(cdr_path), policy_name))
    else:
        print_report(report, cdr, str(cdr_path), policy_name)


# --- output -------------------------------------------------------------------------------------


def _local(report: ReplayReport, epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, zone(report.timezone))


def _call_json(report: ReplayReport, outcome: CallOutcome) -> dict[str, Any]:
    call = outcome.call
    return {
        "line": call.line,
        "start": _local(report, call.start).isoformat(timespec="seconds"),
        "extension": call.extension,
        "number": call.number,
        "uniqueid": call.uniqueid or None,
        "billsec": call.billsec,
        "disposition": call.disposition or None,
        "reason": outcome.decision.reason.value,
        "max_seconds": outcome.decision.max_seconds,
        **money_json("cost", outcome.actual_cost),
    }


def _tally_json(tally: Tally) -> dict[str, Any]:
    return {"calls": tally.calls, "unrated": tally.unrated, **money_json("cost", tally.cost)}


def _reason_json(report: ReplayReport, found: ReasonTally) -> dict[str, Any]:
    return {
        "reason": found.reason,
        **_tally_json(found.tally),
        "first": _call_json(report, found.first),
    }


def report_json(
    report: ReplayReport, cdr: CdrFile, path: str, policy: str | None
) -> dict[str, Any]:
    """The report with stable keys; money as decimal strings plus integer sub-units."""
    starts = [outcome.call.start for outcome in report.outcomes]
    return {
        "tenant": report.tenant,
        "timezone": report.timezone,
        "currency": report.currency,
        "policy": policy,
        "file": {
            "path": path,
            "layout": cdr.layout,
            "calls": len(cdr.calls),
            "skipped": cdr.skipped,
            "bad_rows": [{"line": bad.line, "message": bad.message} for bad in cdr.bad_rows],
        },
        "first_start": _local(report, min(starts)).isoformat(timespec="seconds")
        if starts
        else None,
        "last_start": _local(report, max(starts)).isoformat(timespec="seconds") if starts else None,
        "totals": {
            "calls": report.calls,
            "refused": report.refused,
            "cut_short": report.cut_short.tally.calls if report.cut_short else 0,
            "unrated": report.unrated,
            "neutral_source": report.neutral,
            **money_json("actual", report.actual),
            **money_json("under_policy", report.under_policy),
            **money_json("difference", report.actual - report.under_policy),
        },
        "refused": [_reason_json(report, found) for found in report.reasons],
        "cut_short": _reason_json(report, report.cut_short) if report.cut_short else None,
        "days": [
            {
                "day": day.day,
                "calls": day.calls,
                "refused": day.refused,
                **money_json("actual", day.actual),
                **money_json("under_policy", day.under_policy),
            }
            for day in report.days
        ],
        "refused_by_hour": [
            {"hour": hour, **_tally_json(tally)} for hour, tally in report.refused_by_hour
        ],
        "refused_by_class": [
            {"class": name, **_tally_json(tally)} for name, tally in report.refused_by_class
        ],
    }


def _first(report: ReplayReport, outcome: CallOutcome) -> str:
    call = outcome.call
    return (
        f"{_local(report, call.start):%Y-%m-%d %H:%M:%S} line {call.line}: "
        f"{call.extension} -> {call.number}"
    )


def _cost(report: ReplayReport, tally: Tally) -> str:
    shown = money(tally.cost, report.currency)
    return f"{shown} (+{tally.unrated} unrated)" if tally.unrated else shown


def print_report(report: ReplayReport, cdr: CdrFile, path: str, policy: str | None) -> None:
    """The report for people: totals, refusals by reason, cut calls, days, hours, classes."""
    currency = report.currency
    click.echo(
        f"Replay of {path} for tenant {report.tenant} ({report.timezone}) under "
        f"{policy or 'the current configuration'}"
    )
    click.echo(
        f"{report.calls} calls ({cdr.layout} layout), {len(cdr.bad_rows)} bad rows skipped, "
        f"{cdr.skipped} rows of other contexts left out"
    )
    if report.neutral:
        click.echo(
            f"{report.neutral} calls had no source IP or User-Agent in the file: "
            "values the extension's checks accept were used"
        )
    if report.unrated:
        click.echo(f"{report.unrated} calls have no rate: their cost is unknown (not counted)")
    click.echo("")
    click.echo("Refused, by reason (cost: what those calls really cost)")
    rows = [
        (found.reason, found.tally.calls, _cost(report, found.tally), _first(report, found.first))
        for found in report.reasons
    ]
    if report.cut_short is not None:
        cut = report.cut_short
        rows.append(
            (
                f"({cut.reason})",
                cut.tally.calls,
                _cost(report, cut.tally),
                _first(report, cut.first),
            )
        )
    print_table(("reason", "calls", "cost", "first call"), rows, empty="(nothing refused)")
    click.echo("")
    click.echo("Spend per day")
    print_table(
        ("day", "calls", "refused", "actual", "under policy"),
        [
            (
                day.day,
                day.calls,
                day.refused,
                money(day.actual, currency),
                money(day.under_policy, currency),
            )
            for day in report.days
        ],
    )
    if report.refused_by_hour:
        click.echo("")
        click.echo("Refused, by hour of the tenant's clock")
        print_table(
            ("hour", "calls", "cost"),
            [
                (f"{hour:02d}:00", tally.calls, _cost(report, tally))
                for hour, tally in report.refused_by_hour
            ],
        )
        click.echo("")
        click.echo("Refused, by destination class")
        print_table(
            ("class", "calls", "cost"),
            [(name, tally.calls, _cost(report, tally)) for name, tally in report.refused_by_class],
        )
    click.echo("")
    click.echo(
        f"Total: {money(report.actual, currency)} as it was, "
        f"{money(report.under_policy, currency)} under the policy "
        f"({money(report.actual - report.under_policy, currency)} less)."
    )
    if report.refused:
        click.echo(
            "Each refused call is money saved if it was fraud, or a call your users could not "
            "make if it was not: judge by hour, destination and first call above."
        )
