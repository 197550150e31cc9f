"""The dashboard's web application (aiohttp): pages, live stream, JSON API, actions, ``/metrics``.

Routes (every one but ``/login`` and ``/static`` needs a login, see below)::

    GET  /                          overview            GET /api/overview
    GET  /tenants/{tenant}          one tenant          GET /api/tenants/{tenant}
                                                        GET /api/tenants/{tenant}/hourly
    GET  /calls                     live calls          GET /api/calls
    GET  /security                  blocks, scanners    GET /api/security
                                                        GET /api/events
    GET  /stream?view=…             server-sent events: the page's fragments, re-rendered
    POST /actions/{action}          unlock, unblock, hangup (a form: redirects back)
    POST /api/actions/{action}      the same, answering JSON
    GET  /metrics                   Prometheus
    GET|POST /login, POST /logout

Who may call them: a browser with a session cookie (from ``/login``: the user and the password
whose hash is configured, or the API token as the password), or any client sending the API
token as ``Authorization: Bearer …``. Without any of them configured the dashboard is open, and
``check_listen`` allows that on a loopback address only. Every POST made with a session must
carry that session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``); actions are
refused unless ``GUARD_DASHBOARD_ACTIONS`` is on, and each one is audited as an ``admin`` event
on the bus (log line, audit table, event feed). Responses carry a strict Content-Security-Policy:
the only script is ``/static/dashboard.js``.

The tenants, extensions and live calls are paged: ``offset`` and ``limit`` (``Paging``) on the
page, its stream and its API; the page's previous/next links keep its other parameters (tenant
filter, sort, ``limit``), and so does its stream, so that a live page stays on its rows.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit

from aiohttp import web
from jinja2 import Environment
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine as SqlEngine

from guard.config import repository
from guard.dashboard import exporter
from guard.dashboard.auth import LoginLimiter, Session, Sessions, token_digest, verify_password
from guard.dashboard.data import EXTENSION_SORTS, MAX_ROWS, DashboardData, Paging
from guard.dashboard.render import environment
from guard.errors import ConfigurationError, GuardError, StorageError
from guard.events import Event, EventBus, EventKind, safe_ip
from guard.logs import log_fields
from guard.settings import Listen, Settings

log = logging.getLogger("guard.dashboard")

#: Hangs up a channel by its id (the call id) over ARI; whether it was live (else already gone).
Hangup = Callable[[str], Awaitable[bool]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
ACTIONS: Final = ("unlock", "unblock", "hangup")
#: Fixed texts for the ``done``/``error`` codes an action redirects with (never echoed input).
NOTICES: Final[dict[str, str]] = {
    "unlocked": "The extension is unlocked.",
    "unblocked": "The IP address is unblocked.",
    "hung_up": "The call is being hung up.",
    "actions_disabled": "Actions are off: set GUARD_DASHBOARD_ACTIONS=true to allow them.",
    "ari_not_configured": "Hanging up needs ARI, which is not configured for the dashboard.",
    "not_found": "Nothing to do: it does not exist (any more).",
    "not_locked": "That extension is not locked.",
    "not_blocked": "That IP address is not blocked.",
    "bad_request": "The request was incomplete or invalid.",
    "store_unavailable": "The counter store did not answer; nothing was changed.",
    "failed": "The action failed; see the dashboard's log.",
}
_SESSION_COOKIE: Final = "guard_session"
_SECURE_SESSION_COOKIE: Final = "__Host-guard_session"
_VIEWS: Final[dict[str, tuple[str, ...]]] = {
    "overview": ("status", "tenants"),
    "tenant": ("tenant_summary", "chart", "extensions", "events"),
    "calls": ("calls",),
    "security": ("blocks", "scanners", "ips", "events"),
}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the dashboard to this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    """The dashboard's settings (from ``GUARD_DASHBOARD_*`` and ``GUARD_METRICS_MAX_TENANTS``)."""

    listen: Listen = ("127.0.0.1", 8080)
    user: str = "admin"
    password_hash: str = ""
    token: str = ""
    session_secret: str = ""
    session_hours: int = 12
    secure_cookies: bool = False
    actions: bool = False
    metrics_max_tenants: int = 200
    #: Seconds between two updates of a live page.
    stream_interval: float = 2.0

    @classmethod
    def from_settings(cls, settings: Settings, listen: Listen | None = None) -> DashboardConfig:
        return cls(
            listen=listen or settings.dashboard_listen,
            user=settings.dashboard_user,
            password_hash=settings.dashboard_password_hash,
            token=settings.dashboard_token,
            session_secret=settings.dashboard_session_secret,
            session_hours=settings.dashboard_session_hours,
            secure_cookies=settings.dashboard_secure_cookies,
            actions=settings.dashboard_actions,
            metrics_max_tenants=settings.metrics_max_tenants,
        )

    @property
    def auth_configured(self) -> bool:
        return bool(self.password_hash or self.token)

    def check_listen(self) -> None:
        """Refuse an address other machines can reach while no login is configured."""
        host, port = self.listen
        if not self.auth_configured and not is_loopback(host):
            raise ConfigurationError(
                f"the dashboard would listen on {host}:{port} without a login: set"
                " GUARD_DASHBOARD_PASSWORD_HASH (make one with `guard dashboard hash-password`)"
                " and/or GUARD_DASHBOARD_TOKEN, or listen on a loopback address such as"
                " 127.0.0.1"
            )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a session (browser), the API token, or anyone (no login configured).

    ``new_cookie`` is set when the session was made for this very request (no login
    configured, first visit): the response carries it.
    """

    user: str
    session: Session | None = None
    new_cookie: str = ""


_PRINCIPAL: Final = web.RequestKey("principal", Principal)


class Dashboard:
    """The aiohttp application over ``DashboardData`` (see the module docstring)."""

    def __init__(
        self,
        data: DashboardData,
        config: DashboardConfig,
        *,
        events: EventBus,
        sql: SqlEngine | None = None,
        hangup: Hangup | None = None,
    ) -> None:
        self.data = data
        self.config = config
        self.events = events
        self.sql = sql
        self.hangup = hangup
        self.sessions = Sessions(
            config.session_secret, config.password_hash, config.session_hours * 3600.0
        )
        self.limiter = LoginLimiter()
        self._token = token_digest(config.token) if config.token else b""
        self._templates: Environment = environment()
        self._cookie = _SECURE_SESSION_COOKIE if config.secure_cookies else _SESSION_COOKIE

    # ---- application ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._headers, self._authenticate], client_max_size=64 * 1024
        )
        r = app.router
        r.add_get("/login", self.login_form)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/", self.overview_page)
        r.add_get("/tenants/{tenant}", self.tenant_page)
        r.add_get("/calls", self.calls_page)
        r.add_get("/security", self.security_page)
        r.add_get("/stream", self.stream)
        r.add_get("/api/overview", self.api_overview)
        r.add_get("/api/tenants/{tenant}", self.api_tenant)
        r.add_get("/api/tenants/{tenant}/hourly", self.api_hourly)
        r.add_get("/api/calls", self.api_calls)
        r.add_get("/api/security", self.api_security)
        r.add_get("/api/events", self.api_events)
        r.add_post("/actions/{action}", self.form_action)
        r.add_post("/api/actions/{action}", self.api_action)
        r.add_get("/metrics", self.metrics)
        r.add_static("/static", STATIC_DIR)
        return app

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _harden(exc, static=False)
            raise
        _harden(response, static=request.path.startswith("/static/"))
        return response

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path == "/login" or path.startswith("/static/"):
            return await handler(request)
        principal = self._principal(request)
        if principal is None:
            if _wants_json(request):
                raise web.HTTPUnauthorized(
                    text=json.dumps({"error": "login required"}),
                    content_type="application/json",
                    headers={"WWW-Authenticate": 'Bearer realm="guard"'},
                )
            raise web.HTTPFound(f"/login?next={quote(_safe_next(request.path_qs), safe='/')}")
        if request.method == "POST" and principal.session is not None:
            token = request.headers.get("X-CSRF-Token", "")
            if not token and request.content_type == "application/x-www-form-urlencoded":
                token = str((await request.post()).get("csrf", ""))
            if not self.sessions.csrf_ok(principal.session, token):
                raise web.HTTPForbidden(text="missing or wrong CSRF token")
        request[_PRINCIPAL] = principal
        response = await handler(request)
        if principal.new_cookie:
            self._set_cookie(response, principal.new_cookie)
        return response

    def _principal(self, request: web.Request) -> Principal | None:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if self._token and scheme.lower() == "bearer":
            if hmac.compare_digest(token_digest(credentials.strip()), self._token):
                return Principal("token")
            return None
        cookie = request.cookies.get(self._cookie, "")
        session = self.sessions.check(cookie) if cookie else None
        if session is not None:
            return Principal(session.user, session)
        if not self.config.auth_configured:
            # No login configured (loopback only): a session anyway, for the CSRF token.
            value, anonymous = self.sessions.issue("local")
            return Principal("local", anonymous, new_cookie=value)
        return None

    def _set_cookie(self, response: web.StreamResponse, value: str) -> None:
        response.set_cookie(
            self._cookie,
            value,
            max_age=self.config.session_hours * 3600,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.config.secure_cookies,
        )

    # ---- login ----------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if not self.config.auth_configured:
            raise web.HTTPFound("/")
        return self._login_page(_safe_next(request.query.get("next", "/")), "", 200)

    def _login_page(self, next_path: str, error: str, status: int) -> web.Response:
        html = self._templates.get_template("login.html").render(
            error=error, next=next_path, user=self.config.user
        )
        return web.Response(text=html, content_type="text/html", status=status)

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not self.config.auth_configured:
            raise web.HTTPFound("/")
        client = request.remote or "-"
        wait = self.limiter.retry_after(client)
        if wait > 0:
            log.warning(
                "dashboard login refused: too many failures", extra=log_fields(client=client)
            )
            raise web.HTTPTooManyRequests(
                text="Too many failed logins; try again later.",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        form = await request.post()
        user, password = str(form.get("user", "")), str(form.get("password", ""))
        next_path = _safe_next(str(form.get("next", "/")))
        who = await self._credentials(user, password)
        if who is None:
            self.limiter.failed(client)
            # Not the typed user name: people type their password there by mistake.
            log.warning("dashboard login failed", extra=log_fields(client=client))
            return self._login_page(next_path, "Wrong user or password.", 401)
        self.limiter.succeeded(client)
        value, session = self.sessions.issue(who)
        log.info("dashboard login", extra=log_fields(client=client, user=session.user))
        response = web.HTTPSeeOther(next_path)
        self._set_cookie(response, value)
        raise response

    async def _credentials(self, user: str, password: str) -> str | None:
        """The user that ``user``/``password`` log in as, or ``None``."""
        if not password:
            return None
        if self._token and hmac.compare_digest(token_digest(password), self._token):
            return "token"
        if not self.config.password_hash:
            return None
        user_ok = hmac.compare_digest(user.encode(), self.config.user.encode())
        password_ok = await asyncio.to_thread(verify_password, password, self.config.password_hash)
        return self.config.user if user_ok and password_ok else None

    async def logout(self, request: web.Request) -> web.StreamResponse:
        principal = request[_PRINCIPAL]
        if principal.session is not None:
            self.sessions.revoke(principal.session)
        response = web.HTTPSeeOther("/login" if self.config.auth_configured else "/")
        response.del_cookie(self._cookie, path="/")
        raise response

    # ---- pages ----------------------------------------------------------------------------

    def _context(self, request: web.Request, view: str, data: Mapping[str, Any]) -> dict[str, Any]:
        principal = request[_PRINCIPAL]
        session = principal.session
        page = data.get("page")
        return {
            "data": data,
            "actions": self.config.actions,
            "csrf": self.sessions.csrf_token(session) if session is not None else "",
            "pager": _pager(view, request, page) if page is not None else {},
        }

    def _page(
        self,
        request: web.Request,
        view: str,
        title: str,
        data: Mapping[str, Any],
        stream: Mapping[str, str],
    ) -> web.Response:
        principal = request[_PRINCIPAL]
        done, error = request.query.get("done", ""), request.query.get("error", "")
        notice = NOTICES.get(error) or NOTICES.get(done) or ""
        html = self._templates.get_template(f"{view}.html").render(
            **self._context(request, view, data),
            title=title,
            page=view,
            stream_url=f"/stream?{urlencode({'view': view, **stream})}",
            user=principal.user,
            can_logout=self.config.auth_configured and principal.session is not None,
            notice=notice,
            notice_kind="error" if error in NOTICES else "",
        )
        return web.Response(text=html, content_type="text/html")

    async def overview_page(self, request: web.Request) -> web.StreamResponse:
        paging = _paging(request)
        data = await self.data.overview(paging)
        return self._page(request, "overview", "Overview", data, _paging_query(paging))

    async def tenant_page(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["tenant"]
        sort, descending = _sort(request)
        paging = _paging(request)
        data = await self.data.tenant(name, sort, descending, paging)
        if data is None:
            raise web.HTTPNotFound(text="no such tenant")
        stream = {
            "tenant": name,
            "sort": sort,
            "order": "desc" if descending else "asc",
            **_paging_query(paging),
        }
        return self._page(request, "tenant", f"Tenant {name}", data, stream)

    async def calls_page(self, request: web.Request) -> web.StreamResponse:
        tenant = request.query.get("tenant") or None
        paging = _paging(request)
        stream = {"tenant": tenant} if tenant else {}
        stream.update(_paging_query(paging))
        data = await self.data.calls(tenant, paging)
        return self._page(request, "calls", "Live calls", data, stream)

    async def security_page(self, request: web.Request) -> web.StreamResponse:
        return self._page(request, "security", "Security", await self.data.security(), {})

    async def _view_data(
        self, request: web.Request, view: str, paging: Paging
    ) -> Mapping[str, Any] | None:
        if view == "overview":
            return await self.data.overview(paging)
        if view == "tenant":
            sort, descending = _sort(request)
            name = request.query.get("tenant", "")
            return await self.data.tenant(name, sort, descending, paging)
        if view == "calls":
            return await self.data.calls(request.query.get("tenant") or None, paging)
        return await self.data.security()

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the view's fragments whenever they change (and a heartbeat)."""
        view = request.query.get("view", "")
        if view not in _VIEWS:
            raise web.HTTPNotFound(text="no such view")
        paging = _paging(request)
        principal = request[_PRINCIPAL]
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        _harden(response, static=False)
        if principal.new_cookie:
            self._set_cookie(response, principal.new_cookie)
        await response.prepare(request)
        last, quiet = "", 0.0
        while principal.session is None or self.sessions.alive(principal.session):
            data = await self._view_data(request, view, paging)
            if data is None:
                break
            context = self._context(request, view, data)
            fragments = {
                name: self._templates.get_template(f"fragments/{name}.html").render(**context)
                for name in _VIEWS[view]
            }
            text = json.dumps(fragments, separators=(",", ":"))
            try:
                if text != last:
                    await response.write(f"event: update\ndata: {text}\n\n".encode())
                    last, quiet = text, 0.0
                elif quiet >= 15:
                    await response.write(b": keepalive\n\n")
                    quiet = 0.0
            except (ConnectionResetError, ConnectionError):
                break
            await asyncio.sleep(self.config.stream_interval)
            quiet += self.config.stream_interval
        return response

    # ---- JSON API -------------------------------------------------------------------------

    async def api_overview(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.data.overview(_paging(request)))

    async def api_tenant(self, request: web.Request) -> web.StreamResponse:
        sort, descending = _sort(request)
        paging = _paging(request)
        data = await self.data.tenant(request.match_info["tenant"], sort, descending, paging)
        if data is None:
            return _json_error(404, "no such tenant")
        return _json(data)

    async def api_hourly(self, request: web.Request) -> web.StreamResponse:
        day = request.query.get("day") or None
        if day is not None and not (len(day) == 8 and day.isdigit()):
            return _json_error(400, "day must be YYYYMMDD")
        try:
            data = await self.data.hourly(request.match_info["tenant"], day)
        except StorageError as exc:
            return _json_error(503, str(exc))
        if data is None:
            return _json_error(404, "no such tenant")
        return _json(data)

    async def api_calls(self, request: web.Request) -> web.StreamResponse:
        paging = _paging(request)
        return _json(await self.data.calls(request.query.get("tenant") or None, paging))

    async def api_security(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.data.security())

    async def api_events(self, request: web.Request) -> web.StreamResponse:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            return _json_error(400, "limit must be an integer")
        try:
            return _json(await self.data.events(request.query.get("tenant") or None, limit))
        except StorageError as exc:
            return _json_error(503, str(exc))

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body = await exporter.scrape(self.data, self.config.metrics_max_tenants)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- actions --------------------------------------------------------------------------

    async def form_action(self, request: web.Request) -> web.StreamResponse:
        status, code = await self._action(request, dict(await request.post()))
        back = _safe_next(request.headers.get("Referer", "/"), same_origin=request.host)
        separator = "&" if "?" in back else "?"
        key = "done" if status < 400 else "error"
        raise web.HTTPSeeOther(f"{back}{separator}{key}={code}")

    async def api_action(self, request: web.Request) -> web.StreamResponse:
        try:
            fields = await request.json() if request.can_read_body else {}
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            return _json_error(400, "the body must be a JSON object")
        status, code = await self._action(request, fields)
        return _json({"ok": status < 400, "result": code, "message": NOTICES[code]}, status)

    async def _action(self, request: web.Request, fields: Mapping[str, Any]) -> tuple[int, str]:
        """Run one action: (HTTP status, notice code). Every attempt that runs is audited."""
        action = request.match_info["action"]
        if action not in ACTIONS:
            raise web.HTTPNotFound(text="no such action")
        if not self.config.actions:
            return 403, "actions_disabled"
        text = {key: str(value)[:256] for key, value in fields.items() if key != "csrf"}
        principal = request[_PRINCIPAL]
        try:
            if action == "unlock":
                status, code = await self._unlock(text.get("tenant", ""), text.get("extension", ""))
            elif action == "unblock":
                status, code = await self._unblock(text.get("ip", ""))
            else:
                status, code = await self._hangup(text.get("tenant", ""), text.get("call_id", ""))
        except StorageError:
            status, code = 503, "store_unavailable"
        except GuardError as exc:
            log.warning("dashboard action failed", extra=log_fields(action=action, error=str(exc)))
            status, code = 502, "failed"
        self.events.emit(
            Event(
                EventKind.ADMIN,
                f"dashboard.{action}",
                text.get("tenant", ""),
                text.get("extension", ""),
                text.get("ip", ""),
                text.get("call_id", ""),
                {
                    "actor": f"dashboard:{principal.user}",
                    "result": code,
                    "client": request.remote or "",
                },
            )
        )
        return status, code

    async def _unlock(self, tenant: str, extension: str) -> tuple[int, str]:
        config = self.data.snapshot.extensions.get((tenant, extension))
        if config is None:
            return 404, "not_found"
        was_locked = await self.data.ledger.unlock_extension(tenant, extension)
        if config.locked and self.sql is not None:
            await asyncio.to_thread(
                repository.unlock_extension, self.sql, tenant, extension, actor="dashboard"
            )
            version = await asyncio.to_thread(repository.read_version, self.sql)
            await self.data.ledger.bump_config_version(version)
        elif not was_locked:
            return 409, "not_locked"
        return 200, "unlocked"

    async def _unblock(self, ip: str) -> tuple[int, str]:
        canonical = safe_ip(ip)
        if canonical == "-":
            return 400, "bad_request"
        if not await self.data.ledger.unblock_ip(canonical, now=self.data.clock()):
            return 409, "not_blocked"
        return 200, "unblocked"

    async def _hangup(self, tenant: str, call_id: str) -> tuple[int, str]:
        """Hang up a call the live counters hold; counters are left to its settle. A call of
        the shadow counters (shadow mode) is ``not_found`` here: the page offers it no button."""
        if self.hangup is None:
            return 503, "ari_not_configured"
        if tenant not in self.data.snapshot.tenants or not call_id:
            return 404, "not_found"
        live = await self.data.ledger.live_calls(tenant)
        if not any(call.call_id == call_id for call in live):
            return 404, "not_found"
        if not await self.hangup(call_id):
            return 404, "not_found"
        return 200, "hung_up"


