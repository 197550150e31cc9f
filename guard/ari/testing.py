"""A local stand-in for Asterisk's ARI, for tests and the benchmark: no Asterisk needed.

``AriStandIn`` serves the events WebSocket and the REST calls Guard uses on 127.0.0.1, and
behaves like the Asterisk 16.0.1 of ``shared/asterisk/ari-session.jsonl``: the same event shapes,
fields and timestamp format (``2026-11-21T20:15:40.208+0000``), the same status codes and bodies
(unknown channel 404 ``{"message":"Channel not found"}``, unset variable 404 ``{"message":
"Provided variable was not found"}``, ``reason=rejected`` 400 ``{"message":"Invalid reason for
hangup provided"}``, a channel outside Stasis 409, a missing event source 422, bad credentials
401), ``StasisEnd`` after ``continue``, and events of a channel delivered only while it is in
Stasis or subscribed to. Every REST call is recorded. A test starts calls (from the exact
``Stasis()`` application data the dialplan would produce, split the way Asterisk splits it),
pushes events (recorded ones or built ones), and can drop the WebSocket to test reconnection.
Test tooling only: never imported by the running service.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from aiohttp import web

from guard.ari.client import HANGUP_REASONS, basic_authorization

ASTERISK_ID: Final = "02:fc:00:00:00:01"

#: ``DELETE /channels/{id}?reason=`` → hang-up cause and its text in ``ChannelDestroyed``.
#: ``congestion`` is as recorded (34); the others are Asterisk's cause table.
HANGUP_CAUSES: Final[Mapping[str, tuple[int, str]]] = {
    "normal": (16, "Normal Clearing"),
    "busy": (17, "User busy"),
    "congestion": (34, "Circuit/channel congestion"),
    "no_answer": (19, "User alerting, no answer"),
    "answered_elsewhere": (26, "Answered elsewhere"),
}
_CAUSE_TEXT: Final = {cause: text for cause, text in HANGUP_CAUSES.values()}
#: ``ChannelHangupRequest.cause`` for an ARI hang-up is the soft-hangup flag (EXPLICIT = 32),
#: as recorded; a caller's BYE gives the hang-up cause itself.
SOFTHANGUP_EXPLICIT: Final = 32

_URI_MARK = "-_.!~*'()"


def uriencode(value: str) -> str:
    """Asterisk's ``${URIENCODE()}``: every byte but alphanumerics and ``-_.!~*'()`` as ``%XX``."""
    return quote(value, safe=_URI_MARK)


def separate_app_args(data: str) -> list[str]:
    """Split application data on commas the way Asterisk's ``AST_STANDARD_APP_ARGS`` does:
    no split inside ``(…)``, ``[…]`` or ``"…"``; quotes and backslashes are removed."""
    args: list[str] = []
    current: list[str] = []
    paren = bracket = 0
    quoted = False
    chars = iter(data)
    for char in chars:
        if char == "(":
            paren += 1
        elif char == ")" and paren:
            paren -= 1
        elif char == "[":
            bracket += 1
        elif char == "]" and bracket:
            bracket -= 1
        elif char == '"':
            quoted = not quoted
            continue
        elif char == "\\":
            current.append(next(chars, ""))
            continue
        elif char == "," and not (paren or bracket or quoted):
            args.append("".join(current))
            current = []
            continue
        current.append(char)
    args.append("".join(current))
    return args


def dialplan_stasis_data(
    *,
    tenant: str,
    ext: str,
    number: str,
    source_ip: str,
    user_agent: str,
    linked_id: str = "",
    app: str = "guard",
) -> str:
    """The application data ``Stasis()`` receives from ``dialplan/extensions_guard_ari.conf``
    once Asterisk has substituted the variables (each value through ``URIENCODE``)."""
    query = "&".join(
        f"{key}={uriencode(value)}"
        for key, value in (
            ("tenant", tenant),
            ("ext", ext),
            ("to", number),
            ("ip", source_ip),
            ("ua", user_agent),
            ("linkedid", linked_id),
        )
    )
    return f"{app},{query}"


def ari_timestamp(when: datetime | None = None) -> str:
    """``2026-11-21T20:15:40.208+0000`` (milliseconds, numeric UTC offset), as ARI writes it."""
    when = (when or datetime.now(UTC)).astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}" + "+0000"


@dataclass(frozen=True, slots=True)
class RestCall:
    """One REST request the stand-in answered."""

    method: str
    path: str
    params: dict[str, str]
    status: int
    body: str
    authorized: bool


@dataclass(slots=True)
class StandInChannel:
    """A channel as the stand-in knows it; ``json()`` is ARI's channel object."""

    id: str
    name: str
    caller_number: str
    exten: str
    context: str = "from-internal"
    priority: int = 23
    state: str = "Ring"
    creationtime: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    in_stasis: bool = False
    subscribed: bool = False

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "caller": {"name": self.caller_number, "number": self.caller_number},
            "connected": {"name": "", "number": ""},
            "accountcode": "",
            "dialplan": {"context": self.context, "exten": self.exten, "priority": self.priority},
            "creationtime": self.creationtime,
            "language": "en",
        }


