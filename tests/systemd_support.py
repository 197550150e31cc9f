"""The shipped systemd units (``contrib/systemd/*.service``), read as plain ``Key=value`` lines.

Enough of systemd's syntax for the units Guard ships: sections, comments, one setting a line (a
line continued with ``\\`` is refused rather than misread), a key that may repeat.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

SYSTEMD = Path(__file__).resolve().parents[1] / "contrib" / "systemd"
#: Where the README installs Guard, and so where every shipped unit runs it from.
GUARD = "/opt/guard/venv/bin/guard"


@dataclass(frozen=True)
class Unit:
    path: Path
    settings: tuple[tuple[str, str, str], ...]  # (section, key, value), in file order

    @property
    def name(self) -> str:
        return self.path.name

    def values(self, section: str, key: str) -> list[str]:
        return [v for s, k, v in self.settings if (s, k) == (section, key)]

    def value(self, section: str, key: str) -> str:
        values = self.values(section, key)
        assert len(values) == 1, f"{self.name}: [{section}] {key}= set {len(values)} times"
        return values[0]

    def words(self, section: str, key: str) -> set[str]:
        """A list setting (``After=``, ``Wants=``): every word of every line."""
        return {word for value in self.values(section, key) for word in value.split()}

    def guard_args(self, key: str) -> list[list[str]]:
        """The arguments to ``guard`` of each ``Exec…=`` line of ``key``."""
        commands = []
        for value in self.values("Service", key):
            argv = shlex.split(value)
            assert argv[0] == GUARD, f"{self.name}: {key}={value} does not run {GUARD}"
            commands.append(argv[1:])
        return commands

    @property
    def command(self) -> str:
        """The ``guard`` subcommand its ``ExecStart=`` runs: ``serve``, ``ari``, ``dashboard``."""
        (args,) = self.guard_args("ExecStart")
        return args[0]

    def environment(self) -> dict[str, str]:
        """Its ``Environment=`` assignments (``/etc/guard/guard.env`` comes on top of them)."""
        pairs = (
            word.partition("=")
            for v in self.values("Service", "Environment")
            for word in shlex.split(v)
        )
        return {name: value for name, _, value in pairs}


def read_unit(path: Path) -> Unit:
    settings: list[tuple[str, str, str]] = []
    section = ""
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: continued lines are not read here"
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, equals, value = line.partition("=")
        assert equals and section, f"{path.name}:{number}: not a setting: {raw!r}"
        settings.append((section, key.strip(), value.strip()))
    return Unit(path, tuple(settings))


def shipped_units() -> list[Unit]:
    units = [read_unit(path) for path in sorted(SYSTEMD.glob("*.service"))]
    assert units, f"no unit in {SYSTEMD}"
    return units
