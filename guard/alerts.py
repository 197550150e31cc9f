"""Alerts: the events an operator must hear about, delivered by webhook, e-mail and the log.

An ``AlertDispatcher`` is an ``EventBus`` sink: on the hot path it only applies the rules (pure,
``alert_for``) and queues the alert, never waiting (a full queue drops and counts). A background
task (``run``) then de-duplicates each alert across every guard process (``SET NX`` with a TTL
in Redis, so a warning goes out once per extension per day however many calls and guards see
it; in-process only while Redis is down, which is exactly when "store unavailable" must still go
out) and hands it to every channel: the log always, webhooks (JSON ``POST`` with retries,
backoff and a timeout) and e-mail (SMTP in a thread) where configured.

Rules: settled spend at the warning share of a daily limit (``spend_warning``), a daily limit
used up (``spend_limit``), an extension locked, a scanner User-Agent seen, an IP blocked, the
counter store unavailable, a call that outlived its limit (``over_reservation``).
Never logged or sent: the SMTP password. Every attacker-controlled text in an alert is escaped
before it reaches a mail header or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import smtplib
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from enum import StrEnum
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from guard.aio import honour_cancellation
from guard.domain import Reason
from guard.errors import StorageError
from guard.events import Event, EventKind, safe_ip
from guard.logs import log_fields
from guard.settings import Settings

log = logging.getLogger("guard.alerts")

#: Alerts waiting for delivery; past this the newest are dropped (and counted).
QUEUE_SIZE = 10_000
#: In-process de-duplication entries kept (when Redis is down); the oldest go first.
LOCAL_DEDUPE_MAX = 10_000
_DAY = 86_400
_MAX_SHOWN = 80


class Severity(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert: what to say, how loud, and its de-duplication key (``""``: never merged)."""

    rule: str
    severity: Severity
    title: str
    text: str
    dedupe: str = ""
    dedupe_seconds: int = _DAY
    event: Event | None = None

    def payload(self) -> dict[str, object]:
        """The JSON body of a webhook (``text`` on top, as chat webhooks expect it)."""
        body: dict[str, object] = {
            "source": "guard",
            "rule": self.rule,
            "severity": self.severity.value,
            "title": self.title,
            "text": f"[{self.severity.value}] {self.title}: {self.text}",
        }
        event = self.event
        if event is not None:
            body["event"] = {
                "kind": event.kind,
                "reason": event.reason,
                "tenant": event.tenant,
                "extension": event.extension,
                "src": safe_ip(event.source_ip) if event.source_ip else "-",
                "call_id": event.call_id,
                "at": datetime.fromtimestamp(event.at, UTC).isoformat(),
                "detail": dict(event.detail),
            }
        return body


def shown(text: str) -> str:
    """Untrusted text as an alert may quote it: printable ASCII, no line breaks, truncated."""
    clean = ascii(text)[1:-1] if not (text.isascii() and text.isprintable()) else text
    return clean if len(clean) <= _MAX_SHOWN else clean[: _MAX_SHOWN - 3] + "..."


def _utc_day(at: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(at))


def _who(event: Event) -> str:
    if event.extension:
        return f"extension {shown(event.extension)} of {shown(event.tenant)}"
    return f"tenant {shown(event.tenant)}"


