"""The one settings object: environment variables (``GUARD_*``) over an optional TOML file.

Every setting is declared once in ``SETTINGS`` with its variable, default, parser and meaning;
the README's configuration table is generated from the same list (``guard config show``).
An invalid value fails at start with a ``ConfigurationError`` that names the variable.
The TOML file (``GUARD_CONFIG``) uses the same names in lower case without the prefix
(``redis_url = "redis://…"``); the environment wins over the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from guard.errors import ConfigurationError

Listen = tuple[str, int]
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
#: A secret in a URL's query (``?password=…``, libpq's ``sslpassword=…``).
_SECRET_OPTION = re.compile(r"(?i)((?:password|passwd|pwd)=)[^&]*")


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[::1]:4573`` for IPv6) to a (host, port) pair."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def _listen_list(text: str) -> tuple[Listen, ...]:
    items = tuple(parse_listen(part) for part in text.split(",") if part.strip())
    if not items:
        raise ValueError("at least one HOST:PORT is needed")
    return items


def _networks(text: str) -> tuple[IPNet, ...]:
    return tuple(
        ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip()
    )


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _bounded_float(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return value

    return parse


def _text(text: str) -> str:
    return text.strip()


def _ari_url(text: str) -> str:
    """Empty (ARI off), or ``http(s)://host[:port]/path`` without credentials."""
    url = text.strip().rstrip("/")
    if not url:
        return ""
    scheme, sep, rest = url.partition("://")
    if scheme.lower() not in {"http", "https"} or not sep or not rest:
        raise ValueError(f"expected http://host:8088/ari, got {text!r}")
    if "@" in rest.partition("/")[0]:
        raise ValueError("give the ARI user and password separately, not in the URL")
    return url


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


def _url_list(text: str) -> tuple[str, ...]:
    """Comma-separated http(s) URLs (webhooks)."""
    urls = tuple(part.strip() for part in text.split(",") if part.strip())
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {_url_host(url)!r}")
    return urls


