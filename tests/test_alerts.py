"""Alerts: the rules, de-duplication across guards (real Redis), webhook and SMTP delivery."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from email import message_from_bytes
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from factories import UK_MOBILE, make_attempt, make_extension, make_snapshot, money
from ledger_support import free_port

from guard.alerts import (
    Alert,
    AlertDeliveryError,
    AlertDispatcher,
    Deduper,
    EmailChannel,
    LogChannel,
    Severity,
    SmtpSettings,
    WebhookChannel,
    alert_for,
    channels_from_settings,
    sample_alert,
)
from guard.domain import Reason
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.errors import StorageError
from guard.events import Event, EventBus, EventKind
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.settings import load_settings

HOSTILE = 'Evil", "9999", "x" ip=6.6.6.6 %0A\r\nBcc: victim@example.com'


@pytest.fixture
async def ledger(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    store = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    yield store
    await store.close()


class Recorder:
    """A channel that keeps what it was sent."""

    name = "recorder"

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    async def send(self, alert: Alert) -> None:
        self.alerts.append(alert)

    async def close(self) -> None:
        return None


# --- rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "rule"),
    [
        (Event(EventKind.SPEND_WARNING, "daily_limit_extension", "acme", "1001"), "spend_warning"),
        (Event(EventKind.REFUSED, "daily_limit_tenant", "acme", "1001"), "spend_limit"),
        (Event(EventKind.LOCKED, "user_agent_mismatch", "acme", "1001"), "extension_locked"),
        (Event(EventKind.REFUSED, "scanner_user_agent", "acme", "1", "6.6.6.6"), "scanner_seen"),
        (Event(EventKind.IP_BLOCKED, "too_many_refusals", source_ip="6.6.6.6"), "ip_blocked"),
        (Event(EventKind.STORE_UNAVAILABLE, "store_unavailable"), "store_unavailable"),
        (Event(EventKind.FAIL_OPEN, "store_unavailable"), "store_unavailable"),
        (Event(EventKind.OVER_RESERVATION, "call_outlived_limit", "acme"), "over_reservation"),
    ],
)
def test_each_rule_raises_its_alert(event: Event, rule: str) -> None:
    alert = alert_for(event)
    assert alert is not None and alert.rule == rule


@pytest.mark.parametrize(
    "event",
    [
        Event(EventKind.REFUSED, "no_rate", "acme", "1001"),
        Event(EventKind.SWEPT, "reservation_expired", "acme"),
        Event(EventKind.ADMIN, "", "acme"),
    ],
)
def test_other_events_raise_nothing(event: Event) -> None:
    assert alert_for(event) is None


def test_a_limit_alert_is_one_per_extension_per_day_and_one_per_tenant() -> None:
    at = 1_717_588_800.0
    first = alert_for(Event(EventKind.REFUSED, "daily_limit_extension", "acme", "1001", at=at))
    again = alert_for(Event(EventKind.REFUSED, "daily_limit_extension", "acme", "1001", at=at + 60))
    other = alert_for(Event(EventKind.REFUSED, "daily_limit_extension", "acme", "1002", at=at))
    tenant_a = alert_for(Event(EventKind.REFUSED, "daily_limit_tenant", "acme", "1001", at=at))
    tenant_b = alert_for(Event(EventKind.REFUSED, "daily_limit_tenant", "acme", "1002", at=at))
    next_day = alert_for(
        Event(EventKind.REFUSED, "daily_limit_extension", "acme", "1001", at=at + 86_400)
    )
    assert first and again and other and tenant_a and tenant_b and next_day
    assert first.dedupe == again.dedupe != other.dedupe
    assert tenant_a.dedupe == tenant_b.dedupe != first.dedupe
    assert next_day.dedupe != first.dedupe


def test_hostile_text_never_breaks_a_mail_header() -> None:
    event = Event(EventKind.LOCKED, HOSTILE, HOSTILE, HOSTILE, "6.6.6.6", detail={"ua": HOSTILE})
    alert = alert_for(event)
    assert alert is not None
    message = EmailChannel(SmtpSettings("mail", recipients=("ops@example.com",))).message(alert)
    raw = message.as_bytes()
    parsed = message_from_bytes(raw)
    assert parsed["Bcc"] is None and b"\nBcc:" not in raw
    assert "\\r\\nBcc" in " ".join(str(parsed["Subject"]).split())
    assert json.loads(json.dumps(alert.payload()))["event"]["tenant"] == HOSTILE


# --- the spend warning, from the engine --------------------------------------------------------


async def test_the_spend_warning_fires_once_a_day_from_settled_spend(ledger: RedisLedger) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.add_sink(seen.append)
    snapshot = make_snapshot(extensions=[make_extension("1001", daily_limit=money("1"))])
    engine = Engine(SnapshotHolder(snapshot), ledger, bus, EngineSettings(spend_warn_percent=80))
    first = await engine.authorize(make_attempt(number=UK_MOBILE, call_id="a"))
    await engine.settle("acme", "a", 8 * 60)  # 0.80 of 1.00
    assert [e.kind for e in seen] == []
    for call_id in ("b", "c"):
        decision = await engine.authorize(make_attempt(number=UK_MOBILE, call_id=call_id))
        await engine.settle("acme", call_id, 0)
        assert decision.allowed
    warnings = [e for e in seen if e.kind == EventKind.SPEND_WARNING]
    assert len(warnings) == 1 and first.allowed
    assert (warnings[0].extension, warnings[0].detail["percent"]) == ("1001", 80)
    assert warnings[0].reason == Reason.DAILY_LIMIT_EXTENSION


# --- de-duplication ----------------------------------------------------------------------------


async def test_two_guards_send_a_deduplicated_alert_once(ledger: RedisLedger) -> None:
    recorders = [Recorder(), Recorder()]
    guards = [AlertDispatcher([r], dedupe=Deduper(ledger.claim_once)) for r in recorders]
    event = Event(EventKind.LOCKED, "user_agent_mismatch", "acme", "1001", "192.0.2.1")
    for dispatcher in guards:
        for _ in range(3):
            dispatcher(event)
    for dispatcher in guards:
        await dispatcher.drain()
    assert sum(len(r.alerts) for r in recorders) == 1


async def test_store_down_still_alerts_deduplicated_in_process(key_prefix: str) -> None:
    dead = ledger_from_url("redis://127.0.0.1:1/0", prefix=key_prefix, timeout=0.05)
    recorder = Recorder()
    dispatcher = AlertDispatcher([recorder], dedupe=Deduper(dead.claim_once))
    for _ in range(5):
        dispatcher(Event(EventKind.STORE_UNAVAILABLE, "store_unavailable", detail={"error": "x"}))
    await dispatcher.drain()
    await dead.close()
    assert [a.rule for a in recorder.alerts] == ["store_unavailable"]


async def test_the_sink_never_waits_and_counts_what_it_drops() -> None:
    dispatcher = AlertDispatcher([Recorder()], queue_size=2)
    for n in range(5):
        dispatcher(Event(EventKind.OVER_RESERVATION, "x", "acme", call_id=str(n)))
    assert (dispatcher.pending, dispatcher.dropped) == (2, 3)


async def test_a_failing_claim_is_not_fatal() -> None:
    async def broken(key: str, seconds: int) -> bool:
        raise StorageError("down")

    dedupe = Deduper(broken)
    assert await dedupe.first("k", 60)
    assert not await dedupe.first("k", 60)


# --- channels ----------------------------------------------------------------------------------


class Hook:
    """A local webhook receiver that fails its first ``failures`` requests with ``status``."""

    def __init__(self, failures: int = 0, status: int = 503, delay: float = 0.0) -> None:
        self.failures = failures
        self.status = status
        self.delay = delay
        self.bodies: list[dict[str, Any]] = []
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.calls <= self.failures:
            return web.Response(status=self.status)
        self.bodies.append(await request.json())
        return web.Response(text="ok")


@pytest.fixture
async def hook_server() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(hook: Hook) -> str:
        app = web.Application()
        app.router.add_post("/hook/{token}", hook.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/hook/s3cret-token"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_a_webhook_is_retried_with_backoff_until_it_answers(hook_server: Any) -> None:
    hook = Hook(failures=2)
    channel = WebhookChannel(await hook_server(hook), retries=3, backoff=0.01)
    await channel.send(sample_alert())
    await channel.close()
    assert hook.calls == 3
    assert hook.bodies[0]["rule"] == "test" and hook.bodies[0]["event"]["tenant"] == "example"
    assert "s3cret" not in channel.name


async def test_a_webhook_gives_up_on_a_client_error_and_after_its_retries(
    hook_server: Any,
) -> None:
    refused = Hook(failures=99, status=403)
    channel = WebhookChannel(await hook_server(refused), retries=3, backoff=0.01)
    with pytest.raises(AlertDeliveryError, match="HTTP 403"):
        await channel.send(sample_alert())
    assert refused.calls == 1
    slow = Hook(delay=1.0)
    channel_slow = WebhookChannel(await hook_server(slow), timeout=0.1, retries=1, backoff=0.01)
    with pytest.raises(AlertDeliveryError, match="Timeout"):
        await channel_slow.send(sample_alert())
    await channel.close()
    await channel_slow.close()


class Inbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


async def test_an_alert_goes_out_by_email(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    settings = SmtpSettings(
        "127.0.0.1",
        port,
        sender="guard@example.com",
        recipients=("ops@example.com",),
        password="hunter2",
        security="none",
    )
    assert "hunter2" not in repr(settings)
    await EmailChannel(settings).send(sample_alert())
    message = message_from_bytes(inbox.messages[0])
    assert message["Subject"] == "[guard warning] test alert from guard"
    assert message["To"] == "ops@example.com"


async def test_an_unreachable_mail_server_is_a_delivery_error() -> None:
    channel = EmailChannel(SmtpSettings("127.0.0.1", 1, recipients=("a@b.c",), security="none"))
    with pytest.raises(AlertDeliveryError, match=r"e-mail 127\.0\.0\.1:1"):
        await channel.send(sample_alert())


async def test_the_log_channel_writes_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="guard.alerts"):
        await LogChannel().send(sample_alert())
    assert [r.getMessage() for r in caplog.records] == ["alert"]


async def test_every_configured_channel_gets_the_test_alert(
    hook_server: Any, smtp: tuple[Inbox, int]
) -> None:
    hook = Hook()
    inbox, port = smtp
    settings = load_settings(
        {
            "GUARD_ALERT_WEBHOOKS": await hook_server(hook),
            "GUARD_ALERT_SMTP_HOST": "127.0.0.1",
            "GUARD_ALERT_SMTP_PORT": str(port),
            "GUARD_ALERT_SMTP_SECURITY": "none",
            "GUARD_ALERT_SMTP_TO": "ops@example.com",
            "GUARD_ALERT_SMTP_PASSWORD": "hunter2",
        }
    )
    assert "hunter2" not in str(settings.public())
    assert "s3cret" not in str(settings.public())
    dispatcher = AlertDispatcher(channels_from_settings(settings))
    outcome = await dispatcher.deliver(sample_alert())
    await dispatcher.close()
    assert list(outcome.values()) == ["", "", ""]
    assert len(hook.bodies) == 1 and len(inbox.messages) == 1


def test_an_alert_payload_is_plain_json() -> None:
    alert = Alert("r", Severity.CRITICAL, "t", "x")
    assert json.loads(json.dumps(alert.payload()))["text"] == "[critical] t: x"
