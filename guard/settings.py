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
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from guard.errors import ConfigurationError

Listen = tuple[str, int]
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


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
        "Counter store: `redis://`, `rediss://`, `redis+sentinel://`, `redis+cluster://`, or"
        " `memory://` (in-process, not shared, not durable: first runs only)",
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

    @property
    def redis_timeout(self) -> float:
        return self.redis_timeout_ms / 1000

    def public(self) -> dict[str, Any]:
        """The settings with every secret masked, for `guard config show` and logs."""
        out: dict[str, Any] = {}
        for spec in SETTINGS:
            value = getattr(self, spec.name)
            out[spec.name] = mask_url(value) if spec.secret and isinstance(value, str) else value
        return out


def mask_url(url: str) -> str:
    """Hide the password of a URL (``redis://:secret@h`` -> ``redis://:***@h``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


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
