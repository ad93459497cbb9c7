"""Client ids on a real Mosquitto (dynamic security) with a real Pulse server: a device
connects only under its own client id, ``<tenant_id>/<device_id>``.

From a security audit: device clients had no fixed client id, and a client id names a
session that a connection under it takes over. With any one device's token (any
tenant), a client connecting under Pulse's client id (which the unauthenticated status
endpoint showed) took Pulse's persistent session, its shared subscription to every
tenant's readings with it: the attacker received them, acknowledged them, and Pulse
never stored them (20 of 25 another tenant's readings received, 21 never stored).
Under another device's client id, it kicked that device off and took its session."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from pulse.mqtt import provision
from tests.mqtt.broker import Device, Mosquitto, closing
from tests.mqtt.support import (
    DEVICES,
    STATUS,
    Pulse,
    mqtt_settings,
    mqtt_status,
    rows,
    until_rows,
    wait_subscribed,
)
from tests.mqtt.test_provision import NOT_AUTHORIZED, Admin
from tests.support import provision_device, running_server, until


def reading(n: int) -> bytes:
    return json.dumps({"metrics": {"n": n}, "seq": n}).encode()


async def other_tenant_device(pulse: Pulse, make_token: Callable[..., str], device_id: str) -> str:
    """A device of tenant t2 (the fixture's admin is t1's); its token."""
    headers = {"Authorization": f"Bearer {make_token('t2', ('tenant-admin',))}"}
    r = await pulse.http.post(DEVICES, json={"device_id": device_id}, headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["provision_token"])


async def test_a_device_cannot_take_over_pulse_s_session(
    pulse: Pulse,
    mosquitto: Mosquitto,
    pool: asyncpg.Pool,
    settings: Settings,
    make_token: Callable[..., str],
) -> None:
    """The audit's takeover: refused at CONNECT, and Pulse keeps its session and stores
    every reading another tenant's device publishes meanwhile."""
    pulse_id = mqtt_settings(settings, mosquitto).mqtt_client_id
    assert pulse_id is not None
    attacker_token = await pulse.device("a")
    victim = Device(mosquitto, "t2/v", await other_tenant_device(pulse, make_token, "v"))
    before = (await mqtt_status(pulse.http))["reconnects"]
    attacker = Device(mosquitto, "t1/a", attacker_token, client_id=pulse_id)
    with closing(victim, attacker):
        assert not (await victim.connect()).is_failure
        for n in range(1, 6):
            assert not (await victim.publish("pulse/t2/v/telemetry", reading(n))).is_failure
        assert (await attacker.connect()).value == NOT_AUTHORIZED
        assert attacker.received == []
        for n in range(6, 26):
            assert not (await victim.publish("pulse/t2/v/telemetry", reading(n))).is_failure
        await until_rows(pool, 25)
    assert sorted(r["seq"] for r in await rows(pool)) == list(range(1, 26))
    status = await mqtt_status(pulse.http)
    assert status["connected"] and status["reconnects"] == before  # never kicked off


async def test_a_device_cannot_take_another_tenant_s_device_s_session(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """The audit's cross-tenant kick: refused, and the victim stays connected."""
    attacker_token = await pulse.device("a")
    victim = Device(mosquitto, "t2/v", await other_tenant_device(pulse, make_token, "v"))
    attacker = Device(mosquitto, "t1/a", attacker_token, client_id="t2/v")
    disconnects: list[Any] = []
    victim.client.on_disconnect = lambda *args: disconnects.append(args)
    with closing(victim, attacker):
        assert not (await victim.connect()).is_failure
        assert (await attacker.connect()).value == NOT_AUTHORIZED
        # After the refusal: the victim's connection still carries its readings.
        assert not (await victim.publish("pulse/t2/v/telemetry", reading(1))).is_failure
        await until_rows(pool, 1)
        assert victim.client.is_connected()
        assert disconnects == []


async def test_a_device_connects_under_its_own_client_id_only(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    token = await pulse.device("a")
    own = Device(mosquitto, "t1/a", token)  # client id "t1/a", as every Device by default
    assert own.client._client_id == b"t1/a"
    other = Device(mosquitto, "t1/a", token, client_id="device-1234")
    with closing(own, other):
        assert (await other.connect()).value == NOT_AUTHORIZED
        assert not (await own.connect()).is_failure
        assert not (await own.publish("pulse/t1/a/telemetry", reading(1))).is_failure
        await until_rows(pool, 1)


async def test_device_clients_made_without_a_client_id_get_theirs_at_the_next_connection(
    settings: Settings, mosquitto: Mosquitto, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device client an older Pulse made (in the device's role, no client id) is given
    ``<tenant_id>/<device_id>`` when Pulse connects, and the broker drops its connection
    under another id; an operator's own ``<a>/<b>`` client keeps choosing its id."""
    monkeypatch.setattr(provision, "LIST_PAGE", 2)  # the broker's clients over pages
    token = await provision_device(pool, "t1", "old")
    admin = Admin(mosquitto)
    legacy = Device(mosquitto, "t1/old", token, client_id="legacy-firmware")
    with closing(admin.device, legacy):
        await admin.start()
        # As an older Pulse made them: the role, the client in it, no client id.
        await admin.control({"command": "createRole", "rolename": "pulse-device/t1/old"})
        await admin.control(
            {
                "command": "createClient",
                "username": "t1/old",
                "password": token,
                "roles": [{"rolename": "pulse-device/t1/old"}],
            }
        )
        await admin.control(
            {"command": "createClient", "username": "ops/monitor", "password": "y" * 20}
        )
        assert not (await legacy.connect()).is_failure

        async def client_id(username: str) -> str | None:
            client = await admin.control({"command": "getClient", "username": username})
            return client["data"]["client"].get("clientid")  # type: ignore[no-any-return]

        async with (
            running_server(mqtt_settings(settings, mosquitto)) as url,
            httpx.AsyncClient(base_url=url, timeout=10) as http,
        ):
            await wait_subscribed(http)
            async with asyncio.timeout(15):
                while await client_id("t1/old") != "t1/old":  # noqa: ASYNC110  no event for it
                    await asyncio.sleep(0.05)
            await until(lambda: not legacy.client.is_connected(), 15)
            assert await client_id("ops/monitor") is None
        legacy.close()
        again = Device(mosquitto, "t1/old", token, client_id="legacy-firmware")
        own = Device(mosquitto, "t1/old", token)
        operator = Device(mosquitto, "ops/monitor", "y" * 20, client_id="any-id-it-likes")
        with closing(again, own, operator):
            assert (await again.connect()).value == NOT_AUTHORIZED
            assert not (await own.connect()).is_failure
            assert not (await operator.connect()).is_failure


async def test_the_status_endpoint_does_not_show_pulse_s_client_id(
    pulse: Pulse, mosquitto: Mosquitto, settings: Settings
) -> None:
    """It answers anyone, and named the session to take over (the audit read it there)."""
    pulse_id = mqtt_settings(settings, mosquitto).mqtt_client_id
    assert pulse_id is not None
    r = await pulse.http.get(STATUS)
    assert r.status_code == 200 and r.json()["mqtt"]["subscribed"] is True
    assert "client_id" not in r.json()["mqtt"]
    assert pulse_id not in r.text
