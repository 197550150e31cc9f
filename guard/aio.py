"""Small asyncio helpers shared by Guard's background loops."""

from __future__ import annotations

import asyncio


def honour_cancellation() -> None:
    """Raise ``CancelledError`` if the current task is being cancelled.

    redis-py can swallow a cancellation that lands inside a command (seen with redis 8.1 on
    Python 3.11). A background loop that calls Redis must check this once per turn, or a
    shutdown would wait for it forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
