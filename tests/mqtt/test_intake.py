"""Readings over MQTT, through a real Mosquitto into a real Pulse server: stored once,
acknowledged only after commit, bad input answered on the device's errors topic, and
the events on the streams like any other."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from pulse.mqtt.intake import MAX_PAYLOAD
from pulse.mqtt.link import MAX_PACKET_SIZE
from tests.mqtt.broker import Device, Mosquitto, closing
from tests.mqtt.support import (
    DEVICES,
    STATUS,
    Pulse,
    metric,
    mqtt_settings,
    mqtt_status,
    rows,
    until_rows,
    wait_subscribed,
)
from tests.streams.ws_support import V2_PATH, open_ws, recv, request
from tests.support import running_server, sse_events, until


async def test_a_reading_is_stored_and_streamed(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    reader = {"Authorization": f"Bearer {make_token('t1')}"}
    with closing(device):
        assert not (await device.connect()).is_failure
        async with pulse.http.stream(
            "GET", "/api/v1/customer/telemetry/stream/sse", headers=reader
        ) as response:
            events = sse_events(response)
            reason = await device.publish(
                "pulse/t1/dev-1/telemetry", b'{"metrics": {"temp": 21.5}, "seq": 7}'
            )
            assert not reason.is_failure
            event = await asyncio.wait_for(anext(events), 10)
    assert event.json()["device_id"] == "dev-1"
    assert event.json()["data"]["metrics"] == {"temp": 21.5}
    assert await rows(pool) == [{"device_id": "dev-1", "seq": 7, "metrics": '{"temp": 21.5}'}]


async def test_a_second_delivery_of_a_seq_is_stored_once(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    with closing(device):
        await device.connect()
        for seq in (1, 2, 1, 3, 2):
            body = json.dumps({"metrics": {"n": seq}, "seq": seq}).encode()
            await device.publish("pulse/t1/dev-1/telemetry", body)
        await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"n": 4}}')
        await until_rows(pool, 4)
        metrics = (await pulse.http.get("/metrics")).text
    assert [r["seq"] for r in await rows(pool)] == [1, 2, 3, None]
    assert metric(metrics, 'pulse_mqtt_messages_total{outcome="duplicate"}') == 2


async def test_heartbeat_marks_the_device_seen(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    with closing(device):
        await device.connect()
        await device.publish("pulse/t1/dev-1/heartbeat", b"")

        async def seen() -> bool:
            return bool(await pool.fetchval("SELECT last_seen_at IS NOT NULL FROM devices"))

        async with asyncio.timeout(10):
            while not await seen():  # noqa: ASYNC110  the row has no event of its own
                await asyncio.sleep(0.02)
    assert await rows(pool) == []


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{not json", "invalid_payload"),
        (b'{"metrics": {"temp": "warm"}}', "invalid_payload"),
        (json.dumps({"metrics": {f"m{i}": i for i in range(201)}}).encode(), "invalid_payload"),
        # Refused before it was read, it still says which reading it was.
        (b'{"metrics": {"temp": "warm"}, "seq": 7}', "invalid_payload"),
        (b'{"metrics": {"temp": 1}, "colour": "red", "seq": 8}', "invalid_payload"),
        # A number beyond a double: its seq was lost with it (the review of 7 December).
        (b'{"metrics": {"temp": 1e400}, "seq": 17}', "invalid_payload"),
    ],
)
async def test_bad_input_is_acknowledged_answered_and_counted(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool, payload: bytes, error: str
) -> None:
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    with closing(device):
        await device.connect()
        assert not any(r.is_failure for r in await device.subscribe("pulse/t1/dev-1/errors"))
        await device.publish("pulse/t1/dev-1/telemetry", payload)
        await until(lambda: bool(device.received), 10)
        # What comes after it is not held up behind it.
        await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"ok": 1}}')
        await until_rows(pool, 1)
        metrics = (await pulse.http.get("/metrics")).text
    topic, body = device.received[0]
    assert topic == "pulse/t1/dev-1/errors"
    answer = json.loads(body)
    seq = json.loads(payload).get("seq") if payload.startswith(b'{"') else None
    assert answer == {"error": error, "detail": answer["detail"]} | ({"seq": seq} if seq else {})
    assert metric(metrics, 'pulse_mqtt_messages_total{outcome="rejected"}') == 1
    assert metric(metrics, f'pulse_ingest_rejected_total{{reason="{error}"}}') == 1


async def test_a_payload_not_in_utf8_is_answered_so(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    """Not orjson's words ("str is not valid UTF-8: surrogates not allowed"), but the
    device's problem, in its terms."""
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    with closing(device):
        await device.connect()
        assert not any(r.is_failure for r in await device.subscribe("pulse/t1/dev-1/errors"))
        await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"t\xff": 1}, "seq": 3}')
        await until(lambda: bool(device.received), 10)
    answer = json.loads(device.received[0][1])
    assert answer["error"] == "invalid_payload"
    assert answer["detail"] == "The payload is not valid UTF-8; send JSON in UTF-8."
    assert await rows(pool) == []


