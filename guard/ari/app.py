"""The Stasis application ``guard``: authorize each call that enters ``Stasis()``, settle it once.

ARI-mode twin of the FastAGI adapter. On ``StasisStart`` it builds the same ``CallAttempt`` from
the one Stasis argument (a URI query, see ``parse_stasis_start``), asks the engine, and renders
the ``Decision`` with REST calls: an allowed call is subscribed to (so its events keep coming
after it leaves Stasis), gets the FastAGI adapter's channel variables (``GUARD_RESULT``,
``GUARD_REASON``, ``GUARD_MAX_SECONDS``, ``GUARD_TENANT``, ``GUARD_DEST``, ``GUARD_CLASS``, and
``GUARD_MODE``/``GUARD_CAP_SECONDS`` for an interval reservation) and a ``TIMEOUT(absolute)``
backstop, and is continued; a refused call is hung up (``congestion``,
SIP 503) or continued with ``DENY`` for the dialplan to refuse, as configured. When an allowed
channel is destroyed, its answered seconds (``ANSWEREDTIME``, else Up → hang-up from the
events) are settled exactly once (the ledger's settle is idempotent besides). A lost event
(Guard restarted or disconnected mid-call) is covered by the ledger's sweeper, which charges an
expired reservation in full. This module never touches Redis or SQL itself and never lets a
malformed event or a vanished channel stop the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, StrEnum
from typing import Any, Final
from urllib.parse import unquote

from guard.agi import contract
from guard.agi.routes import Authorizer
from guard.ari.client import (
    HANGUP_REASONS,
    AriClient,
    AriConflict,
    AriError,
    AriEvent,
    ChannelNotFound,
)
from guard.domain import CallAttempt, Decision, Reason, Result
from guard.errors import ConfigurationError, StorageError, ValidationError
from guard.logs import log_fields

log = logging.getLogger("guard.ari")

#: Keys of the Stasis argument (``tenant=…&ext=…&to=…&ip=…&ua=…&linkedid=…``), named as in
#: the FastAGI query; ``linkedid`` is optional. The caller ID comes from the channel object.
REQUIRED_KEYS: Final = ("tenant", "ext", "to", "ip", "ua")
OPTIONAL_KEYS: Final = ("linkedid",)
#: Values echoed into channel variables for information only are cut to this length.
ECHO_MAX_CHARS = 256
_MAX_ARG_CHARS = 8192

_ARI_TIME = "%Y-%m-%dT%H:%M:%S.%f%z"


class RefuseMode(StrEnum):
    """How a refused call leaves Stasis."""

    #: ``DELETE /channels/{id}?reason=<refuse_reason>``: one REST call, the caller gets e.g. 503.
    HANGUP = "hangup"
    #: Set the decision's variables (``GUARD_RESULT=DENY``, ``GUARD_REASON``, …) and continue:
    #: the dialplan refuses (``Hangup(21)``, SIP 403, or whatever the operator wants).
    CONTINUE = "continue"


@dataclass(frozen=True, slots=True)
class AriAppSettings:
    """Knobs of the Stasis application (wired from ``guard.settings`` by ``guard serve``).

    ``ring_timeout`` must match the ring timeout of ``Dial()`` in the ARI dialplan: Guard sets
    ``TIMEOUT(absolute)`` to ``max_seconds + ring_timeout``. That timer starts when it is set (in
    Stasis, before the dial), so without the ring time a call that rang would lose budget. The
    exact cut at the budget is ``Dial(…,L(max_seconds000))``, which counts from the answer;
    ``TIMEOUT(absolute)`` is the backstop that holds even if that option is lost, at the cost of
    at most ``ring_timeout`` seconds beyond the budget for a call answered at once.
    """

    refuse_mode: RefuseMode = RefuseMode.HANGUP
    refuse_reason: str = "congestion"
    ring_timeout: int = 60
    max_handlers: int = 256
    #: Seconds past a call's deadline (max + ring) after which a call whose hang-up was never
    #: seen is forgotten here; the ledger's sweeper charges it.
    grace_seconds: int = 60
    #: Delays before retrying a settle the ledger could not take (Redis hiccup).
    settle_retry_delays: tuple[float, ...] = (0.5, 2.0)

    def __post_init__(self) -> None:
        if self.refuse_reason not in HANGUP_REASONS:
            raise ConfigurationError(
                f"ARI refuse reason must be one of {', '.join(sorted(HANGUP_REASONS))}"
            )
        if self.ring_timeout < 0 or self.grace_seconds < 0:
            raise ConfigurationError("ARI ring timeout and grace seconds must not be negative")
        if self.max_handlers < 1:
            raise ConfigurationError("ARI max handlers must be at least 1")


def parse_stasis_start(event: Mapping[str, Any]) -> CallAttempt:
    """The ``CallAttempt`` of a ``StasisStart`` event of the shipped ARI dialplan.

    The dialplan passes exactly ONE argument, a query string whose every value went through
    ``${URIENCODE()}``: URIENCODE leaves ``(``/``)`` alone, and Asterisk does not split arguments
    inside parentheses, so several URI-encoded arguments could still be merged by a hostile
    User-Agent; a single argument cannot be split nor merged, and costs no REST round trip.
    ``call_id`` is the channel id (= the AGI ``uniqueid``); the caller ID and channel name come
    from the event's channel object. Raises ``ValidationError`` when the contract is not met
    (as the FastAGI adapter, an empty ``tenant`` or ``ext`` is not sent to the engine).
    """
    channel = event.get("channel")
    if not isinstance(channel, Mapping) or not isinstance(channel.get("id"), str):
        raise ValidationError("channel", "StasisStart without a channel id")
    args = event.get("args")
    if not isinstance(args, list) or len(args) != 1 or not isinstance(args[0], str):
        raise ValidationError("args", "expected exactly one Stasis argument (tenant=…&ext=…&…)")
    fields = parse_stasis_arg(args[0])
    for key in ("tenant", "ext"):
        if not fields[key]:
            raise ValidationError(key, "missing")
    caller = channel.get("caller")
    caller_id = caller.get("number") if isinstance(caller, Mapping) else ""
    name = channel.get("name")
    return CallAttempt(
        tenant=fields["tenant"],
        extension=fields["ext"],
        number=fields["to"],
        source_ip=fields["ip"],
        user_agent=fields["ua"],
        call_id=channel["id"],
        linked_id=fields.get("linkedid", ""),
        caller_id=caller_id if isinstance(caller_id, str) else "",
        channel=name if isinstance(name, str) else "",
    )


def parse_stasis_arg(arg: str) -> dict[str, str]:
    """Decode ``key=<URIENCODEd value>&…`` exactly as URIENCODE encoded it (``+`` stays ``+``)."""
    if len(arg) > _MAX_ARG_CHARS:
        raise ValidationError("args", "Stasis argument too long")
    fields: dict[str, str] = {}
    for part in arg.split("&"):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValidationError("args", "Stasis argument is not a key=value list")
        if key in fields:
            raise ValidationError(key, "given twice")
        if key in REQUIRED_KEYS or key in OPTIONAL_KEYS:
            fields[key] = unquote(value, errors="replace")
    missing = [key for key in REQUIRED_KEYS if key not in fields]
    if missing:
        raise ValidationError("args", f"missing {', '.join(missing)}")
    return fields


class _Phase(Enum):
    DECIDING = "deciding"
    LIVE = "live"


@dataclass(slots=True, eq=False)
class _Call:
    """What the app remembers of one channel between its StasisStart and its settle."""

    channel_id: str
    generation: int
    phase: _Phase = _Phase.DECIDING
    tenant: str = ""
    #: The ledger holds a reservation for this call: it must be settled.
    reserved: bool = False
    destroyed: bool = False
    #: ``ANSWEREDTIME`` of each ``Dial()`` (reset to "" when a Dial starts), in order.
    answered: list[int | None] = field(default_factory=list)
    up_at: datetime | None = None
    hangup_at: datetime | None = None
    destroyed_at: datetime | None = None
    expires: float = math.inf

    def billsec(self, generation: int) -> int | None:
        """Answered seconds, or ``None`` when events may have been lost and only the sweeper
        can decide. ``ANSWEREDTIME`` is what Asterisk itself bills (CDR ``billsec`` agrees in
        the recorded session: 2 s, while Up → destroyed spans 3.3 s of which 0.3 s is the
        hang-up handler); Up → first hang-up request is the fallback when no Dial reported it."""
        seen = [seconds for seconds in self.answered if seconds is not None]
        if seen:
            return sum(seen)
        if generation != self.generation:
            return None
        if self.up_at is None:
            return 0
        end = self.hangup_at or self.destroyed_at
        if end is None:
            return None
        return max(0, int((end - self.up_at).total_seconds()))

    def note_answered_time(self, value: object) -> None:
        if value == "":
            self.answered.append(None)
        elif isinstance(value, str) and value.isascii() and value.isdigit():
            if self.answered:
                self.answered[-1] = int(value)
            else:
                self.answered.append(int(value))


class GuardStasisApp:
    """Handles the events of the Stasis app ``guard``; ``run()`` serves until cancelled."""

    def __init__(
        self,
        client: AriClient,
        engine: Authorizer,
        settings: AriAppSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.engine = engine
        self.settings = settings or AriAppSettings()
        self.clock = clock
        self._calls: dict[str, _Call] = {}
        self._next_prune = 0.0

    @property
    def tracked_calls(self) -> int:
        """Channels being decided or allowed and not yet settled (a gauge for metrics)."""
        return len(self._calls)

    async def run(self) -> None:
        """Serve the event stream (reconnecting) until cancelled or the credentials are refused."""
        await self.client.run(self.handle_event, max_concurrent=self.settings.max_handlers)

    async def hangup_channel(self, channel_id: str, reason: str = "normal") -> bool:
        """Hang up a live call (admin "live calls" commands). ``False`` when it is already gone.

        A tracked call is then settled from its ``ChannelDestroyed`` like any other."""
        try:
            await self.client.hangup(channel_id, reason)
        except ChannelNotFound:
            return False
        return True

    # ---- event routing (synchronous, in arrival order) ---------------------------------------

    def handle_event(self, event: AriEvent) -> Awaitable[None] | None:
        """Bookkeeping for one event, in order; returns the slow work (REST, engine), if any.

        Events of channels the app does not track, and event types it does not use, are ignored.
        """
        channel = event.get("channel")
        if not isinstance(channel, dict):
            return None
        channel_id = channel.get("id")
        if not isinstance(channel_id, str) or not channel_id:
            return None
        kind = event.get("type")
        if kind == "StasisStart":
            return self._on_stasis_start(event, channel_id, channel)
        call = self._calls.get(channel_id)
        if call is None:
            return None
        if kind == "ChannelVarset" and event.get("variable") == "ANSWEREDTIME":
            call.note_answered_time(event.get("value"))
        elif kind == "ChannelStateChange" and channel.get("state") == "Up":
            call.up_at, call.hangup_at = _timestamp(event), None
        elif kind == "ChannelHangupRequest" and call.up_at is not None and call.hangup_at is None:
            call.hangup_at = _timestamp(event)
        elif kind == "ChannelDestroyed":
            call.destroyed, call.destroyed_at = True, _timestamp(event)
            if call.phase is _Phase.LIVE:
                billsec = self._take(call, continued=True)
                if billsec is not None:
                    return self._settle(call.tenant, channel_id, billsec)
        return None

    def _on_stasis_start(
        self, event: AriEvent, channel_id: str, channel: Mapping[str, Any]
    ) -> Awaitable[None]:
        self._prune()
        call = self._calls.get(channel_id)
        if call is None:
            call = _Call(channel_id, self.client.generation)
            if channel.get("state") == "Up":
                call.up_at = _timestamp(event)
            self._calls[channel_id] = call
        else:
            # The dialplan sent the channel to Stasis again: keep what it already used.
            call.phase = _Phase.DECIDING
        return self._admit(call, event)

    # ---- the work ------------------------------------------------------------------------------

    async def _admit(self, call: _Call, event: AriEvent) -> None:
        channel_id = call.channel_id
        try:
            attempt = parse_stasis_start(event)
        except ValidationError as exc:
            log.warning(
                "ari authorize: bad request",
                extra=log_fields(call_id=channel_id, field=exc.field, error=str(exc)),
            )
            await self._refuse(call, "", _refusal(channel_id, Reason.BAD_REQUEST))
            return
        decision = await self._decide(attempt)
        decided_at = self.clock()  # the ledger's reservation runs from about now
        if not decision.allowed:
            await self._refuse(call, attempt.tenant, decision)
            return
        if decision.reason is Reason.ALLOWED:
            call.reserved, call.tenant = True, attempt.tenant
        elif not call.reserved:
            self._forget(call)  # emergency or fail-open: nothing in the ledger to settle
        if call.destroyed:
            await self._finish(call, continued=False)
            return
        try:
            await self._allow(channel_id, attempt.tenant, decision)
        except (ChannelNotFound, AriConflict) as exc:
            log.info(
                "ari authorize: caller left before the allowed call went on",
                extra=log_fields(call_id=channel_id, error=str(exc)),
            )
            await self._finish(call, continued=False)
            return
        except AriError as exc:
            log.error(
                "ari authorize: allowed call not handed back to the dialplan; hanging it up",
                extra=log_fields(call_id=channel_id, error=str(exc)),
            )
            await self._hangup_quietly(channel_id, self.settings.refuse_reason)
        call.phase = _Phase.LIVE
        call.expires = (
            decided_at + _limit(decision) + self.settings.ring_timeout + self.settings.grace_seconds
        )
        if call.destroyed:
            await self._finish(call, continued=True)

    async def _decide(self, attempt: CallAttempt) -> Decision:
        """The engine's decision; a failing engine refuses the call (fail closed), with the
        same reasons as the FastAGI adapter."""
        fields = log_fields(call_id=attempt.call_id, tenant=attempt.tenant)
        try:
            return await self.engine.authorize(attempt)
        except StorageError:
            log.warning("ari authorize: store unavailable", exc_info=True, extra=fields)
            return _refusal(attempt.call_id, Reason.STORE_UNAVAILABLE)
        except Exception:
            log.exception("ari authorize: engine failed", extra=fields)
            return _refusal(attempt.call_id, Reason.BAD_REQUEST)

    async def _allow(self, channel_id: str, tenant: str, decision: Decision) -> None:
        """Subscribe, set the outputs and the backstop timeout (concurrently), then continue.

        Nothing is continued unless every call succeeded, so the order of the variables does
        not matter here (the FastAGI adapter must write ``GUARD_RESULT`` last; ARI need not).
        An interval call's backstop is its cap: its slices are cut by ``guard.interval``."""
        backstop = _limit(decision) + self.settings.ring_timeout
        await _all(
            self.client.subscribe(self.client.app, f"channel:{channel_id}"),
            *self._set_all(channel_id, decision_variables(tenant, decision)),
            self.client.set_variable(channel_id, "TIMEOUT(absolute)", str(backstop)),
        )
        await self.client.continue_in_dialplan(channel_id)

    async def _refuse(self, call: _Call, tenant: str, decision: Decision) -> None:
        """Refuse as configured. A channel that re-entered Stasis with a reservation from its
        first pass is settled for what it used then."""
        channel_id = call.channel_id
        await self._finish(call, continued=True)
        try:
            if self.settings.refuse_mode is RefuseMode.HANGUP:
                await self.client.hangup(channel_id, self.settings.refuse_reason)
                return
            await _all(*self._set_all(channel_id, decision_variables(tenant, decision)))
            await self.client.continue_in_dialplan(channel_id)
        except (ChannelNotFound, AriConflict):
            log.debug("ari refuse: caller already gone", extra=log_fields(call_id=channel_id))
        except AriError as exc:
            log.error(
                "ari refuse: REST failed; hanging the call up",
                extra=log_fields(call_id=channel_id, error=str(exc)),
            )
            await self._hangup_quietly(channel_id, self.settings.refuse_reason)

    def _set_all(self, channel_id: str, variables: Mapping[str, str]) -> list[Awaitable[None]]:
        return [self.client.set_variable(channel_id, k, v) for k, v in variables.items()]

    async def _hangup_quietly(self, channel_id: str, reason: str) -> None:
        """Last resort after a failed REST exchange; the dialplan's own timeout is the next one."""
        try:
            await self.client.hangup(channel_id, reason)
        except ChannelNotFound:
            log.debug("ari hangup: channel already gone", extra=log_fields(call_id=channel_id))
        except AriError as exc:
            log.error(
                "ari hangup: failed too; the dialplan's TIMEOUT(absolute) will end the call",
                extra=log_fields(call_id=channel_id, error=str(exc)),
            )

    async def _finish(self, call: _Call, *, continued: bool) -> None:
        billsec = self._take(call, continued=continued)
        if billsec is not None:
            await self._settle(call.tenant, call.channel_id, billsec)

    def _take(self, call: _Call, *, continued: bool) -> int | None:
        """Stop tracking ``call``; its billsec if it must be settled, else ``None``. Only the
        first call for a given ``_Call`` can return a number: that is the exactly-once point.

        ``continued`` is false when the call certainly never reached ``Dial()`` (billsec 0)."""
        if not self._forget(call) or not call.reserved:
            return None
        billsec = call.billsec(self.client.generation) if continued else 0
        if billsec is None:
            log.warning(
                "ari settle: answered seconds unknown (events missed while disconnected); "
                "the ledger's sweeper will charge the reservation",
                extra=log_fields(call_id=call.channel_id, tenant=call.tenant),
            )
        return billsec

    def _forget(self, call: _Call) -> bool:
        if self._calls.get(call.channel_id) is not call:
            return False
        del self._calls[call.channel_id]
        return True

    async def _settle(self, tenant: str, channel_id: str, billsec: int) -> None:
        """``engine.settle`` (idempotent in the ledger), retried briefly if the store hiccups."""
        delays = self.settings.settle_retry_delays
        for attempt in range(len(delays) + 1):
            try:
                result = await self.engine.settle(tenant, channel_id, billsec)
            except StorageError as exc:
                if attempt == len(delays):
                    log.error(
                        "ari settle: failed; the ledger's sweeper will charge the reservation",
                        extra=log_fields(call_id=channel_id, tenant=tenant, error=str(exc)),
                    )
                    return
                await asyncio.sleep(delays[attempt])
                continue
            log.info(
                "ari settle: call settled",
                extra=log_fields(
                    call_id=channel_id,
                    tenant=tenant,
                    billsec=billsec,
                    outcome=result.outcome.value,
                    cost=result.cost,
                ),
            )
            return

    def _prune(self) -> None:
        """Forget live calls whose hang-up never came (lost events), at most once a minute."""
        now = self.clock()
        if now < self._next_prune:
            return
        self._next_prune = now + 60.0
        for call in [c for c in self._calls.values() if c.expires < now]:
            self._forget(call)
            log.warning(
                "ari settle: no hang-up seen by the deadline; the ledger's sweeper settles it",
                extra=log_fields(call_id=call.channel_id, tenant=call.tenant),
            )