def _url_host(url: str) -> str:
    """``scheme://host[:port]/…``: webhook URLs carry their secret in the path or query."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "***"
    return f"{parts.scheme}://{parts.hostname or '?'}{port}/…"


def _address_list(text: str) -> tuple[str, ...]:
    """Comma-separated e-mail addresses (``user@domain``; no names, no line breaks)."""
    addresses = tuple(part.strip() for part in text.split(",") if part.strip())
    for address in addresses:
        local, at, domain = address.rpartition("@")
        if not at or not local or "." not in domain or not address.isprintable() or " " in address:
            raise ValueError(f"not an e-mail address: {address!r}")
    return addresses


def _optional_listen(text: str) -> Listen | None:
    return parse_listen(text) if text.strip() else None


def _password_hash(text: str) -> str:
    value = text.strip()
    if value and (not value.startswith("scrypt:") or value.count(":") != 5):
        raise ValueError("not a hash made by `guard dashboard hash-password`")
    return value


def _token(text: str) -> str:
    value = text.strip()
    if value and len(value) < 32:
        raise ValueError("too short: use at least 32 random characters")
    return value


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return f"GUARD_{self.name.upper()}"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "database_url",
        "sqlite:///guard.db",
        _text,
        "SQLAlchemy URL of the configuration database (SQLite file in the working directory"
        " by default; `postgresql+psycopg2://…` in production)",
        secret=True,
    ),
    Setting(
        "redis_url",
        "memory://",
        _text,
        "Counter store: `redis://`, `rediss://`, `unix://` (a Redis on this host, by its socket),"
        " `redis+sentinel://`, `redis+cluster://`, or `memory://` (in-process, not shared, not"
        " durable: first runs only)",
        secret=True,
    ),
    Setting("redis_prefix", "guard", _text, "Prefix of every Redis key"),
    Setting(
        "redis_timeout_ms",
        "50",
        _bounded_int(1, 10_000),
        "Bound on one Redis round trip; slower means `store_unavailable`",
    ),
    Setting(
        "agi_listen",
        "127.0.0.1:4573",
        _listen_list,
        "FastAGI listen addresses, comma-separated HOST:PORT",
    ),
    Setting(
        "agi_allow",
        "127.0.0.0/8,::1/128",
        _networks,
        "Networks allowed to connect to the FastAGI port (comma-separated CIDRs)",
    ),
    Setting(
        "agi_timeout",
        "5",
        _bounded_float(0.1, 300),
        "Seconds to wait for Asterisk's environment block or a command reply",
    ),
    Setting(
        "agi_max_sessions",
        "2000",
        _bounded_int(1, 1_000_000),
        "Concurrent FastAGI sessions per worker",
    ),
    Setting(
        "grace_seconds",
        "60",
        _bounded_int(0, 86_400),
        "Seconds after a reservation's max duration before the sweeper charges it in full",
    ),
    Setting(
        "sweep_interval",
        "15",
        _bounded_float(0.1, 3600),
        "Seconds between sweeps of expired reservations inside `guard serve`",
    ),
    Setting(
        "reload_interval",
        "2",
        _bounded_float(0.05, 3600),
        "Seconds between checks of the configuration version",
    ),
    Setting(
        "fail_open_max_seconds",
        "300",
        _bounded_int(1, 86_400),
        "Max call duration granted by the `allow_local` fail mode while Redis is down",
    ),
    Setting(
        "emergency_max_seconds",
        "14400",
        _bounded_int(1, 86_400),
        "Max duration handed to the dialplan for emergency calls",
    ),
    Setting(
        "log_format",
        "text",
        _choice("text", "json"),
        "`text` (key=value, one event a line) or `json` (one object a line)",
    ),
    Setting("log_level", "INFO", _choice("debug", "info", "warning", "error"), "Log level"),
    Setting(
        "metrics_listen",
        "127.0.0.1:9573",
        _optional_listen,
        "`guard serve`'s Prometheus `/metrics` listener, HOST:PORT; empty turns it off",
    ),
    Setting(
        "metrics_max_tenants",
        "200",
        _bounded_int(1, 100_000),
        "Most tenants (by today's spend) exported per-tenant on the dashboard's `/metrics`",
    ),
    Setting(
        "dashboard_listen",
        "127.0.0.1:8080",
        parse_listen,
        "`guard dashboard` listen address, HOST:PORT; any address but loopback needs a password"
        " hash or a token",
    ),
    Setting("dashboard_user", "admin", _text, "The dashboard's login name"),
    Setting(
        "dashboard_password_hash",
        "",
        _password_hash,
        "Hash of the dashboard password, made by `guard dashboard hash-password` (never the"
        " password itself)",
        secret=True,
    ),
    Setting(
        "dashboard_token",
        "",
        _token,
        "Bearer token for the dashboard's JSON API and `/metrics` (at least 32 characters);"
        " also accepted as the password at the login form",
        secret=True,
    ),
    Setting(
        "dashboard_session_secret",
        "",
        _text,
        "Key that signs dashboard session cookies; empty: a random key per start (everyone"
        " logs in again after a restart)",
        secret=True,
    ),
    Setting(
        "dashboard_session_hours",
        "12",
        _bounded_int(1, 720),
        "Hours a dashboard login lasts",
    ),
    Setting(
        "dashboard_secure_cookies",
        "false",
        _bool,
        "Mark the session cookie `Secure` (set it when the dashboard is served over TLS)",
    ),
    Setting(
        "dashboard_actions",
        "false",
        _bool,
        "Allow the dashboard's actions (unlock an extension, unblock an IP, hang up a call);"
        " off: read-only",
    ),
    Setting(
        "ari_url",
        "",
        _ari_url,
        "Asterisk REST Interface, e.g. `http://127.0.0.1:8088/ari` (see `dialplan/http.conf`);"
        " empty: ARI off. Needed by `guard ari`, `guard serve --ari`, interval reservations and"
        " the live-call commands",
    ),
    Setting("ari_user", "guard", _text, "ARI user (a section of `ari.conf`)"),
    Setting("ari_password", "", _text, "ARI password (`ari.conf`)", secret=True),
    Setting(
        "ari_app",
        "guard",
        _text,
        "Stasis application name: the first argument of `Stasis()` in the ARI dialplan",
    ),
    Setting(
        "ari_refuse",
        "hangup",
        _choice("hangup", "continue"),
        "How the Stasis app refuses a call: `hangup` (cause congestion, SIP 503) or `continue`"
        " with GUARD_RESULT=DENY for the dialplan to reject",
    ),
    Setting(
        "ari_ring_timeout",
        "60",
        _bounded_int(0, 3600),
        "The ring timeout of `Dial()` in the ARI dialplan: the Stasis app's TIMEOUT(absolute)"
        " backstop is the call's limit plus this",
    ),
    Setting(
        "ari_timeout",
        "2",
        _bounded_float(0.1, 60),
        "Seconds to wait for one ARI REST answer",
    ),
    Setting(
        "ari_hangup_on_mismatch",
        "true",
        _bool,
        "With ARI configured: when a learned User-Agent mismatch locks an extension, also hang"
        " up its live calls",
    ),
    Setting(
        "interval_lead_seconds",
        "15",
        _bounded_float(1, 3600),
        "Interval reservations: extend a call's reservation this long before its slice runs"
        " out (more than GUARD_INTERVAL_TICK_SECONDS plus the Redis and ARI timeouts)",
    ),
    Setting(
        "interval_tick_seconds",
        "1",
        _bounded_float(0.05, 60),
        "Interval reservations: seconds between the extender's passes over the slices",
    ),
    Setting(
        "interval_cut_margin_ms",
        "500",
        _bounded_int(0, 60_000),
        "Interval reservations: hang up a call whose extension was refused this long before"
        " its reserved money runs out (covers the ARI round trip)",
    ),
    Setting(
        "block_threshold",
        "20",
        _bounded_int(0, 1_000_000),
        "Refused attempts from one source IP within GUARD_BLOCK_WINDOW_MINUTES that block it"
        ' (the "HGC 200" pattern); 0: never. A tenant\'s own threshold (SQL) wins',
    ),
    Setting(
        "block_seconds",
        "3600",
        _bounded_int(1, 365 * 86_400),
        "How long such a block lasts (a scanner User-Agent blocks until `guard ip unblock`);"
        " a tenant's own length (SQL) wins",
    ),
    Setting(
        "block_window_minutes",
        "10",
        _bounded_int(1, 60),
        "The sliding window of the refused-attempt counts, per source IP and per extension",
    ),
    Setting(
        "block_allow",
        "127.0.0.0/8,::1/128",
        _networks,
        "Addresses never blocked, for every tenant (the PBX itself, the office): comma-separated"
        " CIDRs; `guard ip allow add` keeps more in SQL, per tenant too",
    ),
    Setting(
        "perimeter_refresh_interval",
        "1",
        _bounded_float(0.05, 60),
        "Seconds between checks of the IP blocks and threat lists in Redis (each guard keeps a"
        " copy in memory, so the block check costs no round trip)",
    ),
    Setting(
        "geoip_db",
        "",
        _optional_path,
        "MaxMind-format country database (GeoLite2-Country or DB-IP Lite `.mmdb`); empty: the"
        " country lists are not checked. Reopened when the file changes",
    ),
    Setting(
        "geoip_mode",
        "mmap",
        _choice("mmap", "memory"),
        "`mmap` (memory-mapped, shared with the page cache) or `memory` (read into RAM)",
    ),
    Setting(
        "alert_spend_percent",
        "80",
        _bounded_int(1, 100),
        "Settled spend at this share of a daily limit raises a `spend_warning` (once a day)",
    ),
    Setting(
        "alert_webhooks",
        "",
        _url_list,
        "Alert webhooks: comma-separated http(s) URLs that get each alert as a JSON POST",
        secret=True,
    ),
    Setting(
        "alert_webhook_timeout",
        "5",
        _bounded_float(0.1, 120),
        "Seconds one webhook POST may take",
    ),
    Setting(
        "alert_webhook_retries",
        "3",
        _bounded_int(0, 10),
        "Retries of a webhook POST that failed (connection, timeout, 429, 5xx), with backoff",
    ),
    Setting("alert_smtp_host", "", _text, "SMTP server for alert e-mails; empty: no e-mail"),
    Setting("alert_smtp_port", "587", _bounded_int(1, 65535), "SMTP port"),
    Setting(
        "alert_smtp_security",
        "starttls",
        _choice("starttls", "ssl", "none"),
        "SMTP transport security: `starttls`, `ssl` (implicit TLS, usually port 465) or `none`",
    ),
    Setting("alert_smtp_from", "guard@localhost", _text, "Sender of alert e-mails"),
    Setting("alert_smtp_to", "", _address_list, "Recipients of alert e-mails, comma-separated"),
    Setting("alert_smtp_user", "", _text, "SMTP login; empty: no authentication"),
    Setting("alert_smtp_password", "", _text, "SMTP password", secret=True),
)


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    redis_url: str
    redis_prefix: str
    redis_timeout_ms: int
    agi_listen: tuple[Listen, ...]
    agi_allow: tuple[IPNet, ...]
    agi_timeout: float
    agi_max_sessions: int
    grace_seconds: int
    sweep_interval: float
    reload_interval: float
    fail_open_max_seconds: int
    emergency_max_seconds: int
    log_format: str
    log_level: str
    metrics_listen: Listen | None
    metrics_max_tenants: int
    dashboard_listen: Listen
    dashboard_user: str
    dashboard_password_hash: str
    dashboard_token: str
    dashboard_session_secret: str
    dashboard_session_hours: int
    dashboard_secure_cookies: bool
    dashboard_actions: bool
    ari_url: str
    ari_user: str
    ari_password: str
    ari_app: str
    ari_refuse: str
    ari_ring_timeout: int
    ari_timeout: float
    ari_hangup_on_mismatch: bool
    interval_lead_seconds: float
    interval_tick_seconds: float
    interval_cut_margin_ms: int
    block_threshold: int
    block_seconds: int
    block_window_minutes: int
    block_allow: tuple[IPNet, ...]
    perimeter_refresh_interval: float
    geoip_db: Path | None
    geoip_mode: str
    alert_spend_percent: int
    alert_webhooks: tuple[str, ...]
    alert_webhook_timeout: float
    alert_webhook_retries: int
    alert_smtp_host: str
    alert_smtp_port: int
    alert_smtp_security: str
    alert_smtp_from: str
    alert_smtp_to: tuple[str, ...]
    alert_smtp_user: str
    alert_smtp_password: str

    @property
    def redis_timeout(self) -> float:
        return self.redis_timeout_ms / 1000

    @property
    def ari_enabled(self) -> bool:
        """Whether ARI is configured (``GUARD_ARI_URL``)."""
        return bool(self.ari_url)

    def public(self) -> dict[str, Any]:
        """The settings with every secret masked, for `guard config show` and logs."""
        out: dict[str, Any] = {}
        for spec in SETTINGS:
            value = getattr(self, spec.name)
            if spec.secret and isinstance(value, str):
                value = mask_url(value) if "://" in value else "***" if value else ""
            elif spec.secret and isinstance(value, tuple):
                value = tuple(_url_host(item) for item in value)
            out[spec.name] = value
        return out


def mask_url(url: str) -> str:
    """Hide the secrets of a URL: the user part (``redis://:secret@h`` -> ``redis://:***@h``;
    a user part without a colon may be a token: ``redis://***@h``), with several ``host:port``
    pairs too, and ``password=``-style options. Used for every URL Guard shows or logs."""
    scheme, sep, rest = url.partition("://")
    if sep:
        netloc, slash, tail = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if at:
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
        url = f"{scheme}://{netloc}{slash}{tail}"
    return _SECRET_OPTION.sub(r"\1***", url)


def _read_file(path: Path) -> Mapping[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigurationError(f"GUARD_CONFIG: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"GUARD_CONFIG: {path} is not valid TOML: {exc}") from None


def load_settings(environ: Mapping[str, str] | None = None, **overrides: str) -> Settings:
    """Settings from ``overrides`` > environment > ``GUARD_CONFIG`` file > defaults."""
    env = os.environ if environ is None else environ
    file_values: Mapping[str, Any] = {}
    config_path = env.get("GUARD_CONFIG", "").strip()
    if config_path:
        file_values = _read_file(Path(config_path))
        known = {spec.name for spec in SETTINGS}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ConfigurationError(f"GUARD_CONFIG: unknown setting(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for spec in SETTINGS:
        if spec.name in overrides:
            raw = overrides[spec.name]
        elif spec.env in env:
            raw = env[spec.env]
        elif spec.name in file_values:
            raw = str(file_values[spec.name])
        else:
            raw = spec.default
        try:
            values[spec.name] = spec.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"{spec.env}: {exc}") from None
    return Settings(**values)