STATIC_DIR: Final = Path(__file__).resolve().parent / "static"


def _harden(response: web.StreamResponse, *, static: bool) -> None:
    """Security headers on every response; nothing but static files may be cached."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cache-Control", "private, max-age=300" if static else "no-store")


def _wants_json(request: web.Request) -> bool:
    return (
        request.path.startswith("/api/")
        or request.path in ("/metrics", "/stream")
        or "application/json" in request.headers.get("Accept", "")
    )


def _safe_next(target: str, *, same_origin: str | None = None) -> str:
    """A local path to go back to: never another site (open redirect), else ``/``."""
    parsed = urlsplit(target)
    if same_origin is not None and parsed.netloc and parsed.netloc != same_origin:
        return "/"
    path = parsed.path or "/"
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    query = "&".join(
        part
        for part in parsed.query.split("&")
        if part and not part.startswith(("done=", "error="))
    )
    return f"{path}?{query}" if query else path


def _sort(request: web.Request) -> tuple[str, bool]:
    sort = request.query.get("sort", "name")
    return (sort if sort in EXTENSION_SORTS else "name"), request.query.get("order") == "desc"


def _paging(request: web.Request) -> Paging:
    """The request's ``offset`` and ``limit``; bad ones answer 400 (in JSON to an API client)."""
    try:
        return Paging.parse(request.query.get("offset"), request.query.get("limit"))
    except ValueError as exc:
        if _wants_json(request):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": str(exc)}), content_type="application/json"
            ) from None
        raise web.HTTPBadRequest(text=str(exc)) from None


def _paging_query(paging: Paging) -> dict[str, str]:
    """``paging`` as query parameters, the defaults left out."""
    query = {"offset": str(paging.offset)} if paging.offset else {}
    if paging.limit != MAX_ROWS:
        query["limit"] = str(paging.limit)
    return query


def _pager(view: str, request: web.Request, page: Mapping[str, Any]) -> dict[str, str]:
    """A listing's ``previous`` and ``next`` links (empty at either end) and the ``limit`` asked
    for (empty: the default): relative to the page, keeping its filter or sort and ``limit``."""
    query: dict[str, str] = {}
    if view == "tenant":
        sort, descending = _sort(request)
        query = {"sort": sort, "order": "desc" if descending else "asc"}
    elif view == "calls" and (tenant := request.query.get("tenant")):
        query = {"tenant": tenant}
    query.update(_paging_query(Paging(limit=page["limit"])))

    def link(offset: int | None) -> str:
        return "" if offset is None else f"?{urlencode({**query, 'offset': offset})}"

    return {
        "previous": link(page["previous_offset"]),
        "next": link(page["next_offset"]),
        "limit": query.get("limit", ""),
    }


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=str, separators=(",", ":")),
        status=status,
        content_type="application/json",
    )


def _json_error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)