def decision_variables(tenant: str, decision: Decision) -> dict[str, str]:
    """The channel variables that render ``decision``: the same names and values the FastAGI
    adapter sets (``guard.agi.contract``), so both dialplans read one contract."""
    allowed = decision.result is Result.ALLOW
    rate = decision.destination
    variables = {
        contract.TENANT: tenant[:ECHO_MAX_CHARS],
        contract.REASON: decision.reason.value,
        contract.MAX_SECONDS: str(max(decision.max_seconds, 0) if allowed else 0),
        contract.DEST: rate.name[:ECHO_MAX_CHARS] if rate else "",
        contract.CLASS: rate.dest_class.value if rate else "",
        contract.RESULT: decision.result.value,
    }
    if allowed and decision.cap_seconds > 0:
        variables[contract.MODE] = contract.INTERVAL
        variables[contract.CAP_SECONDS] = str(decision.cap_seconds)
    return variables


def _refusal(call_id: str, reason: Reason) -> Decision:
    return Decision(Result.DENY, reason, 0, call_id)


def _limit(decision: Decision) -> int:
    """The longest the allowed call may last: its cap in interval mode, else its max."""
    return decision.cap_seconds or decision.max_seconds


async def _all(*calls: Awaitable[Any]) -> None:
    """Await every REST call, then raise the first failure: nothing is left half-done behind."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _timestamp(event: Mapping[str, Any]) -> datetime | None:
    """ARI's ``2026-11-21T20:15:40.208+0000``; ``None`` when absent or malformed."""
    value = event.get("timestamp")
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, _ARI_TIME)
    except ValueError:
        return None
