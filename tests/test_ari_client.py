"""The ARI client against the local stand-in: REST errors typed as Asterisk 16.0.1 answers them,
credentials only in the Authorization header, the events socket reconnecting, bounded handlers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path

import aiohttp
import pytest

from guard.ari.client import (
    AriAuthError,
    AriClient,
    AriEvent,
    AriTimeout,
    AriUnavailable,
    Backoff,
    ChannelNotFound,
    basic_authorization,
)
from guard.ari.testing import AriStandIn
from guard.errors import ConfigurationError, ValidationError

PASSWORD = "s3cret-Pa55"
FAST = Backoff(base=0.01, cap=0.05)


@pytest.fixture
async def ari() -> AsyncIterator[AriStandIn]:
    async with AriStandIn(username="guard", password=PASSWORD) as standin:
        yield standin


@pytest.fixture
async def client(ari: AriStandIn) -> AsyncIterator[AriClient]:
    async with AriClient(ari.base_url, "guard", PASSWORD, backoff=FAST) as ari_client:
        yield ari_client


def recorded_rest(shared_dir: Path) -> list[dict[str, object]]:
    lines = (shared_dir / "asterisk" / "ari-session.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "rest" in entry]


async def test_standin_answers_unknown_channels_like_the_recording(
    ari: AriStandIn, shared_dir: Path
) -> None:
    recorded = [r for r in recorded_rest(shared_dir) if "/nope" in str(r["rest"])]
    assert len(recorded) == 3
    headers = {"Authorization": basic_authorization("guard", PASSWORD)}
    async with aiohttp.ClientSession(headers=headers) as http:
        for entry in recorded:
            method, path = str(entry["rest"]).split(" ", 1)
            params = entry["params"] or {}
            assert isinstance(params, dict)
            async with http.request(method, ari.base_url + path, params=params) as response:
                assert response.status == entry["status"]
                assert await response.text() == entry["body"]


async def test_standin_refuses_rejected_hangup_reason_like_the_recording(
    ari: AriStandIn, shared_dir: Path
) -> None:
    recorded = next(r for r in recorded_rest(shared_dir) if r["params"] == {"reason": "rejected"})
    channel = ari.add_channel()
    headers = {"Authorization": basic_authorization("guard", PASSWORD)}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.delete(f"{ari.base_url}/channels/{channel.id}", params={"reason": "rejected"}) as resp,
    ):
        assert (resp.status, await resp.text()) == (recorded["status"], recorded["body"])


async def test_get_variable_value_unset_and_unknown_channel(
    ari: AriStandIn, client: AriClient
) -> None:
    channel = ari.add_channel(variables={"CHANNEL(recvip)": "127.0.0.7"})
    assert await client.get_variable(channel.id, "CHANNEL(recvip)") == "127.0.0.7"
    assert await client.get_variable(channel.id, "NO_SUCH") is None
    with pytest.raises(ChannelNotFound) as caught:
        await client.get_variable("nope", "X")
    assert caught.value.channel_id == "nope"
    assert caught.value.detail == "Provided channel was not found"


async def test_rest_calls_on_a_missing_channel_raise_channel_not_found(
    client: AriClient,
) -> None:
    with pytest.raises(ChannelNotFound):
        await client.set_variable("nope", "X", "1")
    with pytest.raises(ChannelNotFound):
        await client.continue_in_dialplan("nope")
    with pytest.raises(ChannelNotFound):
        await client.hangup("nope", "congestion")
    with pytest.raises(ChannelNotFound):
        await client.subscribe("guard", "channel:nope")


async def test_invalid_hangup_reason_is_refused_before_sending(
    ari: AriStandIn, client: AriClient
) -> None:
    channel = ari.add_channel()
    with pytest.raises(ValidationError) as caught:
        await client.hangup(channel.id, "rejected")
    assert caught.value.field == "reason"
    assert ari.calls == []


async def test_rest_helpers_send_what_asterisk_expects(ari: AriStandIn, client: AriClient) -> None:
    channel = ari.add_channel()
    ari.enter_stasis(channel, [])
    body = await client.subscribe("guard", f"channel:{channel.id}")
    assert body["channel_ids"] == [channel.id]
    await client.set_variable(channel.id, "TIMEOUT(absolute)", "180")
    await client.continue_in_dialplan(channel.id, context="ctx", extension="s", priority=2)
    assert [c.id for c in ari.channels.values()] == [c["id"] for c in await client.list_channels()]
    await client.hangup(channel.id, "congestion")
    assert [(c.method, c.path, c.params, c.status) for c in ari.calls] == [
        ("POST", "/applications/guard/subscription", {"eventSource": f"channel:{channel.id}"}, 200),
        (
            "POST",
            f"/channels/{channel.id}/variable",
            {"variable": "TIMEOUT(absolute)", "value": "180"},
            204,
        ),
        (
            "POST",
            f"/channels/{channel.id}/continue",
            {"context": "ctx", "extension": "s", "priority": "2"},
            204,
        ),
        ("GET", "/channels", {}, 200),
        ("DELETE", f"/channels/{channel.id}", {"reason": "congestion"}, 204),
    ]
    assert all(call.authorized for call in ari.calls)


async def test_bad_credentials_are_a_clear_error(ari: AriStandIn) -> None:
    async with AriClient(ari.base_url, "guard", "wrong", backoff=FAST) as client:
        with pytest.raises(AriAuthError, match="credentials"):
            await client.list_channels()
        with pytest.raises(AriAuthError, match=r"ari\.conf"):
            await anext(aiter(client.events()))
    assert ari.connections == 0
    assert ari.socket_requests == [{"app": "guard", "subscribeAll": "false"}]


def test_credentials_never_in_the_url_nor_in_repr() -> None:
    with pytest.raises(ConfigurationError) as caught:
        AriClient(f"http://guard:{PASSWORD}@127.0.0.1:8088/ari", "guard", PASSWORD)
    assert PASSWORD not in str(caught.value)
    client = AriClient("http://127.0.0.1:8088/ari", "guard", PASSWORD)
    assert PASSWORD not in repr(client)


async def test_connection_refused_is_unavailable_and_retried_without_leaking_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ari"
    caplog.set_level(logging.DEBUG)
    async with AriClient(url, "guard", PASSWORD, backoff=FAST) as client:
        with pytest.raises(AriUnavailable, match="cannot reach ARI"):
            await client.list_channels()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                async for _ in client.events():
                    pass
    retries = [r for r in caplog.records if r.getMessage().endswith("retrying")]
    assert len(retries) >= 3
    assert PASSWORD not in caplog.text
    assert basic_authorization("guard", PASSWORD).split()[1] not in caplog.text


async def test_silent_server_times_out() -> None:
    release = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}/ari"
        async with AriClient(url, "guard", PASSWORD, timeout=0.2) as client:
            with pytest.raises(AriTimeout, match=r"within 0\.2 s"):
                await client.set_variable("1.1", "X", "1")
    finally:
        release.set()
        server.close()
        await server.wait_closed()


async def test_events_reconnect_after_the_socket_drops(ari: AriStandIn, client: AriClient) -> None:
    received: list[AriEvent] = []

    async def collect() -> None:
        async for event in client.events():
            received.append(event)

    task = asyncio.create_task(collect())
    try:
        await ari.wait_connected(1)
        first = ari.add_channel()
        ari.enter_stasis(first, ["a"])
        await ari.wait_for(lambda: len(received) == 1)
        assert client.generation == 1
        await ari.drop_sockets()
        await ari.wait_connected(2)
        second = ari.add_channel()
        ari.enter_stasis(second, ["b"])
        await ari.wait_for(lambda: len(received) == 2)
        assert [e["channel"]["id"] for e in received] == [first.id, second.id]
        assert client.generation == 2
        assert ari.socket_requests == [{"app": "guard", "subscribeAll": "false"}] * 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_malformed_messages_are_skipped(ari: AriStandIn, client: AriClient) -> None:
    received: list[AriEvent] = []

    async def collect() -> None:
        async for event in client.events():
            received.append(event)

    task = asyncio.create_task(collect())
    try:
        await ari.wait_connected()
        for raw in ("not json", "[1, 2]", '{"no": "type"}', '{"type": 7}', "\x00\ufffd"):
            ari.send_raw(raw)
        ari.push({"type": "Whatever"})
        await ari.wait_for(lambda: len(received) == 1)
        assert received == [{"type": "Whatever"}]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_run_bounds_concurrent_work_and_survives_failing_handlers(
    ari: AriStandIn, client: AriClient
) -> None:
    active = peak = done = 0

    async def work() -> None:
        nonlocal active, peak, done
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.005)
        active -= 1
        done += 1

    async def fail() -> None:
        raise RuntimeError("work bug")

    def handler(event: AriEvent) -> Coroutine[None, None, None] | None:
        if event["type"] == "Boom":
            raise RuntimeError("handler bug")
        if event["type"] == "Fail":
            return fail()
        if event["type"] == "Work":
            return work()
        return None

    task = asyncio.create_task(client.run(handler, max_concurrent=4))
    try:
        await ari.wait_connected()
        for kind in ("Boom", "Fail", "Ignored"):
            ari.push({"type": kind})
        for _ in range(40):
            ari.push({"type": "Work"})
        await ari.wait_for(lambda: done == 40)
        assert 2 <= peak <= 4
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