async def test_readings_wait_while_the_database_is_read_only(
    pulse: Pulse, mosquitto: Mosquitto, pg_admin_dsn: str, database_url: str
) -> None:
    """A failover onto a server still read-only: the write fails with a read-only error,
    which used to be answered internal_error and acknowledged, the readings dropped.
    The database is unavailable: the readings wait (unacknowledged) and are stored once
    it is back, each once, with nothing on the device's errors topic."""
    token = await pulse.device("dev-1")
    name = urlsplit(database_url).path.lstrip("/")
    terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1"
    admin = await asyncpg.connect(pg_admin_dsn)
    device = Device(mosquitto, "t1/dev-1", token)
    try:
        with closing(device):
            await device.connect()
            assert not any(r.is_failure for r in await device.subscribe("pulse/t1/dev-1/errors"))
            await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            await admin.execute(terminate, name)
            for seq in range(1, 6):
                body = json.dumps({"metrics": {"n": seq}, "seq": seq}).encode()
                await device.publish("pulse/t1/dev-1/telemetry", body)
            # A write tried on a read-only connection, and rolled back.
            async with asyncio.timeout(20):
                while not await admin.fetchval(  # noqa: ASYNC110
                    """SELECT count(*) FROM pg_stat_activity
                        WHERE datname = $1 AND query = 'ROLLBACK'""",
                    name,
                ):
                    await asyncio.sleep(0.02)
            await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await admin.execute(terminate, name)  # sessions keep the default they began with
            conn = await asyncpg.connect(database_url)
            try:
                await until_rows(conn, 5, timeout=30)  # type: ignore[arg-type]
                stored = await rows(conn)  # type: ignore[arg-type]
            finally:
                await conn.close()
        assert [r["seq"] for r in stored] == [1, 2, 3, 4, 5]
        assert device.received == []
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await admin.close()


async def cancel_waiting_writes(locker: asyncpg.Connection, times: int) -> None:
    """Cancel ``times`` statements waiting on a lock that ``locker`` holds (a write of
    the tenant whose row it locked), each as soon as one waits."""
    waiting = """SELECT bool_or(pg_cancel_backend(pid)) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND pid <> pg_backend_pid()"""
    for _ in range(times):
        async with asyncio.timeout(10):
            while not await locker.fetchval(waiting):  # noqa: ASYNC110  (no event to wait on)
                await asyncio.sleep(0.02)


async def test_readings_whose_statement_is_cancelled_are_written_again(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool, database_url: str
) -> None:
    """A write whose statement the database cancels (57014: an operator's
    pg_cancel_backend, a statement_timeout) used to be answered internal_error and
    acknowledged, the readings lost. It is tried again, however often it is cancelled,
    and stored once, with nothing on the device's errors topic."""
    token = await pulse.device("dev-1")
    locker = await asyncpg.connect(database_url)
    device = Device(mosquitto, "t1/dev-1", token)
    try:
        with closing(device):
            await device.connect()
            assert not any(r.is_failure for r in await device.subscribe("pulse/t1/dev-1/errors"))
            async with locker.transaction():
                # The write takes its ids under the tenant's row: it waits for this lock.
                await locker.execute("SELECT 1 FROM tenants WHERE tenant_id = 't1' FOR UPDATE")
                await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"n": 1}, "seq": 1}')
                await cancel_waiting_writes(locker, 3)
            await until_rows(pool, 1)
            await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"n": 2}, "seq": 2}')
            await until_rows(pool, 2)
    finally:
        await locker.close()
    assert [r["seq"] for r in await rows(pool)] == [1, 2]
    assert device.received == []


