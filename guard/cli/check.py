"""``guard check``: dry-run one call through the engine and show every check's verdict.

The snapshot is built from SQL and the engine from the settings, exactly as ``guard serve`` does
(``build_services``); ``Engine.preview`` decides without reserving, learning or counting. The
ledger's own refusals that precede the limits (a runtime lock, a learned User-Agent that differs)
are read here so that the dry run says what a live call would get.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import click

from guard.cli.common import (
    EXIT_REFUSED,
    CliState,
    counters_json,
    describe_counters,
    describe_rate,
    json_option,
    money_json,
    pass_state,
    print_fields,
    print_json,
    print_table,
    rate_json,
    when,
)
from guard.domain import CallAttempt, CheckOutcome, Decision, Reason, Result, UaLockMode
from guard.engine import Preview
from guard.errors import ValidationError
from guard.ledger import RedisLedger
from guard.schedule import tenant_day, zone
from guard.service import build_services
from guard.settings import Settings
from guard.snapshot import ExtensionConfig, TenantConfig

CALL_ID = "guard-check"


def to_moment(_ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """Option callback: an ISO 8601 date and time, with or without a UTC offset."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"not an ISO 8601 time: {value!r} (e.g. 2030-01-07T10:00 or 2030-01-07T10:00+01:00)",
            param=param,
        ) from None


@dataclass(frozen=True, slots=True)
class DryRun:
    """What ``guard check`` found: the decision, the checks in order, and today's counters."""

    attempt: CallAttempt
    decision: Decision
    preview: Preview
    checks: tuple[CheckOutcome, ...]
    at: datetime

    @property
    def tenant(self) -> TenantConfig | None:
        return self.preview.policy.tenant

    @property
    def extension(self) -> ExtensionConfig | None:
        return self.preview.policy.extension


def _moment(at: datetime | None, timezone: str) -> datetime:
    """``--at`` in the tenant's zone: a time without offset is the tenant's wall-clock time."""
    local = zone(timezone)
    if at is None:
        return datetime.now(local)
    return at.replace(tzinfo=local) if at.tzinfo is None else at.astimezone(local)


async def runtime_outcome(
    ledger: RedisLedger, attempt: CallAttempt, extension: ExtensionConfig
) -> CheckOutcome:
    """The ledger's checks before the limits, read-only: the runtime lock, then in ``learn``
    mode the learned User-Agent (a different one would lock the extension)."""
    state = await ledger.extension_state(attempt.tenant, extension.name)
    if state.locked:
        reason = state.lock_reason or "no reason given"
        return CheckOutcome("runtime_lock", False, Reason.EXTENSION_LOCKED, f"locked: {reason}")
    if extension.ua_mode is not UaLockMode.LEARN:
        return CheckOutcome("runtime_lock", True, None, "not locked")
    learned = state.learned_user_agent
    if learned is None:
        return CheckOutcome("runtime_lock", True, None, "nothing learned yet: would learn it")
    if learned != attempt.user_agent:
        return CheckOutcome(
            "runtime_lock",
            False,
            Reason.USER_AGENT_MISMATCH,
            f"differs from the learned User-Agent {learned!r}: would lock the extension",
        )
    return CheckOutcome("runtime_lock", True, None, "matches the learned User-Agent")


def _limits_outcome(preview: Preview) -> CheckOutcome:
    decision = preview.decision
    if preview.store_error:
        tenant = preview.policy.tenant
        mode = tenant.fail_mode if tenant is not None else "deny"
        detail = f"{preview.store_error} (fail mode {mode})"
        return CheckOutcome("limits", decision.allowed, Reason.STORE_UNAVAILABLE, detail)
    if decision.allowed:
        return CheckOutcome("limits", True, None, f"budget for {decision.max_seconds} s")
    return CheckOutcome("limits", False, decision.reason, "see today's counters below")


async def dry_run(settings: Settings, attempt: CallAttempt, at: datetime | None) -> DryRun:
    """Decide ``attempt`` at ``at`` (now by default) as a live call would be, reserving nothing."""
    services = build_services(settings)
    try:
        tenant = services.snapshots.current.tenant(attempt.tenant)
        moment = _moment(at, tenant.timezone if tenant is not None else "UTC")
        preview = await services.engine.preview(attempt, moment.timestamp())
        policy, decision = preview.policy, preview.decision
        checks = list(policy.outcomes)
        if policy.passed and not policy.is_emergency and policy.extension is not None:
            runtime = None
            if not preview.store_error:
                runtime = await runtime_outcome(services.ledger, attempt, policy.extension)
                checks.append(runtime)
            checks.append(_limits_outcome(preview))
            if runtime is not None and runtime.reason is not None:
                decision = dataclasses.replace(
                    decision, result=Result.DENY, reason=runtime.reason, max_seconds=0
                )
        return DryRun(attempt, decision, preview, tuple(checks), moment)
    finally:
        await services.close()


def _check_json(outcome: CheckOutcome) -> dict[str, Any]:
    return {
        "name": outcome.name,
        "passed": outcome.passed,
        "reason": None if outcome.reason is None else outcome.reason.value,
        "detail": outcome.detail,
    }


def _limits_json(daily: int | None, concurrent: int | None) -> dict[str, Any]:
    return {**money_json("daily_limit", daily), "concurrent_limit": concurrent}


