"""Live calls: list them from the ledger, hang them up over ARI, and the alert rule that cuts
the calls of an extension locked by a User-Agent mismatch.

A live call is an open reservation in the ledger, whether it came by FastAGI or through the
Stasis app; its call id is the channel's ``uniqueid``, which is also its ARI channel id, and
Asterisk hangs up any channel by id (``DELETE /channels/{id}``), in Stasis or not. The hang-up
is reported by the dialplan's hang-up handler or by ``ChannelDestroyed`` like any other, so the
call is settled for what it used; a hang-up nobody reports is left to the sweeper. A tenant in
shadow mode (``guard.shadow``) also has calls in progress on the shadow counters:
``calls_in_progress`` lists them beside the live ones, marked, for the dashboard and the CLI
alike; those calls are judged only, and never hung up. Used by the CLI (``guard calls``,
``guard ext lock --hangup``), the dashboard and ``HangupOnMismatch``. The callers record who did
what (an audit row or an event): this module never writes SQL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

from guard.ari.client import AriError, ChannelNotFound
from guard.domain import Reason
from guard.errors import StorageError
from guard.events import Event, EventBus, EventKind
from guard.ledger.types import LiveCall
from guard.logs import log_fields

log = logging.getLogger("guard.calls")


class ChannelHangup(Protocol):
    """Hangs a channel up by its id (``AriClient`` provides it)."""

    async def hangup(self, channel_id: str, reason: str = "normal") -> None: ...


class LiveCallLedger(Protocol):
    """What hanging calls up needs from the ledger (``RedisLedger`` provides it)."""

    async def live_calls(self, tenant: str) -> list[LiveCall]: ...


@dataclass(frozen=True, slots=True)
class CallInProgress:
    """A call in progress and the counters that hold it: the live ones, or (``shadow``) the
    shadow counters of a tenant in shadow mode, whose calls Guard never hangs up."""

    call: LiveCall
    shadow: bool


@dataclass(frozen=True, slots=True)
class CallsInProgress:
    """What ``calls_in_progress`` read: the calls, oldest first, and the reads that failed."""

    calls: list[CallInProgress]
    errors: list[StorageError]


async def calls_in_progress(
    live: LiveCallLedger,
    shadow: LiveCallLedger | None,
    tenants: Iterable[tuple[str, bool]],
    *,
    slots: asyncio.Semaphore | None = None,
) -> CallsInProgress:
    """The calls in progress of ``tenants`` (name, whether it is in shadow mode), in one batch:
    each tenant's live calls, and the shadow calls of those in shadow mode only (``shadow``:
    the shadow counters, ``None`` to read none). ``slots`` bounds the reads under way.

    A read that fails with ``StorageError`` is reported in ``errors``, the others still count.
    """
    reads: list[tuple[bool, LiveCallLedger, str]] = []
    for name, in_shadow_mode in tenants:
        reads.append((False, live, name))
        if in_shadow_mode and shadow is not None:
            reads.append((True, shadow, name))

    async def read(ledger: LiveCallLedger, tenant: str) -> list[LiveCall]:
        async with slots or nullcontext():
            return await ledger.live_calls(tenant)

    found = await asyncio.gather(
        *(read(ledger, name) for _, ledger, name in reads), return_exceptions=True
    )
    listed: list[CallInProgress] = []
    errors: list[StorageError] = []
    for (is_shadow, _, _), calls in zip(reads, found, strict=True):
        if isinstance(calls, StorageError):
            errors.append(calls)
        elif isinstance(calls, BaseException):
            raise calls
        else:
            listed.extend(CallInProgress(call, is_shadow) for call in calls)
    listed.sort(key=lambda c: (c.call.started, c.call.tenant, c.call.call_id, c.shadow))
    return CallsInProgress(listed, errors)


class HangupIncomplete(AriError):
    """Some channels could not be hung up (ARI down, refused…); ``hung_up`` were."""

    def __init__(self, hung_up: Sequence[str], failed: Sequence[tuple[str, AriError]]) -> None:
        first = failed[0][1]
        super().__init__(
            f"{len(failed)} call(s) not hung up ({first}); {len(hung_up)} hung up",
            status=first.status,
            detail=first.detail,
        )
        self.hung_up = list(hung_up)
        self.failed = list(failed)


async def hangup_channels(
    ari: ChannelHangup, channel_ids: Sequence[str], *, reason: str = "normal"
) -> list[str]:
    """Hang every channel up at once; the ids of those that were live and are now hung up.

    A channel already gone is skipped. Raises ``HangupIncomplete`` (after trying them all) when
    any other hang-up failed.
    """
    results = await asyncio.gather(
        *(ari.hangup(channel_id, reason) for channel_id in channel_ids), return_exceptions=True
    )
    hung_up: list[str] = []
    failed: list[tuple[str, AriError]] = []
    for channel_id, result in zip(channel_ids, results, strict=True):
        if result is None:
            hung_up.append(channel_id)
        elif isinstance(result, ChannelNotFound):
            log.info("hangup: channel already gone", extra=log_fields(call_id=channel_id))
        elif isinstance(result, AriError):
            failed.append((channel_id, result))
        else:
            raise result
    if failed:
        raise HangupIncomplete(hung_up, failed)
    return hung_up


async def hangup_calls(
    ledger: LiveCallLedger,
    ari: ChannelHangup,
    tenant: str,
    extension: str | None = None,
    *,
    reason: str = "normal",
) -> list[str]:
    """Hang up the live calls of ``tenant`` (of one ``extension`` if given); returns the call
    ids hung up. See ``hangup_channels`` for the failures."""
    calls = await ledger.live_calls(tenant)
    targets = [call.call_id for call in calls if extension is None or call.extension == extension]
    hung_up = await hangup_channels(ari, targets, reason=reason)
    log.info(
        "hangup: live calls cut",
        extra=log_fields(tenant=tenant, ext=extension or "-", calls=len(hung_up)),
    )
    return hung_up


class HangupOnMismatch:
    """Event sink: when the ledger locks an extension because a different User-Agent called
    with its credentials (``locked`` / ``user_agent_mismatch``), hang up its live calls too.

    The lock itself is already in place (the ledger set it atomically with the refusal); the
    calls in progress may be the intruder's, so they are cut. Each cut call is reported as a
    ``call_cut`` event. ``emit`` must not block: the hang-ups run as tasks (``drain`` waits).
    """

    def __init__(self, ledger: LiveCallLedger, ari: ChannelHangup, events: EventBus) -> None:
        self.ledger = ledger
        self.ari = ari
        self.events = events
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, event: Event) -> None:
        if event.kind != EventKind.LOCKED or event.reason != Reason.USER_AGENT_MISMATCH:
            return
        task = asyncio.create_task(self._cut(event.tenant, event.extension))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the hang-ups under way."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _cut(self, tenant: str, extension: str) -> None:
        fields = log_fields(tenant=tenant, ext=extension)
        try:
            hung_up = await hangup_calls(self.ledger, self.ari, tenant, extension)
        except HangupIncomplete as exc:
            log.error(
                "mismatch: some live calls not hung up", extra=log_fields(**fields, error=str(exc))
            )
            hung_up = exc.hung_up
        except Exception:
            log.exception("mismatch: live calls not hung up", extra=fields)
            return
        for call_id in hung_up:
            self.events.emit(
                Event(
                    EventKind.CALL_CUT,
                    Reason.USER_AGENT_MISMATCH,
                    tenant,
                    extension,
                    "",
                    call_id,
                    {"by": "user_agent_mismatch"},
                )
            )
