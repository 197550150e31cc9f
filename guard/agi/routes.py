"""Guard's two FastAGI routes: ``authorize`` before an outbound call, ``settle`` when it ends.

The query string is the contract with the shipped dialplan (``dialplan/extensions_guard.conf``).
Every attacker-controlled value travels ``${URIENCODE()}``-d in it, never as a quoted AGI
argument (a hostile User-Agent splits those); a repeated key keeps its first value, so the
dialplan puts ``tenant`` and ``ext`` first.

``authorize?tenant=&ext=&to=&ip=&ua=&cid=&linkedid=``
    ``tenant`` (required): the tenant of the *authenticated* endpoint.
    ``ext`` (required): the extension (endpoint) placing the call, never the caller ID.
    ``to``: the dialed number; default ``agi_extension``.
    ``ip``: the phone's source address; default empty.
    ``ua``: its User-Agent; default empty.
    ``cid``: the caller ID number; default ``agi_callerid``.
    ``linkedid``: Asterisk's ``linkedid``; default empty.
    The call id is ``agi_uniqueid`` (required), the channel ``agi_channel``.
    Sets ``GUARD_TENANT``, ``GUARD_REASON``, ``GUARD_MAX_SECONDS`` (0 when denied),
    ``GUARD_DEST``, ``GUARD_CLASS``, for an interval reservation ``GUARD_MODE=interval`` and
    ``GUARD_CAP_SECONDS``, and, last, ``GUARD_RESULT`` (``ALLOW``/``DENY``).

``settle?tenant=&billsec=`` (also served as ``hangup``), from the channel's hangup handler
    ``tenant``: default the channel's ``GUARD_TENANT``.
    ``billsec``: answered seconds; default the channel's ``CDR(billsec)``, then ``ANSWEREDTIME``.
    Settles only a call that ``authorize`` let out with a reservation (``GUARD_RESULT`` is
    ``ALLOW`` and ``GUARD_REASON`` is neither ``emergency`` nor ``shadow``), then sets
    ``GUARD_SETTLED`` to the ledger's outcome, ``skipped`` or ``error``.

A handler here never lets an exception reach the server except a lost connection, and never
calls the engine for a request it cannot identify.
"""

from __future__ import annotations

import logging
import re
from typing import Protocol

from guard.agi import contract
from guard.agi.protocol import AGIProtocolError, AGIReply, get_full_variable, set_variable
from guard.agi.server import AGIConnectionError, AGIRequest, AGIServer
from guard.domain import CallAttempt, Decision, Reason, Result
from guard.errors import StorageError, ValidationError
from guard.ledger.types import SettleResult
from guard.logs import log_fields

log = logging.getLogger("guard.agi")

#: Longest billable call accepted from a hangup handler; more is clamped (and logged).
MAX_BILLSEC = 7 * 86_400
#: Values echoed into channel variables for information only are cut to this length.
ECHO_MAX_CHARS = 256
#: What the hangup handler reads from the channel, in one round trip.
SETTLE_EXPRESSION = (
    "${GUARD_TENANT}|${CDR(billsec)}|${ANSWEREDTIME}|${GUARD_RESULT}|${GUARD_REASON}"
)
_BILLSEC = re.compile(r"(-?)([0-9]+)")
SKIPPED = "skipped"
ERROR = "error"


class Authorizer(Protocol):
    """What the routes need from the engine (``guard.engine.Engine`` provides it)."""

    async def authorize(self, attempt: CallAttempt) -> Decision: ...

    async def settle(self, tenant: str, call_id: str, billsec: int) -> SettleResult: ...


def call_attempt(request: AGIRequest) -> CallAttempt:
    """The call attempt an ``authorize`` request describes; :class:`ValidationError` if unusable."""
    query, env = request.query, request.env
    tenant, extension = query.get("tenant", ""), query.get("ext", "")
    call_id = env.get("agi_uniqueid", "")
    for name, value in (("tenant", tenant), ("ext", extension), ("agi_uniqueid", call_id)):
        if not value:
            raise ValidationError(name, "missing")
    return CallAttempt(
        tenant=tenant,
        extension=extension,
        number=query.get("to") or env.get("agi_extension", ""),
        source_ip=query.get("ip", ""),
        user_agent=query.get("ua", ""),
        call_id=call_id,
        linked_id=query.get("linkedid", ""),
        caller_id=query.get("cid") or env.get("agi_callerid", ""),
        channel=env.get("agi_channel", ""),
    )


def parse_billsec(text: str) -> int:
    """Answered seconds from the dialplan: empty is 0; garbage or negative is 0 (logged)."""
    text = text.strip()
    if not text:
        return 0
    match = _BILLSEC.fullmatch(text)
    if match is None:
        log.warning("agi settle: billsec is not an integer", extra=log_fields(billsec=text[:40]))
        return 0
    sign, digits = match[1], match[2].lstrip("0") or "0"
    if sign and digits != "0":
        log.warning("agi settle: negative billsec", extra=log_fields(billsec=text[:40]))
        return 0
    if len(digits) > len(str(MAX_BILLSEC)) or int(digits) > MAX_BILLSEC:
        log.warning("agi settle: billsec clamped", extra=log_fields(billsec=text[:40]))
        return MAX_BILLSEC
    return int(digits)


def _refusal(call_id: str, reason: Reason) -> Decision:
    return Decision(Result.DENY, reason, 0, call_id)


