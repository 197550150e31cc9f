"""Writes batches of events to the ``audit_events`` table, for the event bus (off the hot path)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, insert

from guard.config.models import AuditEvent
from guard.events import Event, audit_row


def audit_writer(engine: Engine) -> Callable[[list[Event]], None]:
    """A batch writer for ``EventBus.run_audit_writer``: one transaction a batch."""

    def write(batch: list[Event]) -> None:
        if not batch:
            return
        with engine.begin() as conn:
            conn.execute(insert(AuditEvent), [audit_row(event) for event in batch])

    return write