def dry_run_json(run: DryRun) -> dict[str, Any]:
    decision, preview, tenant, ext = run.decision, run.preview, run.tenant, run.extension
    today = None
    if tenant is not None and preview.tenant_today is not None:
        today = {
            "day": tenant_day(tenant.timezone, run.at.timestamp()),
            "tenant": counters_json(preview.tenant_today),
            "extension": None
            if preview.extension_today is None
            else counters_json(preview.extension_today),
        }
    return {
        "result": decision.result.value,
        "reason": decision.reason.value,
        "max_seconds": decision.max_seconds,
        "tenant": run.attempt.tenant,
        "extension": run.attempt.extension,
        "dialed": run.attempt.number,
        "number": decision.number or None,
        "at": when(run.at),
        "destination": None if decision.destination is None else rate_json(decision.destination),
        "checks": [_check_json(outcome) for outcome in run.checks],
        "limits": {
            "tenant": None
            if tenant is None
            else _limits_json(tenant.daily_limit, tenant.concurrent_limit),
            "extension": None
            if ext is None
            else _limits_json(ext.daily_limit, ext.concurrent_limit),
        },
        "today": today,
        "store_error": preview.store_error or None,
    }


def print_dry_run(run: DryRun) -> None:
    decision, preview, tenant, ext = run.decision, run.preview, run.tenant, run.extension
    currency = tenant.currency if tenant is not None else ""
    click.echo(f"{decision.result}  {decision.reason}")
    normalized = f" -> {decision.number}" if decision.number else ""
    destination = (
        "(none)" if decision.destination is None else describe_rate(decision.destination, currency)
    )
    zone_name = tenant.timezone if tenant is not None else "UTC"
    print_fields(
        [
            ("number", f"{run.attempt.number}{normalized}"),
            ("destination", destination),
            ("max seconds", decision.max_seconds),
            ("at", f"{run.at:%a %Y-%m-%d %H:%M} {zone_name}"),
        ],
        indent=2,
    )
    click.echo()
    print_table(
        ["result", "check", "reason", "detail"],
        [["pass" if c.passed else "FAIL", c.name, c.reason or "", c.detail] for c in run.checks],
    )
    if tenant is None or preview.tenant_today is None:
        return
    click.echo()
    click.echo(f"limits today ({tenant_day(tenant.timezone, run.at.timestamp())})")
    rows: list[tuple[str, object]] = []
    if ext is not None and preview.extension_today is not None:
        rows.append(
            (
                f"extension {ext.name}",
                describe_counters(
                    preview.extension_today, ext.daily_limit, ext.concurrent_limit, currency
                ),
            )
        )
    rows.append(
        (
            f"tenant {tenant.name}",
            describe_counters(
                preview.tenant_today, tenant.daily_limit, tenant.concurrent_limit, currency
            ),
        )
    )
    print_fields(rows, indent=2)


@click.command()
@click.option(
    "--tenant", "-t", required=True, metavar="TENANT", help="Tenant of the calling extension."
)
@click.option(
    "--ext",
    "-e",
    "extension",
    required=True,
    metavar="EXT",
    help="The calling extension: the authenticated endpoint name.",
)
@click.option(
    "--to",
    "number",
    required=True,
    metavar="NUMBER",
    help="The number as dialed: local, national (0…), international (00…) or +E.164.",
)
@click.option(
    "--ip", "source_ip", required=True, metavar="IP", help="Source IP address of the phone."
)
@click.option(
    "--ua",
    "user_agent",
    default="",
    metavar="UA",
    help="User-Agent of the phone (default: none sent).",
)
@click.option(
    "--at",
    callback=to_moment,
    metavar="TIME",
    help="Decide at this ISO 8601 time instead of now; without an offset "
    "(2030-01-07T10:00) it is the tenant's local time.",
)
@json_option
@pass_state
def check(
    state: CliState,
    tenant: str,
    extension: str,
    number: str,
    source_ip: str,
    user_agent: str,
    at: datetime | None,
    as_json: bool,
) -> None:
    """Dry-run one call: ALLOW or DENY, the reason code, and every check's verdict.

    Runs the checks a live call goes through, on the configuration in SQL and today's
    counters, and prints the decision, the normalized number, the destination and its rate, the
    longest call the budget allows, each check (pass or FAIL, with its reason code), and today's
    spend against the limits. Nothing is reserved, learned or counted. Exit status 0 on ALLOW,
    1 on DENY.

    \b
    Example:
      guard check --tenant demo --ext 1001 --to 02079460000 --ip 192.0.2.10 \\
          --ua 'Yealink SIP-T46S' --at 2030-01-07T10:00
    """
    for field, value in (("tenant", tenant), ("ext", extension), ("to", number)):
        if not value:
            raise ValidationError(field, "must not be empty")
    attempt = CallAttempt(tenant, extension, number, source_ip, user_agent, CALL_ID)
    run = asyncio.run(dry_run(state.admin_settings, attempt, at))
    if as_json:
        print_json(dry_run_json(run))
    else:
        print_dry_run(run)
    if run.decision.result is not Result.ALLOW:
        click.get_current_context().exit(EXIT_REFUSED)