def decision_commands(tenant: str, decision: Decision) -> list[str]:
    """The ``SET VARIABLE`` lines that render ``decision``; ``GUARD_RESULT`` is the last one."""
    allowed = decision.result is Result.ALLOW
    rate = decision.destination
    interval = (
        [
            set_variable(contract.MODE, contract.INTERVAL),
            set_variable(contract.CAP_SECONDS, decision.cap_seconds),
        ]
        if allowed and decision.cap_seconds > 0
        else []
    )
    return [
        set_variable(contract.TENANT, tenant[:ECHO_MAX_CHARS]),
        set_variable(contract.REASON, decision.reason.value),
        set_variable(contract.MAX_SECONDS, max(decision.max_seconds, 0) if allowed else 0),
        set_variable(contract.DEST, rate.name[:ECHO_MAX_CHARS] if rate else ""),
        set_variable(contract.CLASS, rate.dest_class.value if rate else ""),
        *interval,
        set_variable(contract.RESULT, decision.result.value),
    ]


def _check(replies: list[AGIReply], fields: dict[str, object]) -> None:
    refused = [reply.code for reply in replies if not reply.ok]
    if refused:
        log.warning("agi command refused by asterisk", extra=log_fields(**fields, codes=refused))


class GuardRoutes:
    """The ``authorize`` and ``settle`` handlers over an engine."""

    def __init__(self, engine: Authorizer) -> None:
        self._engine = engine

    def install(self, app: AGIServer) -> None:
        """Register ``authorize``, ``settle`` and its alias ``hangup`` on ``app``."""
        app.add_route("authorize", self.authorize)
        app.add_route("settle", self.settle)
        app.add_route("hangup", self.settle)

    async def authorize(self, request: AGIRequest) -> None:
        try:
            attempt = call_attempt(request)
        except ValidationError as exc:
            call_id = request.env.get("agi_uniqueid", "")
            log.warning(
                "agi authorize: bad request", extra=log_fields(call_id=call_id, field=exc.field)
            )
            await self._deliver(request, "", _refusal(call_id, Reason.BAD_REQUEST), None)
            return
        await self._deliver(request, attempt.tenant, await self._decide(attempt), attempt)

    async def _decide(self, attempt: CallAttempt) -> Decision:
        fields = log_fields(call_id=attempt.call_id, tenant=attempt.tenant)
        try:
            decision = await self._engine.authorize(attempt)
        except StorageError:
            log.warning("agi authorize: store unavailable", exc_info=True, extra=fields)
            return _refusal(attempt.call_id, Reason.STORE_UNAVAILABLE)
        except Exception:
            log.exception("agi authorize: engine failed", extra=fields)
            return _refusal(attempt.call_id, Reason.BAD_REQUEST)
        if decision.allowed and decision.max_seconds <= 0:
            log.error("agi authorize: allowed without a positive max_seconds", extra=fields)
        return decision

    async def _deliver(
        self, request: AGIRequest, tenant: str, decision: Decision, attempt: CallAttempt | None
    ) -> None:
        fields: dict[str, object] = {"call_id": decision.call_id, "tenant": tenant}
        *head, result = decision_commands(tenant, decision)
        try:
            replies = await request.send_commands(head)
        except (AGIConnectionError, AGIProtocolError):
            # GUARD_RESULT was never written, so the call cannot go out: free its budget and
            # slot now rather than leave them to the sweeper, which charges in full.
            if attempt is not None and decision.allowed and decision.reason is Reason.ALLOWED:
                await self._release(attempt, fields)
            raise
        try:
            replies.append(await request.send_command(result))
        except (AGIConnectionError, AGIProtocolError):
            # Asterisk may have set it: the reservation stays for the hangup handler (or sweeper).
            log.warning("agi authorize: GUARD_RESULT unconfirmed", extra=log_fields(**fields))
            raise
        _check(replies, fields)

    async def _release(self, attempt: CallAttempt, fields: dict[str, object]) -> None:
        try:
            await self._engine.settle(attempt.tenant, attempt.call_id, 0)
        except Exception:
            log.exception("agi authorize: reservation not released", extra=log_fields(**fields))
        else:
            log.info("agi authorize: undelivered reservation released", extra=log_fields(**fields))

    async def settle(self, request: AGIRequest) -> None:
        call_id = request.env.get("agi_uniqueid", "")
        fields: dict[str, object] = {"call_id": call_id}
        reply = await request.send_command(get_full_variable(SETTLE_EXPRESSION))
        # rsplit: only the tenant (first) could hold a "|"; the other four are numbers and codes.
        parts = (reply.data or "").rsplit("|", 4)
        if not call_id or not reply.ok or len(parts) != 5:
            log.warning("agi settle: no call id or channel unreadable", extra=log_fields(**fields))
            await self._mark(request, ERROR, fields)
            return
        var_tenant, cdr_billsec, answered, result, reason = parts
        if result != Result.ALLOW.value or reason in (Reason.EMERGENCY, Reason.SHADOW):
            await self._mark(request, SKIPPED, fields)
            return
        tenant = request.query.get("tenant") or var_tenant
        fields["tenant"] = tenant
        if not tenant:
            log.warning("agi settle: no tenant", extra=log_fields(**fields))
            await self._mark(request, ERROR, fields)
            return
        billsec = parse_billsec(request.query.get("billsec") or cdr_billsec or answered)
        try:
            settled = await self._engine.settle(tenant, call_id, billsec)
        except Exception:
            log.exception("agi settle: engine failed", extra=log_fields(**fields))
            await self._mark(request, ERROR, fields)
            return
        await self._mark(request, settled.outcome.value, fields)

    async def _mark(self, request: AGIRequest, outcome: str, fields: dict[str, object]) -> None:
        _check([await request.send_command(set_variable(contract.SETTLED, outcome))], fields)