async def test_a_device_s_readings_commit_in_order_when_a_write_is_tried_again(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool, database_url: str
) -> None:
    """With one process a device's readings commit in the order it published them (docs/
    ingest.md), and so take ids in that order. A write tried again (its statement
    cancelled, here) used to be overtaken by the reading published after it, which wrote
    while the first waited to try again: an alert judged by the latest id then judged the
    device by its older reading."""
    token = await pulse.device("dev-1")
    locker = await asyncpg.connect(database_url)
    device = Device(mosquitto, "t1/dev-1", token)
    try:
        with closing(device):
            await device.connect()
            async with locker.transaction():
                await locker.execute("SELECT 1 FROM tenants WHERE tenant_id = 't1' FOR UPDATE")
                await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"n": 1}, "seq": 1}')
                # Cancelled four times, the first write now waits most of a second to try again.
                await cancel_waiting_writes(locker, 4)
                await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"n": 2}, "seq": 2}')
            await until_rows(pool, 2)
    finally:
        await locker.close()
    assert [r["seq"] for r in await rows(pool)] == [1, 2]  # in id order


async def test_readings_waiting_for_the_database_say_so_once_per_ten_seconds(
    pulse: Pulse,
    mosquitto: Mosquitto,
    pool: asyncpg.Pool,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each try of a write the database cannot serve used to log a warning (2226 lines in
    a 4 s outage): the log says it once per ten seconds, as for the other kinds."""
    token = await pulse.device("dev-1")
    locker = await asyncpg.connect(database_url)
    device = Device(mosquitto, "t1/dev-1", token)
    caplog.set_level(logging.WARNING, logger="pulse.mqtt.intake")
    try:
        with closing(device):
            await device.connect()
            async with locker.transaction():
                await locker.execute("SELECT 1 FROM tenants WHERE tenant_id = 't1' FOR UPDATE")
                await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"n": 1}, "seq": 1}')
                await cancel_waiting_writes(locker, 4)  # four tries cancelled, each waited out
            await until_rows(pool, 1)
    finally:
        await locker.close()
    said = [r for r in caplog.records if r.name == "pulse.mqtt.intake"]
    assert [r.getMessage().split(":")[0] for r in said] == ["MQTT readings wait for the database"]


@pytest.mark.broker_without_size_limit
async def test_a_payload_over_the_limit_is_answered_unread(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    """A payload over 1 MiB is answered payload_too_large without being parsed (it used to
    be parsed whole, on the event loop, to find its seq: three of 80 MB held the server up
    5 s), so the answer has no seq; what follows is stored."""
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    big = b'{"metrics": {"n": 1}, "seq": 7, "pad": "%s"}' % (b"x" * MAX_PAYLOAD)
    with closing(device):
        await device.connect()
        assert not any(r.is_failure for r in await device.subscribe("pulse/t1/dev-1/errors"))
        await device.publish("pulse/t1/dev-1/telemetry", big)
        await until(lambda: bool(device.received), 10)
        await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"n": 2}, "seq": 8}')
        await until_rows(pool, 1)
    answer = json.loads(device.received[0][1])
    assert answer == {"error": "payload_too_large", "detail": answer["detail"]}
    assert [r["seq"] for r in await rows(pool)] == [8]


@pytest.mark.broker_without_size_limit
async def test_a_packet_over_pulse_s_maximum_is_not_delivered_to_it(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    """Pulse tells the broker the largest packet it takes (MQTT 5 Maximum Packet Size):
    a message far over the payload limit is dropped by the broker, not read into Pulse's
    memory. The reading published after it (which would come after it) is stored."""
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    with closing(device):
        await device.connect()
        reconnects = (await mqtt_status(pulse.http))["reconnects"]
        huge = b"x" * (MAX_PACKET_SIZE + 1)
        await device.publish("pulse/t1/dev-1/telemetry", huge)
        await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"n": 2}, "seq": 8}')
        await until_rows(pool, 1)
        metrics = (await pulse.http.get("/metrics")).text
        status = await mqtt_status(pulse.http)
    assert metric(metrics, 'pulse_mqtt_messages_total{outcome="rejected"}') == 0
    assert metric(metrics, 'pulse_mqtt_messages_total{outcome="stored"}') == 1
    assert status["reconnects"] == reconnects  # not disconnected for it either


async def test_the_broker_refuses_a_payload_over_the_limit_at_the_door(
    pulse: Pulse, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The test's (and `pulse demo`'s) broker is configured as docs/ingest.md asks, with
    message_size_limit: a payload over 1 MiB is refused in the device's PUBACK (149,
    "packet too large"), never queued for Pulse. Without it the broker acknowledged a
    17 MiB payload (Success) and then dropped it (the MQTT audit)."""
    if shutil.which("mosquitto_pub") is None:
        message = "mosquitto_pub is missing: apt-get install mosquitto-clients (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    token = await pulse.device("dev-1")
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * (MAX_PAYLOAD + 1))
    command = ["mosquitto_pub", "-d", "-V", "mqttv5", "-q", "1", "-h", "127.0.0.1"]
    command += ["-p", str(mosquitto.port), "-i", "t1/dev-1", "-u", "t1/dev-1", "-P", token]
    command += ["-t", "pulse/t1/dev-1/telemetry", "-f", str(big)]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    said, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert "received PUBACK (Mid: 1, RC:149)" in said.decode(), said.decode()
    metrics = (await pulse.http.get("/metrics")).text
    assert metric(metrics, 'pulse_mqtt_messages_total{outcome="rejected"}') == 0