def _json_response(status: int, body: object | None) -> web.Response:
    if body is None:
        return web.Response(status=status)
    return web.Response(
        status=status, text=json.dumps(body, separators=(",", ":")), content_type="application/json"
    )


def _error(status: int, message: str) -> web.Response:
    return _json_response(status, {"message": message})


class AriStandIn:
    """A local ARI for the Stasis application ``app``, answering like Asterisk 16.0.1.

    ``async with AriStandIn(username="guard", password="…") as ari:`` then point an
    ``AriClient`` at ``ari.base_url``.
    """

    def __init__(self, *, username: str, password: str, app: str = "guard") -> None:
        self.app = app
        self.channels: dict[str, StandInChannel] = {}
        self.calls: list[RestCall] = []
        #: Query parameters of every events WebSocket request, accepted or not.
        self.socket_requests: list[dict[str, str]] = []
        #: Event WebSocket connections accepted so far.
        self.connections = 0
        #: Events sent to the application, in order (dropped if no socket is open, as in Asterisk).
        self.sent: list[dict[str, Any]] = []
        self._authorization = basic_authorization(username, password)
        self._sockets: set[web.WebSocketResponse] = set()
        #: Events to send, in order; a ``str`` is a raw frame (``send_raw``).
        self._outbox: asyncio.Queue[dict[str, Any] | str] = asyncio.Queue()
        self._ids = itertools.count(51)
        self._epoch = int(time.time())
        self._runner: web.AppRunner | None = None
        self._sender: asyncio.Task[None] | None = None
        self.base_url = ""
        #: Seconds ``wait_for`` waits before raising ``TimeoutError``.
        self.wait_limit = 5.0

    async def __aenter__(self) -> AriStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/ari/events", self._events)
        app.router.add_get("/ari/channels", self._list_channels)
        app.router.add_get("/ari/channels/{id}/variable", self._get_variable)
        app.router.add_post("/ari/channels/{id}/variable", self._set_variable)
        app.router.add_post("/ari/channels/{id}/continue", self._continue)
        app.router.add_delete("/ari/channels/{id}", self._hangup)
        app.router.add_post("/ari/applications/{app}/subscription", self._subscribe)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound_port}/ari"
        self._sender = asyncio.create_task(self._send_forever())

    async def close(self) -> None:
        await self.drop_sockets()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- what a test does ---------------------------------------------------------------------

    def add_channel(
        self,
        *,
        channel_id: str | None = None,
        name: str | None = None,
        caller: str = "1001",
        exten: str = "00441234567",
        variables: Mapping[str, str] | None = None,
        when: datetime | None = None,
    ) -> StandInChannel:
        """A channel that exists (e.g. ringing in the dialplan) but is not in Stasis yet."""
        number = next(self._ids)
        channel = StandInChannel(
            id=channel_id or f"{self._epoch}.{number}",
            name=name or f"SIP/{caller}-{number:08x}",
            caller_number=caller,
            exten=exten,
            creationtime=ari_timestamp(when),
            variables=dict(variables or {}),
        )
        self.channels[channel.id] = channel
        return channel

    def stasis(
        self, app_data: str, *, when: datetime | None = None, **channel: Any
    ) -> StandInChannel:
        """``Stasis(<app_data>)`` on a new channel: split as Asterisk does, then StasisStart."""
        app, *args = separate_app_args(app_data)
        if app != self.app:
            raise ValueError(f"Stasis app {app!r} is not {self.app!r}")
        created = self.add_channel(when=when, **channel)
        self.enter_stasis(created, args, when=when)
        return created

    def enter_stasis(
        self, channel: StandInChannel, args: list[str], *, when: datetime | None = None
    ) -> None:
        channel.in_stasis = True
        self.emit("StasisStart", channel, when=when, args=args)

    def answer(self, channel_id: str, *, when: datetime | None = None) -> None:
        """The call was answered: ``ChannelStateChange`` to ``Up``."""
        channel = self.channels[channel_id]
        channel.state = "Up"
        self.emit("ChannelStateChange", channel, when=when)

    def set_by_dialplan(
        self, channel_id: str, variable: str, value: str, *, when: datetime | None = None
    ) -> None:
        """The dialplan (e.g. ``Dial()`` with ``ANSWEREDTIME``) set a variable."""
        channel = self.channels[channel_id]
        channel.variables[variable] = value
        self.emit("ChannelVarset", channel, when=when, variable=variable, value=value)

    def caller_hangup(
        self, channel_id: str, *, cause: int = 16, when: datetime | None = None
    ) -> None:
        """The caller hung up: ``ChannelHangupRequest``, ``StasisEnd`` if in Stasis, destroyed."""
        channel = self.channels[channel_id]
        self.emit("ChannelHangupRequest", channel, when=when, cause=cause)
        self._destroy(channel, cause, _CAUSE_TEXT.get(cause, ""), when)

    def push(self, event: Mapping[str, Any]) -> None:
        """Send a ready-made event (e.g. a recorded one), keeping the channel table in step:
        ``StasisStart`` puts the channel in Stasis, ``StasisEnd`` takes it out,
        ``ChannelDestroyed`` removes it. Events of a known channel reach the app only while it
        is in Stasis or subscribed to, as in Asterisk; any other event is sent as it is."""
        payload = dict(event)
        kind = payload.get("type")
        snapshot = payload.get("channel")
        channel = None
        if isinstance(snapshot, Mapping) and isinstance(snapshot.get("id"), str):
            channel = self.channels.get(snapshot["id"])
            if kind == "StasisStart" and channel is None:
                channel = StandInChannel(
                    id=snapshot["id"],
                    name=str(snapshot.get("name", "")),
                    caller_number=str(snapshot.get("caller", {}).get("number", "")),
                    exten=str(snapshot.get("dialplan", {}).get("exten", "")),
                    creationtime=str(snapshot.get("creationtime", "")),
                )
                self.channels[channel.id] = channel
            if channel is not None:
                channel.state = str(snapshot.get("state", channel.state))
                channel.in_stasis = channel.in_stasis or kind == "StasisStart"
        if channel is not None and not self._deliverable(channel):
            return
        if channel is not None and kind == "StasisEnd":
            channel.in_stasis = False
        if channel is not None and kind == "ChannelDestroyed":
            del self.channels[channel.id]
        self._outbox.put_nowait(payload)

    def send_raw(self, text: str) -> None:
        """Send any text frame (malformed events) to every connected application."""
        self._outbox.put_nowait(text)

    async def drop_sockets(self) -> None:
        """Close every events WebSocket from the server side (Asterisk restart, network cut)."""
        for socket in list(self._sockets):
            await socket.close(code=aiohttp.WSCloseCode.GOING_AWAY)
        self._sockets.clear()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Poll ``predicate`` until true; ``TimeoutError`` after ``wait_limit`` seconds.

        Polling, not an ``asyncio.Event``: predicates also look at state outside the stand-in
        (a stub engine's settlements, the app's tracked calls)."""
        async with asyncio.timeout(self.wait_limit):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.005)

    async def wait_connected(self, connections: int = 1) -> None:
        """Wait until ``connections`` sockets were accepted and one is open."""
        await self.wait_for(lambda: self.connections >= connections and bool(self._sockets))

    def calls_to(self, channel_id: str) -> list[RestCall]:
        """The REST calls that named ``channel_id`` (in the path or as an event source)."""
        return [
            call
            for call in self.calls
            if f"/channels/{channel_id}" in call.path
            or call.params.get("eventSource") == f"channel:{channel_id}"
        ]

    # ---- events ---------------------------------------------------------------------------------

    def emit(
        self, kind: str, channel: StandInChannel, *, when: datetime | None = None, **fields: Any
    ) -> None:
        """Queue one channel event shaped like the recorded ones, if the app may see it."""
        if not self._deliverable(channel):
            return
        event: dict[str, Any] = {**fields, "type": kind, "timestamp": ari_timestamp(when)}
        event["channel"] = channel.json()
        event["asterisk_id"] = ASTERISK_ID
        event["application"] = self.app
        self._outbox.put_nowait(event)

    def _deliverable(self, channel: StandInChannel) -> bool:
        return channel.in_stasis or channel.subscribed

    def _destroy(
        self, channel: StandInChannel, cause: int, cause_txt: str, when: datetime | None
    ) -> None:
        if channel.in_stasis:
            self.emit("StasisEnd", channel, when=when)
            channel.in_stasis = False
            self.emit("ChannelVarset", channel, when=when, variable="STASISSTATUS", value="SUCCESS")
        self.emit("ChannelDestroyed", channel, when=when, cause=cause, cause_txt=cause_txt)
        self.channels.pop(channel.id, None)

    async def _send_forever(self) -> None:
        while True:
            event = await self._outbox.get()
            if isinstance(event, str):
                text = event
            else:
                text = json.dumps(event)
                self.sent.append(event)
            for socket in list(self._sockets):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await socket.send_str(text)

    # ---- HTTP -----------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == self._authorization

    def _unauthorized(self) -> web.Response:
        response = _error(401, "Authentication required")
        response.headers["WWW-Authenticate"] = 'Basic realm="Asterisk REST Interface"'
        return response

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self.socket_requests.append(dict(request.query))
        if not self._authorized(request):
            return self._unauthorized()
        if request.query.get("app") != self.app:
            return _error(400, "HTTP request is missing param: [app]")
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self.connections += 1
        self._sockets.add(socket)
        try:
            async for _ in socket:
                pass
        finally:
            self._sockets.discard(socket)
        return socket

    def _record(self, request: web.Request, response: web.Response) -> web.Response:
        self.calls.append(
            RestCall(
                method=request.method,
                path=request.path.removeprefix("/ari"),
                params=dict(request.query),
                status=response.status,
                body=response.text or "",
                authorized=self._authorized(request),
            )
        )
        return response

    def _answer(self, request: web.Request, handle: Callable[[], web.Response]) -> web.Response:
        if not self._authorized(request):
            return self._record(request, self._unauthorized())
        return self._record(request, handle())

    def _control(self, channel_id: str) -> StandInChannel | web.Response:
        """Asterisk's ``find_control``: 404 if the channel is gone, 409 if not in Stasis."""
        channel = self.channels.get(channel_id)
        if channel is None:
            return _error(404, "Channel not found")
        if not channel.in_stasis:
            return _error(409, "Channel not in Stasis application")
        return channel

    async def _list_channels(self, request: web.Request) -> web.Response:
        return self._answer(
            request, lambda: _json_response(200, [c.json() for c in self.channels.values()])
        )

    async def _get_variable(self, request: web.Request) -> web.Response:
        def handle() -> web.Response:
            name = request.query.get("variable", "")
            if not name:
                return _error(400, "Variable name is required")
            channel = self.channels.get(request.match_info["id"])
            if channel is None:
                return _error(404, "Provided channel was not found")
            if name not in channel.variables:
                if name.endswith(")"):
                    return _error(500, "Unable to read provided function")
                return _error(404, "Provided variable was not found")
            return _json_response(200, {"value": channel.variables[name]})

        return self._answer(request, handle)

    async def _set_variable(self, request: web.Request) -> web.Response:
        def handle() -> web.Response:
            name = request.query.get("variable", "")
            if not name:
                return _error(400, "Variable name is required")
            channel = self._control(request.match_info["id"])
            if isinstance(channel, web.Response):
                return channel
            value = request.query.get("value", "")
            channel.variables[name] = value
            if not name.endswith(")"):
                self.emit("ChannelVarset", channel, variable=name, value=value)
            return _json_response(204, None)

        return self._answer(request, handle)

    async def _continue(self, request: web.Request) -> web.Response:
        def handle() -> web.Response:
            channel = self._control(request.match_info["id"])
            if isinstance(channel, web.Response):
                return channel
            self.emit("StasisEnd", channel)
            channel.in_stasis = False
            self.emit("ChannelVarset", channel, variable="STASISSTATUS", value="SUCCESS")
            return _json_response(204, None)

        return self._answer(request, handle)

    async def _hangup(self, request: web.Request) -> web.Response:
        def handle() -> web.Response:
            channel = self.channels.get(request.match_info["id"])
            if channel is None:
                return _error(404, "Channel not found")
            reason = request.query.get("reason", "normal")
            if reason not in HANGUP_REASONS:
                return _error(400, "Invalid reason for hangup provided")
            cause, cause_txt = HANGUP_CAUSES[reason]
            self.emit("ChannelHangupRequest", channel, cause=SOFTHANGUP_EXPLICIT, soft=True)
            self._destroy(channel, cause, cause_txt, None)
            return _json_response(204, None)

        return self._answer(request, handle)

    async def _subscribe(self, request: web.Request) -> web.Response:
        def handle() -> web.Response:
            source = request.query.get("eventSource", "")
            if not source:
                return _error(400, "Missing parameter eventSource")
            if request.match_info["app"] != self.app:
                return _error(404, "Application not found")
            scheme, _, ident = source.partition(":")
            if scheme != "channel":
                return _error(400, "Invalid event source URI scheme")
            channel = self.channels.get(ident)
            if channel is None:
                return _error(422, "Event source does not exist")
            channel.subscribed = True
            subscribed = [c.id for c in self.channels.values() if c.subscribed]
            return _json_response(
                200,
                {
                    "name": self.app,
                    "channel_ids": subscribed,
                    "bridge_ids": [],
                    "endpoint_ids": [],
                    "device_names": [],
                },
            )

        return self._answer(request, handle)
