"""A bare FastAGI responder: the protocol's own cost, to measure Guard against.

It does what every FastAGI server must do and nothing more: reads the environment block, sends the
same commands Guard sends on the same route, one at a time, each after the previous reply (six
``SET VARIABLE`` for ``authorize``; ``GET FULL VARIABLE`` and one ``SET VARIABLE`` for ``settle``),
then closes. No parsing of the values, no policy, no Redis. It runs on uvloop when installed, like
``guard serve``, so that the two differ only in Guard's own work.

    python bench/bare_agi.py --listen 127.0.0.1:4599
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal

from guard.workers import run

AUTHORIZE = [
    b'SET VARIABLE GUARD_TENANT "t00000"\n',
    b'SET VARIABLE GUARD_REASON "allowed"\n',
    b'SET VARIABLE GUARD_MAX_SECONDS "3600"\n',
    b'SET VARIABLE GUARD_DEST "London"\n',
    b'SET VARIABLE GUARD_CLASS "local"\n',
    b'SET VARIABLE GUARD_RESULT "ALLOW"\n',
]
SETTLE = [
    b'GET FULL VARIABLE "${GUARD_TENANT}|${CDR(billsec)}|${ANSWEREDTIME}|${GUARD_RESULT}|'
    b'${GUARD_REASON}"\n',
    b'SET VARIABLE GUARD_SETTLED "settled"\n',
]
_SCRIPT = b"agi_network_script: "


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        commands = AUTHORIZE
        while (line := await reader.readuntil(b"\n")) != b"\n":
            if line.startswith(_SCRIPT) and not line[len(_SCRIPT) :].startswith(b"authorize"):
                commands = SETTLE
        for command in commands:
            writer.write(command)
            await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def until_signalled() -> None:
    """Return at SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(host: str, port: int) -> None:
    """Answer until SIGTERM or SIGINT."""
    async with await asyncio.start_server(_session, host, port, backlog=1024):
        await until_signalled()


def listen_address(description: str) -> tuple[str, int]:
    """``--listen HOST:PORT`` from the command line, by default ``$GUARD_AGI_LISTEN`` (as the
    load generator sets it for every server) or 127.0.0.1:4599."""
    parser = argparse.ArgumentParser(description=description)
    default = os.environ.get("GUARD_AGI_LISTEN", "127.0.0.1:4599")
    parser.add_argument("--listen", default=default, help="HOST:PORT")
    host, _, port = parser.parse_args().listen.rpartition(":")
    return host, int(port)


def main() -> None:
    run(serve(*listen_address(__doc__.splitlines()[0])))


if __name__ == "__main__":
    main()