def alert_for(event: Event) -> Alert | None:
    """The alert an event raises, if any (pure: the rules of the module docstring)."""
    kind, reason = event.kind, event.reason
    src = safe_ip(event.source_ip) if event.source_ip else "-"
    scope = f"{event.tenant}:{event.extension}"
    if kind == EventKind.SPEND_WARNING:
        detail = event.detail
        day = str(detail.get("day", _utc_day(event.at)))
        return Alert(
            "spend_warning",
            Severity.WARNING,
            f"{_who(event)} spent {detail.get('percent', '?')}% of its daily limit",
            f"spent {detail.get('spent')} of {detail.get('limit')} (sub-units) on {day}",
            f"spend_warning:{scope}:{day}",
            2 * _DAY,
            event,
        )
    if kind == EventKind.REFUSED and reason in (
        Reason.DAILY_LIMIT_EXTENSION,
        Reason.DAILY_LIMIT_TENANT,
    ):
        whole_tenant = reason == Reason.DAILY_LIMIT_TENANT
        who = f"tenant {shown(event.tenant)}" if whole_tenant else _who(event)
        ext = "" if whole_tenant else event.extension
        return Alert(
            "spend_limit",
            Severity.CRITICAL,
            f"{who} reached its daily limit",
            "calls are refused until the day ends or the limit is raised (guard ext raise)",
            f"spend_limit:{event.tenant}:{ext}:{_utc_day(event.at)}",
            _DAY,
            event,
        )
    if kind == EventKind.LOCKED:
        return Alert(
            "extension_locked",
            Severity.CRITICAL,
            f"{_who(event)} is locked ({shown(reason)})",
            f"from {src}; unlock it with guard ext unlock once it is safe",
            f"locked:{scope}",
            3600,
            event,
        )
    if kind == EventKind.REFUSED and reason == Reason.SCANNER_USER_AGENT:
        agent = shown(str(event.detail.get("ua", "")))
        return Alert(
            "scanner_seen",
            Severity.WARNING,
            f"SIP scanner seen from {src}",
            f"User-Agent {agent!r} tried {_who(event)}",
            f"scanner:{src}:{_utc_day(event.at)}",
            _DAY,
            event,
        )
    if kind == EventKind.IP_BLOCKED:
        until = event.detail.get("until", "-")
        ends = "until unblocked" if until == "-" else f"until {until}"
        return Alert(
            "ip_blocked",
            Severity.WARNING,
            f"IP {src} blocked ({shown(reason)})",
            f"blocked {ends}; lift it with guard ip unblock {src}",
            f"ip_blocked:{src}",
            600,
            event,
        )
    if kind in (EventKind.STORE_UNAVAILABLE, EventKind.FAIL_OPEN):
        return Alert(
            "store_unavailable",
            Severity.CRITICAL,
            "counter store unavailable",
            shown(str(event.detail.get("error", ""))) or "Redis did not answer in time",
            "store_unavailable",
            300,
            event,
        )
    if kind == EventKind.OVER_RESERVATION:
        return Alert(
            "over_reservation",
            Severity.CRITICAL,
            f"a call of {_who(event)} outlived its limit",
            f"call {shown(event.call_id)} cost {event.detail.get('cost')} with "
            f"{event.detail.get('reserved')} reserved: is Dial's L() limit in the dialplan?",
            f"over:{event.tenant}:{event.call_id}",
            _DAY,
            event,
        )
    return None


class AlertChannel(Protocol):
    """Somewhere alerts go; ``send`` raises when the alert could not be delivered."""

    @property
    def name(self) -> str: ...

    async def send(self, alert: Alert) -> None: ...

    async def close(self) -> None: ...


class AlertDeliveryError(Exception):
    """A channel gave up on an alert; the message says why (never a secret)."""


class LogChannel:
    """Alerts as log lines (logger ``guard.alerts``): always on."""

    name = "log"

    async def send(self, alert: Alert) -> None:
        event = alert.event
        level = logging.ERROR if alert.severity is Severity.CRITICAL else logging.WARNING
        log.log(
            level,
            "alert",
            extra=log_fields(
                rule=alert.rule,
                severity=alert.severity.value,
                src=safe_ip(event.source_ip) if event and event.source_ip else "-",
                tenant=event.tenant if event and event.tenant else "-",
                ext=event.extension if event and event.extension else "-",
                title=alert.title,
            ),
        )

    async def close(self) -> None:
        return None


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…`` of a URL: chat webhooks carry their secret in the path."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


