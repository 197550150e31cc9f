"""A thin Asterisk REST Interface (ARI) client of our own, on aiohttp.

It speaks only what Guard needs: the events WebSocket of one Stasis application (reconnected
forever with capped, jittered exponential backoff) feeding a handler under a bound on concurrent
work, and a handful of REST calls, each under a timeout and each failure mapped to a typed error
(``AriAuthError``, ``ChannelNotFound``, ``AriConflict``, ``AriBadRequest``, ``AriUnavailable``…).
Credentials travel only in the ``Authorization`` header (never in a URL, never in a log line):
Asterisk accepts HTTP Basic auth for the REST calls and for the WebSocket upgrade alike.
Status codes and bodies follow Asterisk 16.0.1 as recorded in ``shared/asterisk/ari-session.jsonl``.
No Guard policy lives here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from urllib.parse import quote

import aiohttp
from yarl import URL

from guard.errors import ConfigurationError, GuardError, ValidationError
from guard.logs import log_fields

log = logging.getLogger("guard.ari")

#: One parsed ARI event: a JSON object with at least a string ``type``.
AriEvent: TypeAlias = dict[str, Any]

#: Called once per event, in arrival order. Quick bookkeeping happens in the call itself; the
#: slow part, if any, is returned as an awaitable and runs as a task under the concurrency bound.
EventHandler: TypeAlias = Callable[[AriEvent], Awaitable[None] | None]

#: ``DELETE /channels/{id}?reason=`` values Asterisk 16.0.1 accepts; anything else is a 400
#: (``rejected`` included). ``congestion`` gives a SIP caller a 503.
HANGUP_REASONS: Final = frozenset(
    {"normal", "busy", "congestion", "no_answer", "answered_elsewhere"}
)

#: Asterisk's 404 message for ``GET /channels/{id}/variable`` of an unset variable.
VARIABLE_NOT_FOUND: Final = "Provided variable was not found"


class AriError(GuardError):
    """ARI answered with an error, or could not be asked.

    ``status`` is the HTTP status, if any; ``detail`` is Asterisk's own ``message`` text.
    """

    def __init__(self, message: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class AriAuthError(AriError):
    """401: Asterisk refused the ARI user or password (``ari.conf``)."""


class AriBadRequest(AriError):
    """400: a parameter Asterisk refused (e.g. an invalid hang-up reason)."""


class AriNotFound(AriError):
    """404: the named object (application, …) does not exist."""


class ChannelNotFound(AriNotFound):
    """The channel does not exist (any more): typically the caller already hung up."""

    def __init__(
        self, channel_id: str, message: str, *, status: int | None = 404, detail: str = ""
    ) -> None:
        super().__init__(message, status=status, detail=detail)
        self.channel_id = channel_id


class AriConflict(AriError):
    """409: the channel exists but is not in the Stasis application (it left or is leaving)."""


class AriUnavailable(AriError):
    """Asterisk's HTTP server could not be reached (refused, reset, DNS) or broke the exchange."""


class AriTimeout(AriUnavailable):
    """Asterisk did not answer within the client's timeout."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``base * factor**n`` capped at ``cap``, each drawn in [delay/2, delay]."""

    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        ceiling = min(self.cap, self.base * self.factor ** min(failures, 64))
        return random.uniform(ceiling / 2, ceiling)


