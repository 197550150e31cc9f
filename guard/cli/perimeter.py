"""Perimeter and warnings commands: ``guard ip``, ``guard threat``, ``guard geoip``,
``guard events``, ``guard alerts``, ``guard raises``, and ``raise`` under ``guard ext`` and
``guard tenant``.

IP blocks and threat lists live in the counter store (Redis), so these commands write there and
record the change in the audit log themselves (``guard ip block`` also logs the block's
``ip_blocked`` event line on stderr, as ``guard serve`` does, for fail2ban); allow-lists,
thresholds, country lists and limit raises live in SQL like the rest of the configuration
(audited by the repository, then the guards reload). ``guard.cli.ext`` and ``guard.cli.tenant``
add ``ext_raise`` and ``tenant_raise`` to their groups.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from guard.cli.common import (
    MEMORY_STORE_NOTE,
    CliState,
    Invalid,
    Refused,
    json_option,
    money,
    money_json,
    pass_state,
    print_fields,
    print_json,
    print_table,
    tenant_option,
    to_money,
    warn,
    when,
)
from guard.domain import CountryMode
from guard.errors import ConfigStoreError
from guard.ledger.types import IpBlock, ThreatKind
from guard.logs import logging_to_stderr
from guard.policy import parse_source_ip

if TYPE_CHECKING:
    from guard.config.repository import AuditInfo, IpAllowInfo, Keep, RaiseInfo

#: The ``reason=`` of the ``ip_blocked`` event of an admin's block (the admin's text is ``note=``).
ADMIN_BLOCK = "admin_block"
_DURATION = re.compile(r"([0-9]+)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DEFAULT = "default"


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``30m``, ``4h``, ``2d``, ``1w`` → seconds (at least 1)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or int(match[1]) <= 0:
        raise click.BadParameter(f"not a duration: {text!r} (e.g. 30m, 4h, 2d)")
    return int(match[1]) * _UNITS[match[2]]


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_duration(value)


def _since(text: str) -> datetime:
    """``1h``-style age, or an ISO 8601 date/time (UTC when it has no offset)."""
    try:
        return datetime.fromtimestamp(time.time() - parse_duration(text), UTC)
    except click.BadParameter:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"not an age or a time: {text!r} (e.g. 1h, 2d, 2025-01-31T08:00)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _address(text: str) -> str:
    address = parse_source_ip(text.strip())
    if address is None:
        raise Invalid(f"not an IP address: {text!r}")
    return str(address)


def _need_shared_store(state: CliState) -> None:
    if state.memory_store:
        raise Refused(MEMORY_STORE_NOTE)


def _audit(state: CliState, kind: str, detail: dict[str, Any]) -> None:
    """Record a change made in the counter store; the change stands even if SQL is down."""
    from guard.config import repository

    try:
        repository.record_admin_event(state.sql, state.actor, kind, detail)
    except ConfigStoreError as exc:
        warn(f"done, but NOT recorded in the audit log: {exc}")


# --- guard ip ----------------------------------------------------------------------------------


@click.group()
def ip() -> None:
    """Blocked source IPs and the allow-list of addresses never blocked.

    Guard blocks an IP by itself when its refused attempts pass a threshold within the window
    (GUARD_BLOCK_THRESHOLD in GUARD_BLOCK_WINDOW_MINUTES, or the tenant's own: `guard ip
    policy`) for GUARD_BLOCK_SECONDS, and at once, until unblocked, when it sends a SIP scanner
    User-Agent. Calls from a blocked IP are refused with ip_blocked before any other check
    (emergency numbers excepted), by every tenant, within about a second on every guard.
    """


def block_json(block: IpBlock) -> dict[str, Any]:
    return {
        "ip": block.ip,
        "until": when(block.until),
        "permanent": block.until is None,
        "reason": block.reason,
        "at": when(block.at),
        "by": block.by,
        "refusals": block.refusals,
    }


def log_block(state: CliState, address: str, until: float | None, note: str) -> None:
    """Write the block's ``ip_blocked`` event to this command's log (stderr), as ``guard serve``
    logs the blocks it makes (``EventBus.emit``: the same fields, escaping and format), so that
    fail2ban on that log bans an admin's block too. Only the log line: the audit log records the
    block as ``admin.ip.block``."""
    from guard.events import Event, EventBus, EventKind

    detail = {"until": "-" if until is None else int(until), "by": state.actor, "note": note}
    event = Event(EventKind.IP_BLOCKED, ADMIN_BLOCK, source_ip=address, detail=detail)
    settings = state.settings
    with logging_to_stderr(settings.log_format, settings.log_level):
        EventBus().emit(event)


@ip.command("block")
@click.argument("address", metavar="IP")
@click.option(
    "--for",
    "seconds",
    metavar="DURATION",
    callback=_duration,
    help="How long (30m, 4h, 2d); default: until `guard ip unblock`.",
)
@click.option("--reason", default="blocked by an admin", show_default=True, help="Why.")
@pass_state
def ip_block(state: CliState, address: str, seconds: int | None, reason: str) -> None:
    """Block IP for every tenant (refused with ip_blocked).

    Also writes the `event kind=ip_blocked reason=admin_block src=IP …` line of the servers'
    log to stderr, for fail2ban.
    """
    _need_shared_store(state)
    canonical = _address(address)
    if not reason.isprintable() or not 0 < len(reason) <= 200:
        raise Invalid("--reason must be 1-200 printable characters")
    now = time.time()
    created = state.with_ledger(
        lambda ledger: ledger.block_ip(
            canonical, seconds=seconds, reason=reason, by=state.actor, now=now
        )
    )
    log_block(state, canonical, None if seconds is None else now + seconds, reason)
    _audit(state, "ip.block", {"ip": canonical, "seconds": seconds, "reason": reason})
    ends = "until unblocked" if seconds is None else f"for {seconds} s"
    click.echo(f"{'blocked' if created else 'block replaced:'} {canonical} {ends}")


@ip.command("unblock")
@click.argument("address", metavar="IP")
@pass_state
def ip_unblock(state: CliState, address: str) -> None:
    """Lift the block of IP and reset its count of refused attempts."""
    _need_shared_store(state)
    canonical = _address(address)
    was = state.with_ledger(lambda ledger: ledger.unblock_ip(canonical, now=time.time()))
    _audit(state, "ip.unblock", {"ip": canonical, "was_blocked": was})
    if not was:
        raise Refused(f"{canonical} was not blocked")
    click.echo(f"unblocked {canonical}")


@ip.command("list")
@json_option
@pass_state
def ip_list(state: CliState, as_json: bool) -> None:
    """The blocked IPs (expired blocks are dropped on the way)."""
    _need_shared_store(state)
    blocks = state.with_ledger(lambda ledger: ledger.ip_blocks(time.time()))
    if as_json:
        print_json([block_json(block) for block in blocks])
        return
    print_table(
        ("ip", "until", "reason", "by", "refusals", "since"),
        (
            (b.ip, when(b.until) or "unblocked", b.reason, b.by, b.refusals, when(b.at))
            for b in blocks
        ),
        empty="(no blocked IP)",
    )


def _threshold(_ctx: click.Context, param: click.Parameter, value: str | None) -> Keep[int | None]:
    from guard.config.repository import UNSET

    if value is None:
        return UNSET
    if value.strip().lower() == _DEFAULT:
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"a whole number or {_DEFAULT!r}, not {value!r}") from None


def _block_length(
    _ctx: click.Context, param: click.Parameter, value: str | None
) -> Keep[int | None]:
    from guard.config.repository import UNSET

    if value is None:
        return UNSET
    return None if value.strip().lower() == _DEFAULT else parse_duration(value)


@ip.command("policy")
@tenant_option()
@click.option(
    "--block-after",
    metavar="N|default",
    callback=_threshold,
    help="Refused attempts from one IP in the window that block it (0: never).",
)
@click.option(
    "--block-for", metavar="DURATION|default", callback=_block_length, help="Block length."
)
@json_option
@pass_state
def ip_policy(
    state: CliState,
    tenant: str,
    block_after: Keep[int | None],
    block_for: Keep[int | None],
    as_json: bool,
) -> None:
    """Show or set the tenant's own block threshold and length (`default`: the settings')."""
    from guard.config import repository
    from guard.config.repository import UNSET

    if block_after is UNSET and block_for is UNSET:
        info = repository.get_perimeter(state.sql, tenant)
    else:
        info = repository.set_block_policy(
            state.sql, tenant, actor=state.actor, threshold=block_after, seconds=block_for
        )
        state.changed()
    settings = state.settings
    threshold = settings.block_threshold if info.block_threshold is None else info.block_threshold
    seconds = settings.block_seconds if info.block_seconds is None else info.block_seconds
    if as_json:
        print_json(
            {
                "tenant": tenant,
                "block_threshold": info.block_threshold,
                "block_seconds": info.block_seconds,
                "effective_threshold": threshold,
                "effective_seconds": seconds,
                "window_minutes": settings.block_window_minutes,
            }
        )
        return
    own = "" if info.block_threshold is not None else " (global setting)"
    own_length = "" if info.block_seconds is not None else " (global setting)"
    print_fields(
        [
            ("block after", f"{threshold} refused attempts{own}"),
            ("within", f"{settings.block_window_minutes} minutes"),
            ("block for", f"{seconds} s{own_length}"),
        ]
    )


@ip.group("allow")
def ip_allow() -> None:
    """Addresses never blocked (the PBX itself, the office): global or per tenant.

    GUARD_BLOCK_ALLOW holds more, for every tenant. An allow-listed address is never counted
    towards a block, nor refused with ip_blocked (the other checks still apply).
    """


def allow_json(info: IpAllowInfo) -> dict[str, Any]:
    return {"tenant": info.tenant, "cidr": info.cidr, "note": info.note}


@ip_allow.command("add")
@click.argument("cidr")
@tenant_option(required=False, help="Only for this tenant (default: every tenant).")
@click.option("--note", default="", help="What this address is.")
@pass_state
def allow_add(state: CliState, cidr: str, tenant: str | None, note: str) -> None:
    """Never block CIDR (an address or a network)."""
    from guard.config import repository

    info = repository.add_ip_allow(state.sql, cidr, actor=state.actor, tenant=tenant, note=note)
    state.changed()
    click.echo(f"never blocked: {info.cidr}" + (f" (tenant {tenant})" if tenant else ""))


@ip_allow.command("remove")
@click.argument("cidr")
@tenant_option(required=False, help="From this tenant's list (default: the global one).")
@pass_state
def allow_remove(state: CliState, cidr: str, tenant: str | None) -> None:
    from guard.config import repository

    repository.remove_ip_allow(state.sql, cidr, actor=state.actor, tenant=tenant)
    state.changed()
    click.echo(f"removed {cidr} from the allow-list")


@ip_allow.command("list")
@tenant_option(required=False, help="This tenant's list (default: the global one).")
@json_option
@pass_state
def allow_list(state: CliState, tenant: str | None, as_json: bool) -> None:
    from guard.config import repository

    found = repository.list_ip_allow(state.sql, tenant=tenant)
    if as_json:
        print_json(
            {
                "settings": [str(n) for n in state.settings.block_allow] if tenant is None else [],
                "allow": [allow_json(info) for info in found],
            }
        )
        return
    rows: list[tuple[str, str]] = []
    if tenant is None:
        rows += [(str(n), "GUARD_BLOCK_ALLOW") for n in state.settings.block_allow]
    rows += [(info.cidr, info.note) for info in found]
    print_table(("cidr", "note"), rows)


# --- guard threat ------------------------------------------------------------------------------


@click.group()
def threat() -> None:
    """Threat lists: bad source IPs/networks (threat_list) and fraud number ranges
    (threat_number), kept in the counter store and checked by every guard in O(1).

    Files: one entry a line with # or ; comments, CSV (the first field; a header line is
    skipped), or APIBAN's JSON. Numbers are international prefixes: 882, +882 or 00882.
    """


@threat.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--kind", type=click.Choice([k.value for k in ThreatKind]), required=True, help="What it lists."
)
@click.option("--name", "name", metavar="LIST", help="List name (default: the file's name).")
@click.option("--replace", is_flag=True, help="Replace the list (default: add to it).")
@click.option("--skip-bad", is_flag=True, help="Import the good lines even if some are bad.")
@pass_state
def threat_import(
    state: CliState, file: Path, kind: str, name: str | None, replace: bool, skip_bad: bool
) -> None:
    """Import FILE into a threat list, atomically (a half-imported list is never seen)."""
    from guard.perimeter.threats import LIST_NAME, parse_threat_list

    _need_shared_store(state)
    chosen = ThreatKind(kind)
    list_name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", file.stem)[:64] or "list"
    if not LIST_NAME.fullmatch(list_name):
        raise Invalid(f"invalid list name {list_name!r}: 1-64 of A-Z a-z 0-9 _ . -")
    entries, errors = parse_threat_list(file.read_text("utf-8", errors="replace"), chosen)
    for error in errors:
        click.echo(f"{file}: {error}", err=True)
    if errors and not skip_bad:
        raise Invalid(f"{len(errors)} bad line(s): nothing imported (--skip-bad imports the rest)")
    if not entries and not replace:
        raise Invalid(f"{file} holds no entry")
    total = state.with_ledger(
        lambda ledger: ledger.import_threat_list(
            list_name,
            chosen,
            entries,
            replace=replace,
            source=file.name,
            by=state.actor,
            now=time.time(),
        )
    )
    detail = {"name": list_name, "kind": kind, "entries": len(entries), "replace": replace}
    _audit(state, "threat.import", {**detail, "file": file.name, "bad_lines": len(errors)})
    click.echo(f"threat list {list_name} ({kind}): {len(entries)} imported, {total} in the list")


@threat.command("list")
@json_option
@pass_state
def threat_list(state: CliState, as_json: bool) -> None:
    _need_shared_store(state)
    lists = state.with_ledger(lambda ledger: ledger.threat_lists())
    if as_json:
        print_json(
            [
                {
                    "name": item.name,
                    "kind": item.kind.value,
                    "entries": item.entries,
                    "imported_at": when(item.imported_at),
                    "source": item.source,
                    "by": item.by,
                }
                for item in lists
            ]
        )
        return
    print_table(
        ("name", "kind", "entries", "imported", "source", "by"),
        ((i.name, i.kind, i.entries, when(i.imported_at), i.source, i.by) for i in lists),
    )


@threat.command("clear")
@click.argument("name")
@pass_state
def threat_clear(state: CliState, name: str) -> None:
    """Delete threat list NAME."""
    _need_shared_store(state)
    lists = {item.name: item for item in state.with_ledger(lambda ledger: ledger.threat_lists())}
    found = lists.get(name)
    if found is None:
        raise Refused(f"no threat list {name!r}")
    state.with_ledger(lambda ledger: ledger.clear_threat_list(name, found.kind))
    _audit(state, "threat.clear", {"name": name, "kind": found.kind.value})
    click.echo(f"cleared threat list {name}")


# --- guard geoip -------------------------------------------------------------------------------


@click.group()
def geoip() -> None:
    """GeoIP country lists of tenants and extensions (country_not_allowed).

    Needs a MaxMind-format database in GUARD_GEOIP_DB (GeoLite2-Country, DB-IP Lite Country);
    without one the lists are not checked. Private, loopback and link-local addresses are
    "local" and pass every list.
    """


@geoip.command("status")
@pass_state
def geoip_status(state: CliState) -> None:
    """Whether country lists are checked, and with which database."""
    from guard.perimeter.geoip import database_status

    usable, words = database_status(state.settings.geoip_db, state.settings.geoip_mode)
    click.echo(words)
    if not usable:
        raise SystemExit(1)


@geoip.command("lookup")
@click.argument("address", metavar="IP")
@pass_state
def geoip_lookup(state: CliState, address: str) -> None:
    """The country the database gives for IP."""
    from guard.perimeter.geoip import GeoIPDatabase

    path = state.settings.geoip_db
    if path is None:
        raise Refused("no GeoIP database configured (GUARD_GEOIP_DB)")
    parsed = parse_source_ip(address.strip())
    if parsed is None:
        raise Invalid(f"not an IP address: {address!r}")
    database = GeoIPDatabase(path, state.settings.geoip_mode)
    try:
        click.echo(database.country(parsed) or "unknown")
    finally:
        database.close()


@geoip.command("set")
@tenant_option()
@click.option("--ext", "-e", "extension", metavar="EXT", help="Only this extension.")
@click.option("--allow", "allow", metavar="CC,…", help="Only these countries (ISO codes).")
@click.option("--deny", "deny", metavar="CC,…", help="Not these countries.")
@click.option("--off", is_flag=True, help="No country list.")
@pass_state
def geoip_set(
    state: CliState,
    tenant: str,
    extension: str | None,
    allow: str | None,
    deny: str | None,
    off: bool,
) -> None:
    """Set the country list of the tenant or of one extension (both apply to its calls)."""
    from guard.config import repository

    chosen = [mode for mode, given in (("allow", allow), ("deny", deny), ("off", off)) if given]
    if len(chosen) != 1:
        raise Invalid("give exactly one of --allow, --deny, --off")
    mode = CountryMode(chosen[0])
    info = repository.set_countries(
        state.sql, tenant, mode, allow or deny or "", actor=state.actor, extension=extension
    )
    state.changed()
    who = f"extension {extension} of {tenant}" if extension else f"tenant {tenant}"
    click.echo(f"{who}: {info.country_mode} {','.join(info.countries)}".rstrip())
    if state.settings.geoip_db is None:
        warn("no GeoIP database is configured (GUARD_GEOIP_DB): the list is not checked")


# --- guard events ------------------------------------------------------------------------------


@click.group()
def events() -> None:
    """The audit log: every refusal, lock, block, alert-worthy event and admin change."""


def audit_json(info: AuditInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "at": when(info.at),
        "kind": info.kind,
        "reason": info.reason,
        "tenant": info.tenant,
        "extension": info.extension,
        "source_ip": info.source_ip,
        "call_id": info.call_id,
        "actor": info.actor,
        "detail": info.detail,
    }


@events.command("list")
@click.option("--since", metavar="AGE|TIME", help="Newer than this: 1h, 2d or an ISO time.")
@tenant_option(required=False, help="Only this tenant.")
@click.option("--reason", metavar="CODE", help="Only this reason (e.g. ip_blocked).")
@click.option("--kind", metavar="KIND", help="Only this kind (refused, …; admin.* for changes).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@json_option
@pass_state
def events_list(
    state: CliState,
    since: str | None,
    tenant: str | None,
    reason: str | None,
    kind: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The newest audit events, newest first."""
    from guard.config import repository

    found = repository.list_audit_events(
        state.sql,
        since=None if since is None else _since(since),
        tenant=tenant,
        reason=reason,
        kind=kind,
        limit=limit,
    )
    if as_json:
        print_json([audit_json(info) for info in found])
        return
    print_table(
        ("at", "kind", "reason", "tenant", "ext", "src", "actor"),
        (
            (when(i.at), i.kind, i.reason, i.tenant, i.extension, i.source_ip, i.actor)
            for i in found
        ),
        empty="(no event)",
    )


# --- guard alerts ------------------------------------------------------------------------------


@click.group()
def alerts() -> None:
    """Alerts by webhook (GUARD_ALERT_WEBHOOKS), e-mail (GUARD_ALERT_SMTP_*) and the log."""


@alerts.command("test")
@pass_state
def alerts_test(state: CliState) -> None:
    """Send a sample alert through every configured channel; exit 1 if one fails."""
    import asyncio

    from guard.alerts import AlertDispatcher, channels_from_settings, sample_alert

    dispatcher = AlertDispatcher(channels_from_settings(state.settings))

    async def run() -> dict[str, str]:
        try:
            return await dispatcher.deliver(sample_alert())
        finally:
            await dispatcher.close()

    outcome = asyncio.run(run())
    for channel, error in outcome.items():
        click.echo(f"{channel}: {'FAILED: ' + error if error else 'sent'}")
    if any(outcome.values()):
        raise SystemExit(1)


# --- temporary limit raises --------------------------------------------------------------------


def raise_json(info: RaiseInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "tenant": info.tenant,
        "extension": info.extension,
        **money_json("daily_limit", info.daily_limit),
        "expires_at": when(info.expires_at),
        "reason": info.reason,
        "actor": info.actor,
    }


def _raise_options(command: Any) -> Any:
    for option in reversed(
        (
            click.option(
                "--daily", required=True, metavar="AMOUNT", callback=to_money, help="New limit."
            ),
            click.option(
                "--for",
                "seconds",
                required=True,
                metavar="DURATION",
                callback=_duration,
                help="How long (e.g. 4h); then the limit falls back by itself.",
            ),
            click.option("--reason", default="", help="Why (kept in the audit log)."),
        )
    ):
        command = option(command)
    return command


def _report_raise(info: RaiseInfo) -> None:
    who = f"extension {info.extension} of {info.tenant}" if info.extension else info.tenant
    click.echo(
        f"raised the daily limit of {who} to {money(info.daily_limit)} until "
        f"{when(info.expires_at)} (raise {info.id})"
    )


@click.command("raise")
@click.argument("name")
@tenant_option(help="Tenant of the extension.")
@_raise_options
@pass_state
def ext_raise(
    state: CliState, name: str, tenant: str, daily: int, seconds: int, reason: str
) -> None:
    """Raise extension NAME's daily limit for a while (it lapses by itself)."""
    from guard.config import repository

    info = repository.add_limit_raise(
        state.sql, tenant, daily, seconds, actor=state.actor, extension=name, reason=reason
    )
    state.changed()
    _report_raise(info)


@click.command("raise")
@click.argument("name")
@_raise_options
@pass_state
def tenant_raise(state: CliState, name: str, daily: int, seconds: int, reason: str) -> None:
    """Raise tenant NAME's daily limit for a while (it lapses by itself)."""
    from guard.config import repository

    info = repository.add_limit_raise(
        state.sql, name, daily, seconds, actor=state.actor, reason=reason
    )
    state.changed()
    _report_raise(info)


@click.group()
def raises() -> None:
    """Temporary daily-limit raises (`guard ext raise`, `guard tenant raise`)."""


@raises.command("list")
@tenant_option(required=False, help="Only this tenant.")
@click.option("--all", "include_expired", is_flag=True, help="Also the ones that ended.")
@json_option
@pass_state
def raises_list(state: CliState, tenant: str | None, include_expired: bool, as_json: bool) -> None:
    from guard.config import repository

    found = repository.list_limit_raises(state.sql, tenant=tenant, include_expired=include_expired)
    if as_json:
        print_json([raise_json(info) for info in found])
        return
    print_table(
        ("id", "tenant", "ext", "daily", "until", "by", "reason"),
        (
            (
                i.id,
                i.tenant,
                i.extension or "-",
                money(i.daily_limit),
                when(i.expires_at),
                i.actor,
                i.reason,
            )
            for i in found
        ),
    )


@raises.command("cancel")
@click.argument("raise_id", metavar="ID", type=int)
@pass_state
def raises_cancel(state: CliState, raise_id: int) -> None:
    """End raise ID now."""
    from guard.config import repository

    repository.cancel_limit_raise(state.sql, raise_id, actor=state.actor)
    state.changed()
    click.echo(f"cancelled raise {raise_id}")
