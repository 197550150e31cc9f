"""The shipped systemd units: one for each long-running Guard command, each running a real
``guard`` command, configured and sandboxed like ``guard.service``, started after the unit that
migrates the schema, on ports of their own, and accepted by ``systemd-analyze verify``.

Which of them log refusals and blocks, and so feed the fail2ban jail, is tested with the filter
(``test_fail2ban.py``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from systemd_support import GUARD, SYSTEMD, Unit, shipped_units

from guard.cli import cli
from guard.cli.serve import serve
from guard.settings import Listen, load_settings
from guard.workers import worker_settings

README = Path(__file__).resolve().parents[1] / "README.md"
#: Settings every unit shares with guard.service: the same user, settings file and sandbox.
SHARED = (
    "User",
    "Group",
    "EnvironmentFile",
    "NoNewPrivileges",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "ReadWritePaths",
    "WorkingDirectory",
    "Restart",
    "KillSignal",
)


def long_running(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[str]:
    """The commands that serve until stopped (their help says so), as ``guard …`` arguments."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        if isinstance(command, click.Group):
            yield from long_running(command, (*path, name))
        if "until SIGTERM" in (command.help or ""):
            yield " ".join((*path, name))


def by_name() -> dict[str, Unit]:
    return {unit.name: unit for unit in shipped_units()}


def test_every_long_running_command_has_a_unit() -> None:
    commands = sorted(long_running(cli))
    assert commands == ["ari", "dashboard", "serve"]
    assert sorted(unit.command for unit in shipped_units()) == commands
    readme = README.read_text("utf-8")
    for unit in shipped_units():
        assert f"contrib/systemd/{unit.name}" in readme


@pytest.mark.parametrize("key", ["ExecStartPre", "ExecStart"])
def test_every_exec_line_runs_a_real_guard_command(key: str) -> None:
    """Each ``Exec…=`` line parses as ``guard`` arguments that name an existing subcommand and
    options it accepts (``--help`` is eager, but an unknown option still fails the parse)."""
    ran = 0
    for unit in shipped_units():
        for args in unit.guard_args(key):
            result = CliRunner().invoke(cli, [*args, "--help"], catch_exceptions=False)
            assert result.exit_code == 0, f"{unit.name}: {key}={GUARD} {' '.join(args)}"
            usage = result.output.splitlines()[0]
            assert usage.startswith(f"Usage: guard {' '.join(args)} "), usage
            ran += 1
    assert ran >= (1 if key == "ExecStartPre" else 3)


def test_every_unit_is_configured_and_sandboxed_like_guard_service() -> None:
    units = by_name()
    reference = units.pop("guard.service")
    assert reference.value("Service", "EnvironmentFile") == "/etc/guard/guard.env"
    assert reference.value("Service", "User") == "guard"
    for unit in units.values():
        for key in SHARED:
            assert unit.value("Service", key) == reference.value("Service", key), (unit.name, key)
        assert unit.value("Service", "Type") == "exec"
        assert unit.value("Install", "WantedBy") == "multi-user.target"


def test_the_units_start_after_guard_service_whose_migration_runs_first() -> None:
    """Started together, the other units wait for guard.service's ``guard db upgrade``; a unit
    that can serve calls without it (``guard ari`` alone) migrates by itself."""
    units = by_name()
    assert units["guard.service"].guard_args("ExecStartPre") == [["db", "upgrade"]]
    for unit in units.values():
        assert "network-online.target" in unit.words("Unit", "After") & unit.words("Unit", "Wants")
        if unit.name != "guard.service":
            assert "guard.service" in unit.words("Unit", "After"), unit.name
    assert units["guard-ari.service"].guard_args("ExecStartPre") == [["db", "upgrade"]]
    assert "guard-ari.service" in units["guard-dashboard.service"].words("Unit", "After")


def listeners(unit: Unit) -> set[Listen]:
    """The addresses ``unit``'s command binds, with no listen address in guard.env (the
    defaults); ``guard serve`` with as many workers as ``--workers`` allows."""
    settings = load_settings(unit.environment())
    if unit.command == "dashboard":
        return {settings.dashboard_listen}
    workers = serve.params[[p.name for p in serve.params].index("workers")].type
    assert isinstance(workers, click.IntRange) and workers.max is not None
    count = workers.max if unit.command == "serve" else 1
    metrics = {worker_settings(settings, i).metrics_listen for i in range(count)}
    assert None not in metrics
    agi = set(settings.agi_listen) if unit.command == "serve" else set()
    return {listen for listen in metrics if listen is not None} | agi


def test_no_two_units_listen_on_one_port() -> None:
    """``guard ari`` exports ``/metrics`` like ``guard serve`` (worker i on the port + i): its
    unit moves it off their ports."""
    taken: dict[Listen, str] = {}
    for unit in shipped_units():
        for listen in listeners(unit):
            assert listen not in taken, f"{unit.name} and {taken[listen]} both bind {listen}"
            taken[listen] = unit.name


def test_systemd_analyze_verifies_every_unit(tmp_path: Path) -> None:
    """The units installed as the README says, in a root of their own (``--root``) with this
    machine's system units and a ``guard`` at the install path: no error, no warning."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    system = next(
        p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()
    )
    shutil.copytree(system, tmp_path / "usr/lib/systemd/system", symlinks=True)
    installed = tmp_path / "etc/systemd/system"
    installed.mkdir(parents=True)
    names = []
    for unit in sorted(SYSTEMD.glob("*.service")):
        shutil.copy(unit, installed)
        names.append(unit.name)
    guard = tmp_path / GUARD.lstrip("/")
    guard.parent.mkdir(parents=True)
    guard.write_text("#!/bin/sh\n")
    guard.chmod(0o755)
    result = subprocess.run(
        [tool, "verify", "--man=no", f"--root={tmp_path}", *names],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [line for line in result.stderr.splitlines() if any(n in line for n in names)]
    assert result.returncode == 0 and not ours, result.stderr
