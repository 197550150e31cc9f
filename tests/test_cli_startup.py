"""What ``guard`` imports before doing anything: help and light commands load no heavy library.

Operators run ``guard`` at a prompt and from scripts, so its start-up matters. The root group
imports a command's module only when needed (``LazyGroup``), the command modules import SQLAlchemy,
Redis, aiohttp and the service inside the functions that use them, and ``memory://`` imports
fakeredis when first used. These tests run a fresh interpreter and check module names, not times.
If one fails, ``python -X importtime -c "import guard.cli.<module>"`` shows what pulled the
library in: import it inside the function that needs it (``TYPE_CHECKING`` for annotations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from guard.cli import COMMANDS

#: Libraries that only some commands need: none of them may load for help.
HEAVY = frozenset(
    {
        "aiohttp",
        "alembic",
        "fakeredis",
        "hiredis",
        "jinja2",
        "maxminddb",
        "prometheus_client",
        "psycopg2",
        "redis",
        "sqlalchemy",
    }
)

#: Runs ``guard`` with the given arguments in process, then prints what was imported as JSON.
_RUN_GUARD = """
import contextlib, io, json, sys
from guard.cli import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        cli(sys.argv[1:], prog_name="guard")
        code = 0
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "output": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def _imported(code: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={key: value for key, value in os.environ.items() if not key.startswith("GUARD_")},
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _heavy(modules: object) -> list[str]:
    """The heavy libraries among ``modules``."""
    assert isinstance(modules, list)
    return sorted({name.partition(".")[0] for name in modules} & HEAVY)


def _commands(modules: object) -> set[str]:
    assert isinstance(modules, list)
    return {name for name in modules if name.startswith("guard.cli.")}


_IMPORT_CLI = "import json, sys, guard.cli; print(json.dumps({'modules': sorted(sys.modules)}))"


def test_importing_the_cli_loads_no_command_and_no_heavy_library() -> None:
    found = _imported(_IMPORT_CLI)
    assert _heavy(found["modules"]) == []
    assert _commands(found["modules"]) == {"guard.cli.common"}


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),  # imports every command module, for the short help of each
        ("tenant", "--help"),
        ("ext", "raise", "--help"),
        ("rates", "import", "--help"),
        ("serve", "--help"),
        ("dashboard", "--help"),
        ("db", "--help"),
        ("config", "vars"),
    ],
    ids=" ".join,
)
def test_help_and_light_commands_import_no_heavy_library(args: tuple[str, ...]) -> None:
    found = _imported(_RUN_GUARD, *args)
    assert found["code"] == 0, found["output"]
    assert found["output"], "printed nothing"
    assert _heavy(found["modules"]) == [], f"guard {' '.join(args)} imported these"


def test_a_command_imports_only_its_own_module() -> None:
    found = _imported(_RUN_GUARD, "config", "vars")
    assert found["code"] == 0, found["output"]
    assert _commands(found["modules"]) == {"guard.cli.common", "guard.cli.config"}


def test_root_help_still_lists_every_command() -> None:
    found = _imported(_RUN_GUARD, "--help")
    assert found["code"] == 0
    output = found["output"]
    assert isinstance(output, str)
    section = output.partition("\nCommands:\n")[2]
    listed = [line.split()[0] for line in section.splitlines() if line.strip()]
    assert listed == sorted(COMMANDS), output


_BUILD_LEDGER = """
import json, sys
from guard.ledger import ledger_from_url
ledger_from_url(sys.argv[1])
print(json.dumps({"modules": sorted(sys.modules)}))
"""


def test_only_a_memory_store_imports_fakeredis() -> None:
    redis = _imported(_BUILD_LEDGER, "redis://127.0.0.1:6379/0")["modules"]
    assert "redis" in _heavy(redis) and "fakeredis" not in _heavy(redis)
    memory = _imported(_BUILD_LEDGER, "memory://")["modules"]
    assert "fakeredis" in _heavy(memory)