async def test_an_unknown_device_is_answered(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    """A client the broker knows but Pulse does not (here: the device was deleted from
    Pulse's table behind the broker's back) is answered unknown_device."""
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    with closing(device):
        await device.connect()
        await device.subscribe("pulse/t1/dev-1/errors")
        await pool.execute("DELETE FROM devices")
        await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"temp": 1}}')
        await until(lambda: bool(device.received), 10)
    assert json.loads(device.received[0][1])["error"] == "unknown_device"
    assert await rows(pool) == []


@contextlib.asynccontextmanager
async def slow_device(
    settings: Settings, mosquitto: Mosquitto, make_token: Callable[..., str]
) -> AsyncIterator[tuple[httpx.AsyncClient, Device]]:
    """A server whose devices may send one reading now and then one a hundred seconds,
    and its device t1/dev-1 connected over MQTT, reading its errors topic."""
    limited = dataclasses.replace(
        mqtt_settings(settings, mosquitto), ingest_rate_per_device=0.01, ingest_burst_per_device=1
    )
    async with (
        running_server(limited) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        await wait_subscribed(http)
        admin = {"Authorization": f"Bearer {make_token('t1', ('tenant-admin',))}"}
        r = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
        device = Device(mosquitto, "t1/dev-1", r.json()["provision_token"])
        with closing(device):
            await device.connect()
            await device.subscribe("pulse/t1/dev-1/errors")
            yield http, device


async def test_over_the_rate_limit_is_answered_with_when_to_retry(
    settings: Settings, mosquitto: Mosquitto, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """Rate limits hold over MQTT as over HTTP: the reading over the limit is acknowledged,
    not stored, and answered rate_limited, with when to retry."""
    async with slow_device(settings, mosquitto, make_token) as (_, device):
        for n in (1, 2):
            body = b'{"metrics": {"n": %d}, "seq": %d}' % (n, 40 + n)
            await device.publish("pulse/t1/dev-1/telemetry", body)
        await until(lambda: bool(device.received), 10)
    answer = json.loads(device.received[0][1])
    assert answer["error"] == "rate_limited"
    assert answer["seq"] == 42  # which reading to publish again
    # The wait, said once (it was said twice, rounded two ways: "retry in 2 s. Retry after 1 s.").
    assert re.search(r"retry in \d+ s\.$", answer["detail"]), answer["detail"]
    assert answer["detail"].lower().count("retry") == 1
    assert [r["metrics"] for r in await rows(pool)] == ['{"n": 1}']


async def test_a_stored_reading_delivered_again_over_the_limit_is_a_duplicate(
    settings: Settings, mosquitto: Mosquitto, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """A second delivery of a stored reading (the same seq) is a duplicate, though the
    device's bucket is empty: not a rate_limited error for a reading that was stored."""
    async with slow_device(settings, mosquitto, make_token) as (http, device):

        async def settled() -> dict[str, float]:
            text = (await http.get("/metrics")).text
            return {
                outcome: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                for outcome in ("stored", "duplicate", "rejected")
                if line.startswith(f'pulse_mqtt_messages_total{{outcome="{outcome}"}}')
            }

        for seq, n in ((7, 1), (7, 1), (8, 2)):  # seq 7 twice: a second delivery
            payload = b'{"metrics": {"n": %d}, "seq": %d}' % (n, seq)
            await device.publish("pulse/t1/dev-1/telemetry", payload)
        async with asyncio.timeout(10):
            while sum((counts := await settled()).values()) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await until(lambda: bool(device.received), 10)
    assert counts == {"stored": 1, "duplicate": 1, "rejected": 1}
    assert [json.loads(m[1])["error"] for m in device.received] == ["rate_limited"]  # seq 8
    assert [r["metrics"] for r in await rows(pool)] == ['{"n": 1}']


async def test_alert_rules_see_mqtt_readings(pulse: Pulse, mosquitto: Mosquitto) -> None:
    """The same writer hook as HTTP: a reading over MQTT above a rule's threshold opens an
    alert, committed with it."""
    rule = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 30, "severity": 4}
    r = await pulse.http.post("/api/v1/customer/alert-rules", json=rule, headers=pulse.admin)
    assert r.status_code == 201, r.text
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    with closing(device):
        await device.connect()
        await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"temp": 35}, "seq": 1}')

        async def alerts() -> list[dict[str, object]]:
            r = await pulse.http.get(
                "/api/v1/customer/alerts", params={"status": "active"}, headers=pulse.admin
            )
            return list(r.json()["alerts"])

        async with asyncio.timeout(10):
            while not await alerts():  # noqa: ASYNC110  the alert has no event of its own here
                await asyncio.sleep(0.02)
    (alert,) = await alerts()
    assert (alert["device_id"], alert["alert_type"]) == ("dev-1", "THRESHOLD")


