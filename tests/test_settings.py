"""Settings: defaults, environment, file, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.errors import ConfigurationError
from guard.settings import SETTINGS, load_settings, mask_url


def test_defaults_are_the_embedded_first_run() -> None:
    settings = load_settings({})
    assert settings.redis_url == "memory://"
    assert settings.database_url == "sqlite:///guard.db"
    assert settings.agi_listen == (("127.0.0.1", 4573),)


def test_environment_overrides_defaults() -> None:
    settings = load_settings(
        {"GUARD_AGI_LISTEN": "0.0.0.0:4573,[::1]:4574", "GUARD_REDIS_TIMEOUT_MS": "7"}
    )
    assert settings.agi_listen == (("0.0.0.0", 4573), ("::1", 4574))
    assert settings.redis_timeout == pytest.approx(0.007)


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("GUARD_REDIS_TIMEOUT_MS", "-1"),
        ("GUARD_REDIS_TIMEOUT_MS", "soon"),
        ("GUARD_AGI_LISTEN", "4573"),
        ("GUARD_AGI_LISTEN", "host:99999"),
        ("GUARD_AGI_ALLOW", "10.0.0.0/33"),
        ("GUARD_LOG_FORMAT", "xml"),
        ("GUARD_GRACE_SECONDS", "1e9"),
    ],
)
def test_invalid_values_fail_with_the_variable_name(env: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=env):
        load_settings({env: value})


def test_toml_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    path = tmp_path / "guard.toml"
    path.write_text('redis_prefix = "fromfile"\ngrace_seconds = 5\n')
    settings = load_settings({"GUARD_CONFIG": str(path), "GUARD_GRACE_SECONDS": "9"})
    assert settings.redis_prefix == "fromfile"
    assert settings.grace_seconds == 9


def test_unknown_file_setting_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "guard.toml"
    path.write_text('redis_prefx = "typo"\n')
    with pytest.raises(ConfigurationError, match="redis_prefx"):
        load_settings({"GUARD_CONFIG": str(path)})


def test_secrets_are_masked() -> None:
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    settings = load_settings({"GUARD_DATABASE_URL": "postgresql://guard:pw@db/guard"})
    assert "pw" not in str(settings.public())


def test_every_setting_has_help_and_a_valid_default() -> None:
    for spec in SETTINGS:
        assert spec.help
        spec.parse(spec.default)