class AriClient:
    """ARI REST calls and the event stream of one Stasis application.

    ``base_url`` is ``http://host:8088/ari`` (``https`` works too); it must not carry credentials.
    Use it as an async context manager, or call ``close()``. ``generation`` counts the event
    WebSocket connections made so far: a handler that sees it change knows events may have been
    missed in between.
    """

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        app: str = "guard",
        timeout: float = 2.0,
        heartbeat: float = 20.0,
        backoff: Backoff | None = None,
        max_connections: int = 32,
    ) -> None:
        url = URL(base_url.rstrip("/"))
        if url.scheme not in {"http", "https"} or not url.host:
            raise ConfigurationError("ARI URL must look like http://host:8088/ari")
        if url.user is not None or url.password is not None:
            raise ConfigurationError(
                "ARI URL must not carry credentials: give the ARI user and password separately"
            )
        if not username or not password or ":" in username:
            raise ConfigurationError(
                "ARI user and password are required, and the user has no ':' (see ari.conf)"
            )
        if not app:
            raise ConfigurationError("ARI application name is required")
        if timeout <= 0:
            raise ConfigurationError("ARI timeout must be positive")
        self.app = app
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.backoff = backoff or Backoff()
        self.generation = 0
        self._base = url
        self._events_url = url.with_scheme("wss" if url.scheme == "https" else "ws") / "events"
        self._authorization = basic_authorization(username, password)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"AriClient({str(self._base)!r}, app={self.app!r})"

    async def __aenter__(self) -> AriClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": self._authorization},
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout),
            )
        return self._session

    # ---- REST -------------------------------------------------------------------------------

    async def get_variable(self, channel_id: str, name: str) -> str | None:
        """A channel variable or dialplan function value; ``None`` when the variable is unset."""
        try:
            body = await self._request(
                "GET", _channel_path(channel_id, "variable"), {"variable": name}, channel_id
            )
        except ChannelNotFound as exc:
            if exc.detail == VARIABLE_NOT_FOUND:
                return None
            raise
        value = body.get("value") if isinstance(body, dict) else None
        if not isinstance(value, str):
            raise AriError("ARI answered GET variable without a string value")
        return value

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        """Set a variable (or write a function, e.g. ``TIMEOUT(absolute)``) on a Stasis channel."""
        await self._request(
            "POST",
            _channel_path(channel_id, "variable"),
            {"variable": name, "value": value},
            channel_id,
        )

    async def continue_in_dialplan(
        self,
        channel_id: str,
        context: str | None = None,
        extension: str | None = None,
        priority: int | None = None,
        label: str | None = None,
    ) -> None:
        """Leave Stasis; by default the dialplan resumes at the priority after ``Stasis()``."""
        params: dict[str, str] = {}
        if context is not None:
            params["context"] = context
        if extension is not None:
            params["extension"] = extension
        if priority is not None:
            params["priority"] = str(priority)
        if label is not None:
            params["label"] = label
        await self._request("POST", _channel_path(channel_id, "continue"), params, channel_id)

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        """Hang a channel up. ``reason`` is checked here first: Asterisk 16.0.1 400s the others."""
        if reason not in HANGUP_REASONS:
            raise ValidationError(
                "reason", f"hang-up reason must be one of {', '.join(sorted(HANGUP_REASONS))}"
            )
        await self._request("DELETE", _channel_path(channel_id), {"reason": reason}, channel_id)

    async def subscribe(self, app: str, event_source: str) -> dict[str, Any]:
        """Subscribe ``app`` to an event source (``channel:<id>``): its events keep coming after
        the channel leaves Stasis. A missing channel (Asterisk's 422) is ``ChannelNotFound``."""
        kind, _, ident = event_source.partition(":")
        body = await self._request(
            "POST",
            f"/applications/{quote(app, safe='')}/subscription",
            {"eventSource": event_source},
            ident if kind == "channel" else None,
            missing_statuses=frozenset({422}),
        )
        return body if isinstance(body, dict) else {}

    async def list_channels(self) -> list[dict[str, Any]]:
        """Every channel Asterisk has, as ARI channel objects."""
        body = await self._request("GET", "/channels", {}, None)
        if not isinstance(body, list):
            raise AriError("ARI answered GET /channels without a list")
        return [item for item in body if isinstance(item, dict)]

    async def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str],
        channel_id: str | None,
        *,
        missing_statuses: frozenset[int] = frozenset({404}),
    ) -> Any:
        """One REST call under ``timeout``; 2xx bodies parsed as JSON, errors raised typed."""
        url = URL(str(self._base) + path, encoded=True)
        what = f"{method} {path}"
        try:
            async with asyncio.timeout(self.timeout):
                async with self._http().request(method, url, params=params) as response:
                    status = response.status
                    text = await response.text()
        except TimeoutError:
            raise AriTimeout(f"ARI did not answer {what} within {self.timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise AriUnavailable(
                f"cannot reach ARI at {exc.host}:{exc.port}: {exc.os_error.strerror or exc}"
            ) from None
        except aiohttp.ClientError as exc:
            raise AriUnavailable(f"ARI {what} failed: {type(exc).__name__}") from None
        if 200 <= status < 300:
            if not text:
                return None
            try:
                return json.loads(text)
            except ValueError:
                raise AriError(f"ARI answered {what} with malformed JSON", status=status) from None
        raise _error_for(status, _message(text), what, channel_id, missing_statuses)

    # ---- events -----------------------------------------------------------------------------

    async def events(self) -> AsyncGenerator[AriEvent, None]:
        """Every event of the application, forever: reconnects with backoff when the socket
        drops or Asterisk is away. Malformed messages are logged and skipped. Only bad
        credentials end it (``AriAuthError``): retrying cannot fix them."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                socket = await self._connect_events()
            except AriAuthError:
                raise
            except AriError as exc:
                delay = self.backoff.delay(failures)
                failures += 1
                log.warning(
                    "ARI event socket unavailable; retrying",
                    extra=log_fields(app=self.app, error=str(exc), retry_in=round(delay, 2)),
                )
                await asyncio.sleep(delay)
                continue
            self.generation += 1
            opened = loop.time()
            log.info(
                "ARI event socket connected",
                extra=log_fields(app=self.app, url=str(self._events_url), gen=self.generation),
            )
            try:
                async for message in socket:
                    if message.type is aiohttp.WSMsgType.TEXT:
                        event = _parse_event(message.data)
                        if event is not None:
                            yield event
                    elif message.type is aiohttp.WSMsgType.ERROR:
                        break
            except aiohttp.ClientError as exc:
                log.warning("ARI event socket failed", extra=log_fields(error=type(exc).__name__))
            finally:
                await socket.close()
            if loop.time() - opened >= self.backoff.cap:
                failures = 0  # a connection that held a while starts the backoff afresh
            delay = self.backoff.delay(failures)
            failures += 1
            log.warning(
                "ARI event socket closed; reconnecting",
                extra=log_fields(app=self.app, retry_in=round(delay, 2)),
            )
            await asyncio.sleep(delay)

    async def _connect_events(self) -> aiohttp.ClientWebSocketResponse:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._http().ws_connect(
                    self._events_url,
                    params={"app": self.app, "subscribeAll": "false"},
                    heartbeat=self.heartbeat,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise AriAuthError(
                    "ARI refused the credentials (401): check the user and password in ari.conf",
                    status=401,
                ) from None
            raise AriUnavailable(
                f"ARI refused the event WebSocket ({exc.status})", status=exc.status
            ) from None
        except TimeoutError:
            raise AriTimeout(
                f"ARI event WebSocket did not open within {self.timeout:g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise AriUnavailable(
                f"cannot reach ARI at {exc.host}:{exc.port}: {exc.os_error.strerror or exc}"
            ) from None
        except aiohttp.ClientError as exc:
            raise AriUnavailable(f"ARI event WebSocket failed: {type(exc).__name__}") from None

    async def run(
        self, handler: EventHandler, *, max_concurrent: int = 256, drain_timeout: float = 5.0
    ) -> None:
        """Feed every event to ``handler`` in order; run the work it returns as tasks, at most
        ``max_concurrent`` at once. When the bound is reached the reader waits and events queue
        in the socket buffers (a reader stalled past Asterisk's ``websocket_write_timeout``
        makes Asterisk drop the socket; ``events`` then reconnects). A handler that raises is
        logged and the loop goes on. On exit, in-flight work gets ``drain_timeout`` seconds."""
        slots = asyncio.Semaphore(max_concurrent)
        running: set[asyncio.Task[None]] = set()
        try:
            async with contextlib.aclosing(self.events()) as events:
                async for event in events:
                    await slots.acquire()
                    try:
                        work = handler(event)
                    except Exception:
                        slots.release()
                        log.exception(
                            "ARI event handler failed; event skipped",
                            extra=log_fields(event=event.get("type")),
                        )
                        continue
                    if work is None:
                        slots.release()
                        continue
                    task = asyncio.create_task(_run_work(work, slots, event.get("type")))
                    running.add(task)
                    task.add_done_callback(running.discard)
        finally:
            if running:
                _, late = await asyncio.wait(running, timeout=drain_timeout)
                for task in late:
                    task.cancel()


def basic_authorization(username: str, password: str) -> str:
    """The ``Authorization`` header value of HTTP Basic auth (RFC 7617, UTF-8)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


