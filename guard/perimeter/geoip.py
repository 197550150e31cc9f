"""GeoIP: the country of a source address, and the country-list check of tenants and extensions.

``GeoIPDatabase`` opens a MaxMind-format database (GeoLite2-Country/City, DB-IP Lite Country, or
any ``.mmdb`` whose records carry ``country.iso_code``) once, memory-mapped (``mmap``, with the C
extension when installed) or read into memory (``memory``), caches lookups, and reopens the file
when it changes on disk (a weekly ``geoipupdate`` replaces it). Private, loopback and link-local
addresses are ``LOCAL``: not a country, and allowed by every country list (the office, the PBX).

``country_check`` builds the ``extra_checks`` entry for ``guard.policy.evaluate`` from a lookup
function: pure given that function, so tests pass a dict. Without a database the check is not
installed at all (``guard doctor`` says so).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import maxminddb

from guard.domain import CheckOutcome, CountryMode, Reason
from guard.errors import ConfigurationError
from guard.logs import log_fields
from guard.policy import Check, CheckContext

log = logging.getLogger("guard.geoip")

IPAddress = IPv4Address | IPv6Address
#: The "country" of a private, loopback or link-local address.
LOCAL = "local"
#: ``geoip_mode`` setting -> maxminddb open mode.
MODES = {"mmap": maxminddb.MODE_AUTO, "memory": maxminddb.MODE_MEMORY}
#: Distinct addresses whose country is remembered between reloads.
CACHE_SIZE = 65_536

_COUNTRY_OFF = CheckOutcome("country", True, None, "no country list")
_COUNTRY_OK = CheckOutcome("country", True)

Lookup = Callable[[IPAddress], str | None]


def is_local(address: IPAddress) -> bool:
    """Private (RFC 1918, ULA, …), loopback or link-local: no country applies."""
    return address.is_private or address.is_loopback or address.is_link_local


def _country_of(record: Any) -> str | None:
    """``country.iso_code`` of a record, else its ``registered_country`` (anycast, satellite)."""
    if not isinstance(record, dict):
        return None
    for key in ("country", "registered_country"):
        section = record.get(key)
        if isinstance(section, dict):
            code = section.get("iso_code")
            if isinstance(code, str) and code:
                return code.upper()
    return None


def _signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class GeoIPDatabase:
    """One MaxMind-format database file, reopened when it changes (see the module docstring)."""

    def __init__(self, path: Path, mode: str = "mmap") -> None:
        if mode not in MODES:
            raise ConfigurationError(f"GeoIP mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.path = path
        self.mode = mode
        self._reader, self._signature = self._open()
        self.country = self._cached_lookup()

    def _open(self) -> tuple[maxminddb.Reader, tuple[int, int, int]]:
        try:
            signature = _signature(self.path)
            reader = maxminddb.open_database(str(self.path), MODES[self.mode])
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise ConfigurationError(
                f"GUARD_GEOIP_DB: cannot open {self.path} as a MaxMind database: {exc}"
            ) from None
        return reader, signature

    def _cached_lookup(self) -> Lookup:
        reader = self._reader

        @lru_cache(maxsize=CACHE_SIZE)
        def country(address: IPAddress) -> str | None:
            """The ISO code of ``address``'s country, ``LOCAL``, or ``None`` when unknown."""
            if is_local(address):
                return LOCAL
            try:
                return _country_of(reader.get(address))
            except ValueError:  # an IPv6 address in an IPv4-only database
                return None

        return country

    @property
    def description(self) -> str:
        meta = self._reader.metadata()
        return f"{meta.database_type} built {meta.build_epoch} ({self.path})"

    def reload_if_changed(self) -> bool:
        """Reopen the file if it was replaced or rewritten; a broken new file keeps the old one."""
        try:
            if _signature(self.path) == self._signature:
                return False
            reader, signature = self._open()
        except (OSError, ConfigurationError) as exc:
            log.warning(
                "GeoIP database not reloaded; the previous one keeps serving",
                extra=log_fields(path=str(self.path), error=str(exc)[:200]),
            )
            return False
        # The old reader is not closed here: a lookup on the event loop may still hold it (this
        # may run in a thread); it is released with the last reference to it.
        self._reader, self._signature = reader, signature
        self.country = self._cached_lookup()
        log.info("GeoIP database reloaded", extra=log_fields(path=str(self.path)))
        return True

    def close(self) -> None:
        self._reader.close()


def open_geoip(path: Path | None, mode: str = "mmap") -> GeoIPDatabase | None:
    """The database at ``path``, or ``None`` (no GeoIP check) when no path is configured."""
    return None if path is None else GeoIPDatabase(path, mode)


def _refusal(where: str, country: str | None, mode: CountryMode) -> CheckOutcome:
    shown = "an unknown country" if country is None else country
    verb = "is not on" if mode is CountryMode.ALLOW else "is on"
    return CheckOutcome(
        "country", False, Reason.COUNTRY_NOT_ALLOWED, f"{shown} {verb} the {where} country list"
    )


def _refused(mode: CountryMode, countries: frozenset[str], country: str | None) -> bool:
    if mode is CountryMode.OFF or country == LOCAL:
        return False
    listed = country is not None and country in countries
    return listed if mode is CountryMode.DENY else not listed


def country_check(lookup: Callable[[], Lookup]) -> Check:
    """The country check: the source address's country must pass the extension's list and the
    tenant's (``allow``: be on it; ``deny``: not be on it). ``LOCAL`` passes every list; an
    address the database does not know fails an allow-list and passes a deny-list.

    ``lookup`` returns the current lookup function, so the check follows database reloads.
    """

    def check_country(ctx: CheckContext) -> CheckOutcome | None:
        ext, address = ctx.extension, ctx.source_ip
        if ext is None or address is None:
            return None
        tenant = ctx.tenant
        if ext.country_mode is CountryMode.OFF and tenant.country_mode is CountryMode.OFF:
            return _COUNTRY_OFF
        country = lookup()(address)
        if _refused(ext.country_mode, ext.countries, country):
            return _refusal("extension's", country, ext.country_mode)
        if _refused(tenant.country_mode, tenant.countries, country):
            return _refusal("tenant's", country, tenant.country_mode)
        return _COUNTRY_OK

    return check_country


def database_status(path: Path | None, mode: str = "mmap") -> tuple[bool, str]:
    """(usable, words) for ``guard doctor``: off when no database is configured."""
    if path is None:
        return False, "no GeoIP database (GUARD_GEOIP_DB): country lists are NOT checked"
    if not os.access(path, os.R_OK):
        return False, f"GeoIP database {path} is not readable: country lists are NOT checked"
    try:
        database = GeoIPDatabase(path, mode)
    except ConfigurationError as exc:
        return False, str(exc)
    try:
        return True, f"GeoIP: {database.description}"
    finally:
        database.close()
