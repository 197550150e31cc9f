"""Small asyncio helpers shared by Guard's background loops and connections."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


def honour_cancellation() -> None:
    """Raise ``CancelledError`` if the current task is being cancelled.

    redis-py can swallow a cancellation that lands inside a command (seen with redis 8.1 on
    Python 3.11). A background loop that calls Redis must check this once per turn, or a
    shutdown would wait for it forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` unless it is done (or ``None``) and wait until it ends, whatever it
    raises: for a close that must not leave a connection attempt running behind it."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
