"""``guard check``: dry-run one call through the engine and show every check's verdict.

The snapshot is built from SQL and the engine from the settings, exactly as ``guard serve`` does
(``build_services``), and the perimeter's copy of the IP blocks and threat lists is read from the
counter store once, as ``guard serve`` refreshes it every second; ``Engine.preview`` then decides
without reserving, learning or counting, the ledger's own checks before the limits (a runtime
lock, a learned User-Agent that differs) included. A call in shadow mode (``guard.shadow``) is
shown as the engine would let it go, with the verdict it would have had if enforced
(``ShadowPreview``): both are the engine's, never derived here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

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
    warn,
    when,
)
from guard.domain import CallAttempt, CheckOutcome, Decision, Reason, Result
from guard.errors import StorageError, ValidationError
from guard.schedule import tenant_day, zone
from guard.settings import Settings
from guard.snapshot import ExtensionConfig, TenantConfig

if TYPE_CHECKING:
    from guard.engine import Preview
    from guard.perimeter import Perimeter

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
class ShadowPreview:
    """A call judged in shadow mode: the verdict it would have had if enforced (the engine's
    ``Preview.enforced``; the limits are judged on the shadow counters)."""

    #: ``tenant`` (the whole tenant is in shadow mode) or ``extension`` (only this one).
    scope: str
    #: The decision if enforced: ``DENY`` and the reason a live call would have been refused for.
    enforced: Decision
    #: The refusal stands in shadow mode too (a live lock, a perimeter reason, …).
    stands: bool

    @property
    def would_refuse(self) -> bool:
        return not self.enforced.allowed


@dataclass(frozen=True, slots=True)
class DryRun:
    """What ``guard check`` found: the decision, the checks in order, and today's counters."""

    attempt: CallAttempt
    preview: Preview
    checks: tuple[CheckOutcome, ...]
    at: datetime
    shadow: ShadowPreview | None = None
    #: Why the IP blocks and threat lists could not be read (the dry run then ignores them).
    perimeter_error: str = ""

    @property
    def decision(self) -> Decision:
        """What the call gets: in shadow mode, ``ALLOW`` unless the refusal stands (``shadow``)."""
        return self.preview.decision

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


async def refresh_perimeter(perimeter: Perimeter) -> str:
    """Read the IP blocks and threat lists as ``guard serve`` does (``Perimeter.refresh``);
    the error that kept them unread, else ``""``."""
    try:
        await perimeter.refresh()
    except StorageError as exc:
        return str(exc)
    return ""


def _limits_outcome(preview: Preview, decision: Decision) -> CheckOutcome:
    """The limits' verdict (``decision``) as one more check."""
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
    from guard.service import build_services

    services = build_services(settings)
    try:
        perimeter_error = await refresh_perimeter(services.perimeter)
        tenant = services.snapshots.current.tenant(attempt.tenant)
        moment = _moment(at, tenant.timezone if tenant is not None else "UTC")
        preview = await services.engine.preview(attempt, moment.timestamp())
        checks = list(preview.policy.outcomes)
        if preview.limits is not None:
            checks += [*preview.runtime, _limits_outcome(preview, preview.limits)]
        shadow = None
        if preview.enforced is not None and tenant is not None:
            scope = "tenant" if tenant.shadow else "extension"
            shadow = ShadowPreview(scope, preview.enforced, stands=not preview.decision.allowed)
        return DryRun(attempt, preview, tuple(checks), moment, shadow, perimeter_error)
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


def shadow_json(shadow: ShadowPreview | None) -> dict[str, Any] | None:
    if shadow is None:
        return None
    enforced = shadow.enforced
    return {
        "scope": shadow.scope,
        "counters": "shadow",
        "enforced_result": enforced.result.value,
        "enforced_reason": enforced.reason.value,
        "enforced_max_seconds": enforced.max_seconds,
        "refusal_stands": shadow.stands,
    }


def describe_shadow(shadow: ShadowPreview) -> str:
    """One line for people: what shadow mode does with the call, and the enforced verdict."""
    enforced = shadow.enforced
    mode = f"on ({shadow.scope})"
    if shadow.stands:
        return f"{mode}: refused even in shadow mode ({enforced.reason} is enforced)"
    if not shadow.would_refuse:
        return (
            f"{mode}: goes out; if enforced: {enforced.result} {enforced.reason}, "
            f"max {enforced.max_seconds} s"
        )
    return f"{mode}: goes out; if enforced: {enforced.result} {enforced.reason}"


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
        "shadow": shadow_json(run.shadow),
        "perimeter_error": run.perimeter_error or None,
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
    fields: list[tuple[str, object]] = []
    if run.shadow is not None:
        fields.append(("shadow", describe_shadow(run.shadow)))
    fields += [
        ("number", f"{run.attempt.number}{normalized}"),
        ("destination", destination),
        ("max seconds", decision.max_seconds),
        ("at", f"{run.at:%a %Y-%m-%d %H:%M} {zone_name}"),
    ]
    print_fields(fields, indent=2)
    click.echo()
    print_table(
        ["result", "check", "reason", "detail"],
        [["pass" if c.passed else "FAIL", c.name, c.reason or "", c.detail] for c in run.checks],
    )
    if tenant is None or preview.tenant_today is None:
        return
    click.echo()
    counters = ", shadow counters" if run.shadow is not None else ""
    click.echo(f"limits today ({tenant_day(tenant.timezone, run.at.timestamp())}{counters})")
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

    Runs the checks a live call goes through, on the configuration in SQL, the IP blocks and
    threat lists and today's counters, and prints the decision, the normalized number, the
    destination and its rate, the longest call the budget allows, each check (pass or FAIL, with
    its reason code), and today's spend against the limits. Nothing is reserved, learned or
    counted. A call in shadow mode is ALLOW (reason shadow when it would have been refused) and
    the `shadow` line tells the verdict if enforced. Exit status 0 on ALLOW, 1 on DENY.

    \b
    Example:
      guard check --tenant demo --ext 1001 --to 02079460000 --ip 192.0.2.10 \\
          --ua 'Yealink SIP-T46S' --at 2030-01-07T10:00
    """
    import asyncio

    for field, value in (("tenant", tenant), ("ext", extension), ("to", number)):
        if not value:
            raise ValidationError(field, "must not be empty")
    attempt = CallAttempt(tenant, extension, number, source_ip, user_agent, CALL_ID)
    run = asyncio.run(dry_run(state.admin_settings, attempt, at))
    if run.perimeter_error:
        warn(f"IP blocks and threat lists not read, so not checked: {run.perimeter_error}")
    if as_json:
        print_json(dry_run_json(run))
    else:
        print_dry_run(run)
    if run.decision.result is not Result.ALLOW:
        click.get_current_context().exit(EXIT_REFUSED)