async def _run_work(work: Awaitable[None], slots: asyncio.Semaphore, kind: object) -> None:
    try:
        await work
    except Exception:
        log.exception("ARI event work failed", extra=log_fields(event=kind))
    finally:
        slots.release()


def _channel_path(channel_id: str, *rest: str) -> str:
    return "/".join(("/channels", quote(channel_id, safe=""), *rest))


def _message(text: str) -> str:
    """Asterisk's ``{"message": …}`` error text, bounded; the raw body when it is not JSON."""
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return str(body["message"])[:200]
    return text[:200]


def _error_for(
    status: int,
    message: str,
    what: str,
    channel_id: str | None,
    missing_statuses: frozenset[int],
) -> AriError:
    text = f"ARI {what}: {status} {message}".rstrip()
    if status == 401:
        return AriAuthError(
            "ARI refused the credentials (401): check the user and password in ari.conf",
            status=status,
            detail=message,
        )
    if status in missing_statuses and channel_id is not None:
        return ChannelNotFound(channel_id, text, status=status, detail=message)
    kind = {404: AriNotFound, 409: AriConflict, 400: AriBadRequest}.get(status, AriError)
    return kind(text, status=status, detail=message)


def _parse_event(text: str) -> AriEvent | None:
    try:
        event = json.loads(text)
    except ValueError:
        log.warning(
            "ARI sent a message that is not JSON; skipped", extra=log_fields(size=len(text))
        )
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        log.warning(
            "ARI sent a message without an event type; skipped", extra=log_fields(size=len(text))
        )
        return None
    return event