class WebhookChannel:
    """``POST`` the alert as JSON to one URL; retries connection errors, timeouts, 429 and 5xx
    with exponential backoff; any other answer outside 2xx fails at once."""

    def __init__(
        self, url: str, *, timeout: float = 5.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return f"webhook {redact_url(self.url)}"

    async def send(self, alert: Alert) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "guard-alerts"},
            )
        body = json.dumps(alert.payload(), ensure_ascii=True, default=str)
        delay, problem = self.backoff, ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                async with self._session.post(
                    self.url, data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    if 200 <= response.status < 300:
                        return
                    problem = f"HTTP {response.status}"
                    if response.status != 429 and response.status < 500:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
        raise AlertDeliveryError(f"{self.name}: {problem}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    host: str
    port: int = 587
    sender: str = "guard@localhost"
    recipients: tuple[str, ...] = ()
    user: str = ""
    #: Secret: kept out of ``repr`` and never logged.
    password: str = field(default="", repr=False)
    #: ``starttls``, ``ssl`` (implicit TLS, port 465) or ``none``.
    security: str = "starttls"
    timeout: float = 10.0


class EmailChannel:
    """Send the alert by SMTP (``smtplib`` in a thread: the event loop never waits on it)."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings

    @property
    def name(self) -> str:
        return f"e-mail {self.settings.host}:{self.settings.port}"

    def message(self, alert: Alert) -> EmailMessage:
        message = EmailMessage()
        message["Subject"] = f"[guard {alert.severity.value}] {alert.title}"
        message["From"] = self.settings.sender
        message["To"] = ", ".join(self.settings.recipients)
        body = json.dumps(alert.payload(), ensure_ascii=True, indent=2, default=str)
        message.set_content(f"{alert.text}\n\n{body}\n")
        return message

    def _send(self, message: EmailMessage) -> None:
        s = self.settings
        context = ssl.create_default_context()
        smtp = (
            smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout, context=context)
            if s.security == "ssl"
            else smtplib.SMTP(s.host, s.port, timeout=s.timeout)
        )
        with smtp:
            if s.security == "starttls":
                smtp.starttls(context=context)
            if s.user:
                smtp.login(s.user, s.password)
            smtp.send_message(message)

    async def send(self, alert: Alert) -> None:
        try:
            await asyncio.to_thread(self._send, self.message(alert))
        except (OSError, smtplib.SMTPException) as exc:
            # smtplib's messages hold the server's answer, never the password we sent.
            raise AlertDeliveryError(f"{self.name}: {type(exc).__name__}: {exc}"[:300]) from None

    async def close(self) -> None:
        return None


Claim = Callable[[str, int], Awaitable[bool]]


class Deduper:
    """Whether an alert is the first of its key within its window, across every guard.

    ``claim`` is ``RedisLedger.claim_once`` (``SET NX EX``); while it fails, this process
    de-duplicates alone. A key seen here recently is not even asked for again.
    """

    def __init__(self, claim: Claim | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._claim = claim
        self._clock = clock
        self._seen: dict[str, float] = {}

    async def first(self, key: str, seconds: int) -> bool:
        if not key:
            return True
        now = self._clock()
        if self._seen.get(key, 0.0) > now:
            return False
        if len(self._seen) >= LOCAL_DEDUPE_MAX:
            self._seen = {k: end for k, end in self._seen.items() if end > now}
            while len(self._seen) >= LOCAL_DEDUPE_MAX:
                self._seen.pop(next(iter(self._seen)))
        self._seen[key] = now + seconds
        if self._claim is None:
            return True
        try:
            return await self._claim(key, seconds)
        except StorageError:
            return True


class AlertDispatcher:
    """The event sink and the delivery task (see the module docstring)."""

    def __init__(
        self,
        channels: Sequence[AlertChannel],
        *,
        dedupe: Deduper | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.channels = tuple(channels)
        self.dedupe = dedupe or Deduper(None)
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(queue_size)
        self.dropped = 0
        self.sent = 0
        self.failed = 0

    def __call__(self, event: Event) -> None:
        """The ``EventBus`` sink: rules and a queue put, nothing that waits."""
        alert = alert_for(event)
        if alert is None:
            return
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.dropped += 1

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def deliver(self, alert: Alert) -> dict[str, str]:
        """Send ``alert`` through every channel at once; channel name -> error (``""``: sent)."""
        results = await asyncio.gather(
            *(channel.send(alert) for channel in self.channels), return_exceptions=True
        )
        outcome: dict[str, str] = {}
        for channel, result in zip(self.channels, results, strict=True):
            if isinstance(result, BaseException):
                self.failed += 1
                outcome[channel.name] = str(result) or type(result).__name__
                log.warning(
                    "alert not delivered",
                    extra=log_fields(rule=alert.rule, channel=channel.name, error=str(result)),
                )
            else:
                self.sent += 1
                outcome[channel.name] = ""
        return outcome

    async def run(self) -> None:
        """Deliver queued alerts until cancelled: de-duplicate, then every channel."""
        while True:
            alert = await self._queue.get()
            try:
                if await self.dedupe.first(alert.dedupe, alert.dedupe_seconds):
                    await self.deliver(alert)
            except Exception:
                log.exception("alert delivery failed", extra=log_fields(rule=alert.rule))
            honour_cancellation()

    async def drain(self) -> None:
        """Deliver what is queued now (shutdown, tests)."""
        while not self._queue.empty():
            alert = self._queue.get_nowait()
            if await self.dedupe.first(alert.dedupe, alert.dedupe_seconds):
                await self.deliver(alert)

    async def close(self) -> None:
        for channel in self.channels:
            with contextlib.suppress(Exception):
                await channel.close()


def sample_alert() -> Alert:
    """What ``guard alerts test`` sends through every channel."""
    event = Event(
        EventKind.SPEND_WARNING,
        Reason.DAILY_LIMIT_EXTENSION,
        "example",
        "1001",
        "192.0.2.10",
        "test",
        {"spent": 400_000, "limit": 500_000, "percent": 80, "day": _utc_day(time.time())},
    )
    return Alert(
        "test",
        Severity.WARNING,
        "test alert from guard",
        "if you read this, this channel works",
        event=event,
    )


def channels_from_settings(settings: Settings) -> list[AlertChannel]:
    """The log, every configured webhook, and e-mail when a server and recipients are set."""
    channels: list[AlertChannel] = [LogChannel()]
    channels += [
        WebhookChannel(
            url, timeout=settings.alert_webhook_timeout, retries=settings.alert_webhook_retries
        )
        for url in settings.alert_webhooks
    ]
    if settings.alert_smtp_host and settings.alert_smtp_to:
        channels.append(
            EmailChannel(
                SmtpSettings(
                    host=settings.alert_smtp_host,
                    port=settings.alert_smtp_port,
                    sender=settings.alert_smtp_from,
                    recipients=settings.alert_smtp_to,
                    user=settings.alert_smtp_user,
                    password=settings.alert_smtp_password,
                    security=settings.alert_smtp_security,
                )
            )
        )
    return channels
