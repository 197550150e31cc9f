"""Guard's own FastAGI server with routes that do no work: its share of a session's cost.

The same ``AGIServer`` as ``guard serve`` (allow-list, deadlines, environment and reply parsing,
command checks, session bookkeeping) with ``authorize`` and ``settle`` routes that send the bare
responder's commands (``bench/bare_agi.py``) and decide nothing: no policy, no Redis, no events.
Between the bare responder and ``guard serve`` in the benchmark's table, it splits Guard's
overhead into the FastAGI layer and the decision itself.

    python -m bench.agi_only --listen 127.0.0.1:4599    # default: $GUARD_AGI_LISTEN
"""

from __future__ import annotations

from bench.bare_agi import AUTHORIZE, SETTLE, listen_address, until_signalled
from guard.agi.server import AGIRequest, AGIServer
from guard.workers import run

_AUTHORIZE = [command.decode().rstrip("\n") for command in AUTHORIZE]
_SETTLE = [command.decode().rstrip("\n") for command in SETTLE]


async def authorize(request: AGIRequest) -> None:
    """As ``guard.agi.routes``: every variable but the result in one batch, then the result."""
    await request.send_commands(_AUTHORIZE[:-1])
    await request.send_command(_AUTHORIZE[-1])


async def settle(request: AGIRequest) -> None:
    for command in _SETTLE:
        await request.send_command(command)


async def serve(host: str, port: int) -> None:
    """Answer until SIGTERM or SIGINT, with ``guard serve``'s default limits."""
    app = AGIServer([(host, port)], allow=["127.0.0.0/8"], max_sessions=5000, backlog=1024)
    app.add_route("authorize", authorize)
    app.add_route("settle", settle)
    async with app:
        await until_signalled()


def main() -> None:
    run(serve(*listen_address(__doc__.splitlines()[0])))


if __name__ == "__main__":
    main()