async def test_a_broker_away_at_start_is_waited_for(
    settings: Settings, mosquitto: Mosquitto, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """Pulse starts and serves without its broker, and consumes once the broker is up."""
    await mosquitto.stop()
    async with (
        running_server(mqtt_settings(settings, mosquitto)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get(STATUS)).json()["mqtt"]["connected"] is False
        await mosquitto.start()
        await wait_subscribed(http)
        admin = {"Authorization": f"Bearer {make_token('t1', ('tenant-admin',))}"}
        r = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
        device = Device(mosquitto, "t1/dev-1", r.json()["provision_token"])
        with closing(device):
            assert not (await device.connect()).is_failure
            await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"n": 1}}')
            await until_rows(pool, 1)


async def test_the_legacy_v2_websocket_pushes_mqtt_readings(
    pulse: Pulse, mosquitto: Mosquitto, make_token: Callable[..., str]
) -> None:
    token = await pulse.device("dev-1")
    device = Device(mosquitto, "t1/dev-1", token)
    async with open_ws(pulse.url, V2_PATH, token=make_token("t1")) as ws:
        subscribe = {"action": "subscribe", "type": "device", "device_id": "dev-1"}
        assert (await request(ws, subscribe))["type"] == "subscribed"
        with closing(device):
            await device.connect()
            await device.publish("pulse/t1/dev-1/telemetry", b'{"metrics": {"v2": 2}}')
            async with asyncio.timeout(10):
                while (message := await recv(ws))["type"] != "telemetry":
                    pass
    assert (message["device_id"], message["data"]["metrics"]) == ("dev-1", {"v2": 2})
