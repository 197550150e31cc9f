"""The spend ledger's Redis key schema: every key name Guard writes, and how names stay safe.

All per-tenant keys share one Redis Cluster hash tag, ``{t:<tenant>}``, so every script touches a
single slot and the same code runs on one Redis, Sentinel or Cluster. Tenant names, extension
names and IP addresses are untrusted text: inside a key name they are percent-encoded (every byte
outside ``A-Z a-z 0-9 . _ - ~``), so a hostile name can neither leave the hash tag, nor collide
with another key, nor act as a ``SCAN`` pattern. Inside hash fields and packed values they are
kept verbatim (fields are binary-safe; packed values are JSON made by Lua's ``cjson``).
Text that is not valid Unicode (lone surrogates) is stored with ``?`` in their place.

Key schema (``P`` is the prefix, ``guard`` by default; ``T``, ``E`` and ``IP`` are encoded)::

    P:{t:T}:day:<YYYYMMDD>   hash    the tenant's day (in its own time zone); fields:
                                     spent, reserved                 (whole tenant)
                                     spent:ext:<E>, reserved:ext:<E> (one extension, E verbatim)
                                     TTL 4 days, refreshed on every write
    P:{t:T}:hourly:<YYYYMMDD>
                             hash    spend of that day by hour of the tenant's wall clock, written
                                     by settle and sweep: <HH> (whole tenant), <HH>:ext:<E>
                                     (E verbatim); TTL 4 days, refreshed on every write
    P:{t:T}:calls            hash    live reservations: call id -> JSON {ext, day, reserved,
                                     max_seconds, rpm, fee, ii, si (the rate), number, dest,
                                     started, deadline (epoch ms), channel, ip}; in interval
                                     mode also slice, cap (seconds), ends (epoch ms) and, once
                                     an extension was refused, final (the reason)
    P:{t:T}:live             hash    live call counts: tenant, ext:<E>
    P:{t:T}:deadlines        zset    call id scored by its deadline (epoch ms) for the sweeper
    P:{t:T}:slices           zset    interval calls scored by ends (epoch ms) for the extender
                                     (calls, live, deadlines, slices: TTL 3 days, refreshed on
                                     write)
    P:{t:T}:extender         string  present while an extender serves the tenant (TTL a few of
                                     its ticks): only then are interval reservations granted
    P:{t:T}:settled:<call>   string  JSON marker of a closed call id {state: settled | swept |
                                     orphan, ext, day, reserved, cost, rate, at}; makes settle
                                     exactly once and lets a late settle correct a swept call.
                                     TTL 3 days
    P:{t:T}:orphans          list    JSON {call_id, billsec, at} of settles for unknown calls,
                                     newest first, capped at 1000 entries, TTL 7 days
    P:{t:T}:ext:<E>          hash    extension runtime state: ua (learned User-Agent), locked
                                     ("1"), lock_reason, locked_at (epoch ms). TTL 90 days,
                                     refreshed at every reserve of that extension
    P:{t:T}:refused:ext:<E>  hash    refused attempts of one extension in a sliding 10-minute
                                     window: <minute> and <minute>:<reason> -> count, TTL 11 min
    P:config:version         string  the configuration version, monotonic; the one key without
                                     a TTL (losing it would make guards miss a reload)

Perimeter keys are global (a scanner tries many tenants), so they share their own hash tag,
``{perimeter}``, and no script ever touches them together with a tenant's keys::

    P:{perimeter}:refused:<IP>   hash    refused attempts from one source IP, across all tenants,
                                         in the same sliding window, TTL window + 1 min
    P:{perimeter}:blocks         hash    blocked IPs: IP -> JSON {until (epoch ms, 0 = until
                                         unblocked), reason, at, by, refusals}; no TTL, expired
                                         entries are purged by every listing
    P:{perimeter}:block-expiry   zset    timed blocks scored by their end (epoch ms)
    P:{perimeter}:blocks-version string  bumped by every block and unblock: guards poll it to
                                         refresh their in-process copy of the blocks
    P:{perimeter}:threat:<K>:<N> set     threat list N of kind K (ip: addresses and CIDRs, number:
                                         E.164 prefixes); imports build <key>:tmp:<id>, RENAME it
    P:{perimeter}:threats        hash    list metadata: <K>:<N> -> JSON {entries, at, source, by}
    P:{perimeter}:threats-version string bumped by every import and clear
    P:alert:<key>                string  alert de-duplication marker (SET NX with a TTL)

The dashboard's event feed (recent events, refusals by hour, alerts by day) lives beside these
keys under the same prefix and hash tags; ``guard.feed`` documents its keys.

Shadow mode (``guard.shadow``) keeps its counters in a second ledger under the prefix
``P-shadow``, with this same schema: its calls reserve and settle there, never under ``P``.
"""

from __future__ import annotations

from urllib.parse import quote

from guard.errors import ConfigurationError


def key_part(text: str) -> str:
    """Encode untrusted text for use inside a key name (see the module docstring)."""
    return quote(text.encode("utf-8", "replace"), safe="")


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start every key name, else raise ``ConfigurationError``.

    Braces would move the Cluster hash tag off the tenant; an empty prefix would leave the keys
    without a namespace.
    """
    if not prefix or "{" in prefix or "}" in prefix or any(ch.isspace() for ch in prefix):
        raise ConfigurationError(
            f"ledger key prefix {prefix!r} must be non-empty, without braces or spaces"
        )
    return prefix


def tenant_base(prefix: str, tenant: str) -> str:
    """The common start of every key of ``tenant``: ``P:{t:T}``; scripts add the rest."""
    return f"{prefix}:{{t:{key_part(tenant)}}}"


def extension_state_key(base: str, extension: str) -> str:
    """The runtime-state hash of ``extension`` under the tenant ``base``."""
    return f"{base}:ext:{key_part(extension)}"


def extension_refusals_key(base: str, extension: str) -> str:
    """The refusal window of ``extension`` under the tenant ``base``."""
    return f"{base}:refused:ext:{key_part(extension)}"


def perimeter_base(prefix: str) -> str:
    """The common start of every perimeter key: ``P:{perimeter}``."""
    return f"{prefix}:{{perimeter}}"


def ip_refusals_key(prefix: str, source_ip: str) -> str:
    """The refusal window of one source IP (in the perimeter slot)."""
    return f"{perimeter_base(prefix)}:refused:{key_part(source_ip)}"


def threat_key(prefix: str, kind: str, name: str) -> str:
    """The set holding threat list ``name`` of ``kind`` (``ip`` or ``number``)."""
    return f"{perimeter_base(prefix)}:threat:{kind}:{key_part(name)}"


def alert_key(prefix: str, dedupe: str) -> str:
    """The de-duplication marker of one alert."""
    return f"{prefix}:alert:{key_part(dedupe)}"


def config_version_key(prefix: str) -> str:
    return f"{prefix}:config:version"
