"""Device credentials on a real Mosquitto (dynamic security), provisioned by a real Pulse
server: each device may publish only on its own topics, a rotated token stops working,
a deleted device cannot connect, and devices that existed before MQTT get their clients."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.mqtt.broker import Device, Mosquitto, closing
from tests.mqtt.support import (
    DEVICES,
    Pulse,
    mqtt_settings,
    mqtt_status,
    rows,
    until_rows,
    wait_subscribed,
)
from tests.support import provision_device, running_server, until

NOT_AUTHORIZED = 135  # MQTT 5 reason code, on a PUBACK and a CONNACK


async def test_a_device_publishes_only_on_its_own_topics(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    token_a = await pulse.device("a")
    await pulse.device("b")
    device = Device(mosquitto, "t1/a", token_a)
    with closing(device):
        assert not (await device.connect()).is_failure
        as_b = await device.publish("pulse/t1/b/telemetry", b'{"metrics": {"forged": 1}}')
        other_tenant = await device.publish("pulse/t2/a/telemetry", b'{"metrics": {"x": 1}}')
        (errors_of_b,) = await device.subscribe("pulse/t1/b/errors")
        own = await device.publish("pulse/t1/a/telemetry", b'{"metrics": {"mine": 1}}')
        await until_rows(pool, 1)
    assert as_b.value == NOT_AUTHORIZED
    assert other_tenant.value == NOT_AUTHORIZED
    assert errors_of_b.is_failure
    assert not own.is_failure
    assert [r["device_id"] for r in await rows(pool)] == ["a"]


async def test_a_rotated_token_stops_working(pulse: Pulse, mosquitto: Mosquitto) -> None:
    old = await pulse.device("a")
    r = await pulse.http.post(f"{DEVICES}/a/rotate-token", headers=pulse.admin)
    assert r.status_code == 200
    new = r.json()["provision_token"]
    refused, accepted = Device(mosquitto, "t1/a", old), Device(mosquitto, "t1/a", new)
    with closing(refused, accepted):
        assert (await refused.connect()).value == NOT_AUTHORIZED
        assert not (await accepted.connect()).is_failure


async def test_a_deleted_device_cannot_connect(pulse: Pulse, mosquitto: Mosquitto) -> None:
    token = await pulse.device("a")
    assert (await pulse.http.delete(f"{DEVICES}/a", headers=pulse.admin)).status_code == 204
    device = Device(mosquitto, "t1/a", token)
    with closing(device):
        assert (await device.connect()).value == NOT_AUTHORIZED


async def test_a_device_made_again_after_its_deletion_starts_its_seqs_anew(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    """Found by an audit: the old device's claimed seqs outlived it (kept 25 h for
    redeliveries), and the new device's seqs 1, 2, 3 were taken for second deliveries:
    acknowledged, counted as duplicates, never stored."""

    async def publish_seqs(token: str) -> None:
        device = Device(mosquitto, "t1/a", token)
        with closing(device):
            assert not (await device.connect()).is_failure
            for seq in (1, 2, 3):
                body = json.dumps({"metrics": {"n": seq}, "seq": seq}).encode()
                assert not (await device.publish("pulse/t1/a/telemetry", body)).is_failure

    await publish_seqs(await pulse.device("a"))
    await until_rows(pool, 3)
    assert (await pulse.http.delete(f"{DEVICES}/a", headers=pulse.admin)).status_code == 204
    await publish_seqs(await pulse.device("a"))
    await until_rows(pool, 6)
    assert [r["seq"] for r in await rows(pool)] == [1, 2, 3, 1, 2, 3]


async def test_no_rotation_while_the_broker_cannot_be_told(
    pulse: Pulse, mosquitto: Mosquitto
) -> None:
    """The old token would keep working over MQTT: the rotation is refused, nothing changes."""
    token = await pulse.device("a")
    await mosquitto.stop()
    r = await pulse.http.post(f"{DEVICES}/a/rotate-token", headers=pulse.admin)
    assert r.status_code == 503
    assert r.json()["error"] == "broker_unavailable"
    ingest = await pulse.http.post(
        "/ingest/v1/tenant/t1/device/a/telemetry",
        headers={"X-Provision-Token": token},
        json={"metrics": {"still": 1}},
    )
    assert ingest.status_code == 201


async def test_a_device_deleted_and_made_again_while_the_broker_was_away_drops_its_old_token(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    """Deleted, then made again under the same id, both while the broker was away: its
    broker client (the old device's, with the old token for password) used to be kept
    by the reconciliation, which compared names only, and the old token worked over
    MQTT. The client is reset when the broker is back: the old token is refused, and the
    new device connects once its token is rotated (as any device created meanwhile)."""
    old = await pulse.device("a")
    before = (await mqtt_status(pulse.http))["reconnects"]
    await mosquitto.stop()
    assert (await pulse.http.delete(f"{DEVICES}/a", headers=pulse.admin)).status_code == 204
    await pulse.device("a")
    await mosquitto.start()
    await wait_subscribed(pulse.http, reconnects=before + 1)
    assert await pool.fetchval("SELECT count(*) FROM broker_unsynced") == 0
    refused = Device(mosquitto, "t1/a", old)
    with closing(refused):
        assert (await refused.connect()).value == NOT_AUTHORIZED
    r = await pulse.http.post(f"{DEVICES}/a/rotate-token", headers=pulse.admin)
    accepted = Device(mosquitto, "t1/a", r.json()["provision_token"])
    with closing(accepted):
        assert not (await accepted.connect()).is_failure


async def test_a_rotation_the_database_refuses_leaves_the_broker_alone(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    """The broker is told only once the database has the new token (in the same
    transaction): a failed update leaves the old token working over MQTT."""
    token = await pulse.device("a")
    await pool.execute(
        """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql
           AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$;
           CREATE TRIGGER refuse BEFORE UPDATE OF token_hash ON devices
           FOR EACH ROW EXECUTE FUNCTION refuse()"""
    )
    r = await pulse.http.post(f"{DEVICES}/a/rotate-token", headers=pulse.admin)
    assert r.status_code == 500 and r.json()["error"] == "internal_error"
    device = Device(mosquitto, "t1/a", token)
    with closing(device):
        assert not (await device.connect()).is_failure


async def test_devices_from_before_mqtt_are_provisioned_at_first_connection(
    settings: Settings, mosquitto: Mosquitto, pool: asyncpg.Pool, make_token: Any
) -> None:
    """Only token hashes are kept, so a device that existed before MQTT gets its client and
    role without a password (it connects once its token is rotated); a broker client of a
    device that is gone is removed."""
    token = await provision_device(pool, "t1", "old")
    admin = Admin(mosquitto)
    with closing(admin.device):
        await admin.start()
        await admin.control({"command": "createRole", "rolename": "pulse-device/t1/gone"})
        await admin.control(
            {
                "command": "createClient",
                "username": "t1/gone",
                "password": "x" * 20,
                "roles": [{"rolename": "pulse-device/t1/gone"}],
            }
        )
        async with (
            running_server(mqtt_settings(settings, mosquitto)) as url,
            httpx.AsyncClient(base_url=url, timeout=10) as http,
        ):
            await wait_subscribed(http)

            async def reconciled() -> bool:
                clients = (await admin.control({"command": "listClients"}))["data"]["clients"]
                return "t1/old" in clients and "t1/gone" not in clients

            async with asyncio.timeout(15):
                while not await reconciled():  # noqa: ASYNC110  the broker has no event for it
                    await asyncio.sleep(0.05)
            role = await admin.control({"command": "getRole", "rolename": "pulse-device/t1/old"})
            before = Device(mosquitto, "t1/old", token)
            with closing(before):
                assert (await before.connect()).value == NOT_AUTHORIZED
            headers = {"Authorization": f"Bearer {make_token('t1', ('tenant-admin',))}"}
            r = await http.post(f"{DEVICES}/old/rotate-token", headers=headers)
            after = Device(mosquitto, "t1/old", r.json()["provision_token"])
            with closing(after):
                assert not (await after.connect()).is_failure
    topics = {(acl["acltype"], acl["topic"]) for acl in role["data"]["role"]["acls"]}
    assert topics == {
        ("publishClientSend", "pulse/t1/old/telemetry"),
        ("publishClientSend", "pulse/t1/old/heartbeat"),
        ("subscribePattern", "pulse/t1/old/errors"),
        ("publishClientReceive", "pulse/t1/old/errors"),
    }


async def test_the_operator_s_own_clients_are_left_alone(
    settings: Settings, mosquitto: Mosquitto
) -> None:
    """A broker client named like a device (``<a>/<b>``) that Pulse did not make (it is not
    in the device's own role) is the operator's: the reconciliation at each connection
    used to delete it as the client of a device that no longer exists."""
    admin = Admin(mosquitto)
    with closing(admin.device):
        await admin.start()
        await admin.control(
            {"command": "createClient", "username": "ops/monitor", "password": "y" * 20}
        )
        await admin.control({"command": "createRole", "rolename": "pulse-device/t1/gone"})
        await admin.control(
            {
                "command": "createClient",
                "username": "t1/gone",
                "roles": [{"rolename": "pulse-device/t1/gone"}],
            }
        )
        async with (
            running_server(mqtt_settings(settings, mosquitto)) as url,
            httpx.AsyncClient(base_url=url, timeout=10) as http,
        ):
            await wait_subscribed(http)

            async def clients() -> list[str]:
                return list((await admin.control({"command": "listClients"}))["data"]["clients"])

            async with asyncio.timeout(15):
                while "t1/gone" in await clients():  # noqa: ASYNC110  no event for it
                    await asyncio.sleep(0.05)
            assert "ops/monitor" in await clients()
    operator = Device(mosquitto, "ops/monitor", "y" * 20)
    with closing(operator):
        assert not (await operator.connect()).is_failure


async def test_a_device_named_after_an_operator_s_client_does_not_take_it_over(
    pulse: Pulse, mosquitto: Mosquitto
) -> None:
    """From the MQTT audit: a tenant admin who made a device named after an operator's
    own broker client (``t1/monitor``) had Pulse set that client's password to the
    device's token (and a rotation set it again; a deletion deleted it): the client's
    roles, whatever the operator gave it, were the tenant admin's. The operator's client
    is now left alone: its password stays, and the device cannot connect over MQTT."""
    admin = Admin(mosquitto)
    with closing(admin.device):
        await admin.start()
        await admin.control(
            {"command": "createClient", "username": "t1/monitor", "password": "y" * 20}
        )
        token = await pulse.device("monitor")
        r = await pulse.http.post(f"{DEVICES}/monitor/rotate-token", headers=pulse.admin)
        assert r.status_code in (200, 503), r.text  # refused: the broker was not told
        rotated = r.json().get("provision_token")
        for password in (token, rotated):
            if password is not None:
                as_device = Device(mosquitto, "t1/monitor", password)
                with closing(as_device):
                    assert (await as_device.connect()).value == NOT_AUTHORIZED
        assert (
            await pulse.http.delete(f"{DEVICES}/monitor", headers=pulse.admin)
        ).status_code == 204
        clients = (await admin.control({"command": "listClients"}))["data"]["clients"]
        assert "t1/monitor" in clients
    operator = Device(mosquitto, "t1/monitor", "y" * 20)
    with closing(operator):
        assert not (await operator.connect()).is_failure


class Admin:
    """The dynamic-security admin, sending control commands as mosquitto_ctrl would."""

    def __init__(self, broker: Mosquitto) -> None:
        self.device = Device(broker, broker.ADMIN, broker.password)
        self._sent = 0

    async def start(self) -> None:
        assert not (await self.device.connect()).is_failure
        await self.device.subscribe("$CONTROL/dynamic-security/v1/response")

    async def control(self, command: dict[str, Any]) -> dict[str, Any]:
        """Its response (Pulse's own commands are answered on the same topic)."""
        self._sent += 1
        key = f"test-{self._sent}"
        await self.device.publish(
            "$CONTROL/dynamic-security/v1",
            json.dumps({"commands": [{**command, "correlationData": key}]}).encode(),
        )

        def answer() -> dict[str, Any] | None:
            for _, payload in self.device.received:
                for response in json.loads(payload)["responses"]:
                    if response.get("correlationData") == key:
                        return dict(response)
            return None

        await until(lambda: answer() is not None, 10)
        result = answer()
        assert result is not None
        return result


async def test_the_first_connection_to_a_new_broker_warns_of_nothing(
    settings: Settings, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A new broker's Pulse client has no role yet: Pulse gives it one, and the broker closes
    the connection, as it does for every client whose roles change. Expected, so said at
    INFO: the demo's first start used to print two warnings for it."""
    caplog.set_level(logging.INFO, logger="pulse.mqtt")
    async with (
        running_server(mqtt_settings(settings, mosquitto)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        await wait_subscribed(http, reconnects=1)
        said = [
            (r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("pulse.mqtt")
        ]
    assert [m for level, m in said if level >= logging.WARNING] == []
    assert (
        logging.INFO,
        "MQTT: Pulse's broker client has its role; the broker reconnects it",
    ) in said
