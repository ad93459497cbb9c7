"""A fleet of simulated devices that provisions itself and sends through the real HTTP APIs."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from pulse.sim.signals import BATTERY_ALERT_BELOW, TEMP_ALERT_ABOVE, SignalModel

log = logging.getLogger(__name__)

DEVICES_PATH = "/api/v1/customer/devices"
RULES_PATH = "/api/v1/customer/alert-rules"
BATCH_PATH = "/ingest/v1/batch"
MAX_BATCH = 1000
SITES = ("north-hall", "cold-store", "lab-2", "dock")

DEFAULT_RULES: tuple[dict[str, Any], ...] = (
    {
        "name": "Temperature above 32 C",
        "metric": "temp",
        "operator": ">",
        "threshold": TEMP_ALERT_ABOVE,
        "severity": 4,
    },
    {
        "name": "Battery below 15 %",
        "metric": "battery",
        "operator": "<",
        "threshold": BATTERY_ALERT_BELOW,
        "severity": 2,
    },
)


# A device of one of the simulator's ids that was seen this recently may be fed by
# another run (a `pulse demo`, whose devices are dev-0001...): it is watched for FED_S
# and left alone if it is seen again meanwhile. Taking it over rotated its token, and
# the other run's readings were refused from then on, without a word.
RECENT_S = 60.0  # generous: the server's clock may differ from this machine's
FED_S = 5.0

# With an MQTT sender, every MQTT_EVERY-th device publishes over MQTT.
MQTT_EVERY = 5
CATCH_UP_S = 5.0  # readings a device owes, at most, sent late rather than never


class SimulatorError(RuntimeError):
    pass


class RuleRefused(SimulatorError):
    """An alert rule the simulator would add was refused (the tenant's rule quota, say):
    the simulator can run without its rules."""


@dataclasses.dataclass
class Removed:
    """What a clean-up deleted (or found gone already), and what it could not, why."""

    devices: int = 0
    rules: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)

    def count(self, r: httpx.Response, what: str, kind: str) -> None:
        if r.is_success or r.status_code == 404:
            setattr(self, kind, getattr(self, kind) + 1)
        else:
            self.failed.append(f"{what}: {refusal(r)}")

    def describe(self) -> str:
        said = f"deleted {self.devices} devices and {self.rules} alert rules"
        if self.failed:
            said += f"; could not delete {len(self.failed)} ({'; '.join(self.failed[:3])}"
            said += f" and {len(self.failed) - 3} more)" if len(self.failed) > 3 else ")"
        return said


def refusal(r: httpx.Response) -> str:
    """A refused answer in one line: ``409 tenant_quota: The tenant has ...``, or its
    status and text when it is not Pulse's JSON error."""
    try:
        body = r.json()
        return f"{r.status_code} {body['error']}: {body.get('detail', '')}".rstrip(": ")
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} {' '.join(r.text.split())[:200]}".rstrip()


def error_code(r: httpx.Response) -> str | None:
    try:
        return str(r.json()["error"])
    except (ValueError, KeyError, TypeError):
        return None


class MqttSender(Protocol):
    """Devices over MQTT (``pulse.sim.mqtt_fleet.MqttFleet``)."""

    host: str
    port: int

    async def connect(self, tenant_id: str, device_id: str, token: str) -> bool: ...

    def send(self, tenant_id: str, device_id: str, reading: dict[str, object]) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class SimDevice:
    device_id: str
    site_id: str
    name: str
    model: SignalModel
    provision_token: str = ""
    next_due: float = 0.0  # time.monotonic() of the next reading
    over_mqtt: bool = False
    # Over MQTT, each reading carries the next seq (stored once if delivered twice):
    # from the start time in milliseconds, so a restarted simulator never repeats one.
    seq: int = 0


class Simulator:
    """``devices`` devices named ``<prefix>-0001``..., each sending ``rate`` readings a second.

    ``admin_token`` needs the tenant-admin role (or operator-admin with
    ``tenant_id``): the simulator creates its devices through the device API
    (rotating the token of a device that already exists) and sends through
    the batch ingest endpoint, one request per tick for the devices due. With
    ``mqtt``, every fifth device publishes over MQTT instead.
    """

    def __init__(
        self,
        base_url: str,
        admin_token: str,
        *,
        tenant_id: str,
        devices: int = 25,
        rate: float = 1.0,
        seed: int | None = None,
        prefix: str = "dev",
        http: httpx.AsyncClient | None = None,
        mqtt: MqttSender | None = None,
    ) -> None:
        if devices < 1 or rate <= 0:
            raise ValueError("need at least one device and a positive rate")
        self.tenant_id = tenant_id
        self.rate = rate
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=10.0)
        self._owns_http = http is None
        self._admin = {"Authorization": f"Bearer {admin_token}"}
        self._params = {"tenant_id": tenant_id}
        self.devices = [_device(i, prefix, seed) for i in range(devices)]
        self.mqtt = mqtt
        if mqtt is not None:
            first_seq = int(time.time() * 1000)
            for device in self.devices[MQTT_EVERY - 1 :: MQTT_EVERY]:
                device.over_mqtt = True
                device.seq = first_seq
        self.published = 0  # readings handed to the MQTT sender
        self.sent = 0
        self.rejected = 0
        self.rejections: collections.Counter[str] = collections.Counter()  # by reason
        self.created_rules: list[int] = []
        self._down_since: float | None = None

    async def _existing(self, device: SimDevice) -> tuple[float | None] | None:
        """None when no device has this id; else, once it is known to be a simulated
        one (SimulatorError otherwise: rotating a real device's token would cut it off),
        its last reading's time (epoch seconds; None if it has sent none)."""
        r = await self.http.get(
            f"{DEVICES_PATH}/{device.device_id}", headers=self._admin, params=self._params
        )
        if r.status_code == 404 and error_code(r) == "unknown_device":
            return None
        if not r.is_success:
            raise SimulatorError(f"cannot read {device.device_id}: {refusal(r)}")
        found: dict[str, Any] = r.json()
        if (found.get("name"), found.get("site_id")) != (device.name, device.site_id):
            raise SimulatorError(
                f"{device.device_id} exists and is not a simulated device (named "
                f"{found.get('name')!r}): its token is left alone; give another --prefix"
            )
        return (_epoch(found.get("last_seen_at")),)

    async def _read_device(self, device_id: str) -> dict[str, Any]:
        r = await self.http.get(
            f"{DEVICES_PATH}/{device_id}", headers=self._admin, params=self._params
        )
        if not r.is_success:
            raise SimulatorError(f"cannot read {device_id}: {refusal(r)}")
        found: dict[str, Any] = r.json()
        return found

    async def _check_not_fed(self, seen: Mapping[str, float | None]) -> None:
        """Raise SimulatorError if a device seen within RECENT_S is seen again within
        FED_S: another run feeds it. One wait for them all (a run restarted at once)."""
        recent = {d: at for d, at in seen.items() if at is not None and time.time() - at < RECENT_S}
        if not recent:
            return
        await asyncio.sleep(FED_S)
        for device_id, at in recent.items():
            again = _epoch((await self._read_device(device_id)).get("last_seen_at"))
            if again is not None and again > at:
                raise SimulatorError(
                    f"{device_id} is fed by another run (a pulse demo, another pulse simulate: "
                    f"it sent a reading within the last {FED_S:g} s): its token is left alone; "
                    "give another --prefix, or stop the other run first"
                )

    async def aclose(self) -> None:
        if self.mqtt is not None:
            self.mqtt.close()
        if self._owns_http:
            await self.http.aclose()

    async def provision(
        self, known_tokens: Mapping[str, str] | None = None, done: Provisioned | None = None
    ) -> Provisioned:
        """Create every device, or reuse one that exists: with its token from
        ``known_tokens`` when that still works, else with a new one (rotated) when it is
        one of the simulator's (its name and site say so; another device of that id is
        refused, its token left alone). ``done``: where to note what was done as it is
        done, so that a run stopped midway can still remove what it created."""
        done = Provisioned() if done is None else done
        kept: set[str] = set()
        for device in self.devices:
            known = (known_tokens or {}).get(device.device_id)
            if known is not None and await self._token_works(device.device_id, known):
                device.provision_token = known
                done.kept.append(device.device_id)
                kept.add(device.device_id)
        # The devices there already are checked before any is made: a run refused for
        # one of them (not simulated, another run's) left those it had made meanwhile.
        seen: dict[str, float | None] = {}
        for device in self.devices:
            if device.device_id not in kept and (at := await self._existing(device)) is not None:
                seen[device.device_id] = at[0]
        await self._check_not_fed(seen)
        existing = [device for device in self.devices if device.device_id in seen]
        for device in self.devices:
            if device.device_id in kept or device.device_id in seen:
                continue
            body = {"device_id": device.device_id, "site_id": device.site_id, "name": device.name}
            r = await self.http.post(
                DEVICES_PATH, json=body, headers=self._admin, params=self._params
            )
            if r.status_code == 409 and error_code(r) == "tenant_quota":
                raise SimulatorError(self._device_quota(device, r, done))
            if r.status_code == 409 and error_code(r) == "device_exists":
                raise SimulatorError(
                    f"{device.device_id} was made by someone else while this run started: "
                    "its token is left alone; give another --prefix"
                )
            if not r.is_success:
                raise SimulatorError(f"cannot provision {device.device_id}: {refusal(r)}")
            device.provision_token = r.json()["provision_token"]
            done.created.append(device.device_id)
        for device in existing:
            await self._rotate(device)
            done.rotated.append(device.device_id)
        for device in self.devices:
            if device.over_mqtt:
                await self._connect_mqtt(device, done)
        return done

    async def _connect_mqtt(self, device: SimDevice, done: Provisioned) -> None:
        """Connect a device to the broker; a device whose token the broker does not have
        (it existed before MQTT was enabled) gets a new one first."""
        assert self.mqtt is not None
        tenant = self.tenant_id
        if await self.mqtt.connect(tenant, device.device_id, device.provision_token):
            return
        await self._rotate(device)
        if device.device_id in done.kept:
            done.kept.remove(device.device_id)
            done.rotated.append(device.device_id)
        if not await self.mqtt.connect(tenant, device.device_id, device.provision_token):
            raise SimulatorError(f"the MQTT broker refuses {device.device_id}'s new token")

    async def _rotate(self, device: SimDevice) -> None:
        """A new token for the device."""
        r = await self.http.post(
            f"{DEVICES_PATH}/{device.device_id}/rotate-token",
            headers=self._admin,
            params=self._params,
        )
        if not r.is_success:
            raise SimulatorError(f"cannot rotate {device.device_id}: {refusal(r)}")
        device.provision_token = r.json()["provision_token"]

    def _device_quota(self, device: SimDevice, r: httpx.Response, done: Provisioned) -> str:
        """What to say when the tenant may have no more devices (409 tenant_quota): the
        server's sentence (the limit, what to do), and how far this run got."""
        ready = len(done.created) + len(done.kept) + len(done.rotated)
        fewer = f"simulate at most {ready} (--devices {ready}), or " if ready else ""
        return (
            f"cannot create {device.device_id}: {refusal(r)} {ready} of the "
            f"{len(self.devices)} simulated devices were ready before the quota"
            f"{f' ({done.describe()})' if ready else ''}: {fewer}make room in tenant "
            f"{self.tenant_id!r}."
        )

    async def _token_works(self, device_id: str, token: str) -> bool:
        """A heartbeat with the token: 204 when the device exists and the token is its own."""
        r = await self.http.post(
            f"/ingest/v1/tenant/{self.tenant_id}/device/{device_id}/heartbeat",
            headers={"X-Provision-Token": token},
        )
        return r.status_code == 204

    def use_token(self, admin_token: str) -> None:
        """Act with ``admin_token`` from now on (a fresh one, for a long run's clean-up)."""
        self._admin = {"Authorization": f"Bearer {admin_token}"}

    async def remove(self, provisioned: Provisioned, rule_ids: Sequence[int]) -> Removed:
        """Delete the devices this simulator created, and the rules ``rule_ids``."""
        removed = Removed()
        for device_id in provisioned.created:
            r = await self.http.delete(
                f"{DEVICES_PATH}/{device_id}", headers=self._admin, params=self._params
            )
            removed.count(r, f"device {device_id}", "devices")
        for rule_id in rule_ids:
            r = await self.http.delete(
                f"{RULES_PATH}/{rule_id}", headers=self._admin, params=self._params
            )
            removed.count(r, f"alert rule {rule_id}", "rules")
        return removed

    async def ensure_rules(self, rules: Sequence[dict[str, Any]] = DEFAULT_RULES) -> list[str]:
        """Create the rules missing (by name); the names of ``rules`` now in place.

        Empty when the server has no alert rules API. The ids of those created are
        added to ``created_rules``.
        """
        existing: set[str] = set()
        params = dict(self._params)
        # Every page (the list comes a page at a time, next_cursor null on the last; a
        # server from before pages sends no next_cursor): a rule past the first page is
        # in place too.
        while True:
            r = await self.http.get(RULES_PATH, headers=self._admin, params=params)
            if r.status_code in (404, 405):
                log.warning("this server has no alert rules API; no threshold alerts")
                return []
            if not r.is_success:
                raise RuleRefused(f"cannot list alert rules: {refusal(r)}")
            page = r.json()
            existing.update(rule["name"] for rule in page["rules"])
            if not page.get("next_cursor"):
                break
            params["cursor"] = str(page["next_cursor"])
        for rule in rules:
            if rule["name"] not in existing:
                c = await self.http.post(
                    RULES_PATH, json=rule, headers=self._admin, params=self._params
                )
                if not c.is_success:
                    raise RuleRefused(f"cannot create alert rule {rule['name']!r}: {refusal(c)}")
                self.created_rules.append(int(c.json()["rule_id"]))
        return [rule["name"] for rule in rules]

    async def run(self, duration_s: float | None = None) -> None:
        """Send readings until cancelled (or for ``duration_s``)."""
        interval = 1.0 / self.rate
        tick = min(0.2, interval)
        start = time.monotonic()
        for i, device in enumerate(self.devices):
            # Spread the devices over the interval rather than sending all at once.
            device.next_due = start + interval * i / len(self.devices)
        # A device behind by at most this many readings (the loop's sends and sleeps
        # take time) sends them all now; further behind (a stall), it skips the rest.
        catch_up = max(1, math.ceil(self.rate * CATCH_UP_S))
        while duration_s is None or time.monotonic() - start < duration_s:
            now = time.monotonic()
            messages = []
            for device in self.devices:
                for _ in range(catch_up):
                    if device.next_due > now:
                        break
                    device.next_due += interval
                    metrics = device.model.advance(interval)
                    if metrics is None:
                        continue
                    if device.over_mqtt:
                        self._publish(device, metrics)
                    else:
                        messages.append(self._message(device, metrics))
                device.next_due = max(device.next_due, now)
            if messages:
                await self._send(messages)
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - now)))

    def _rejected(self, reason: str) -> None:
        """Counted by reason, said once each: a line per reading flooded the terminal
        (2,598 lines in 4 s at a rate beyond the server's limit per device)."""
        if not self.rejections[reason]:
            log.warning("readings rejected: %s (said once; counted until the run ends)", reason)
        self.rejections[reason] += 1

    def describe_rejections(self) -> str:
        """ "" or, e.g., "; 1200 rejected (rate_limited: 1200)"."""
        if not self.rejected:
            return ""
        reasons = ", ".join(f"{r}: {n}" for r, n in self.rejections.most_common())
        return f"; {self.rejected} rejected" + (f" ({reasons})" if reasons else "")

    def _publish(self, device: SimDevice, metrics: dict[str, float]) -> None:
        assert self.mqtt is not None
        device.seq += 1
        reading = {"ts": _now(), "metrics": metrics, "seq": device.seq}
        self.mqtt.send(self.tenant_id, device.device_id, reading)
        self.published += 1

    def _message(self, device: SimDevice, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "device_id": device.device_id,
            "provision_token": device.provision_token,
            "ts": _now(),
            "metrics": metrics,
        }

    async def _send(self, messages: list[dict[str, Any]]) -> None:
        for i in range(0, len(messages), MAX_BATCH):
            chunk = messages[i : i + MAX_BATCH]
            try:
                r = await self.http.post(BATCH_PATH, json={"messages": chunk})
            except httpx.TransportError as exc:
                # The server is restarting or gone: these readings are lost, as
                # they would be from a real device without a buffer.
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("simulator cannot reach the server (%s); retrying", exc)
                return
            if self._down_since is not None:
                log.warning("simulator reached the server again")
                self._down_since = None
            body = r.json() if r.headers.get("content-type") == "application/json" else {}
            if "results" in body:  # 200, or 400 when every message was rejected
                self.sent += body["accepted"]
                self.rejected += body["rejected"]
                for result in body["results"]:
                    if result["status"] == "rejected":
                        self._rejected(str(result["reason"]))
            else:
                # Counted by its reason too: a line per batch flooded a database
                # outage's terminal (five a second at the defaults).
                self.rejected += len(chunk)
                code = error_code(r) or str(r.status_code)
                if not self.rejections[code]:
                    log.warning(
                        "batches refused: %s %s (said once; counted until the run ends)",
                        r.status_code,
                        r.text[:200],
                    )
                self.rejections[code] += len(chunk)


@dataclasses.dataclass
class Provisioned:
    """What ``Simulator.provision`` did, device by device."""

    created: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)  # existing, token still valid
    rotated: list[str] = dataclasses.field(default_factory=list)  # existing, new token

    def describe(self) -> str:
        parts = [
            f"{len(ids)} {what}"
            for ids, what in (
                (self.created, "created"),
                (self.kept, "already there"),
                (self.rotated, "already there, with a new token"),
            )
            if ids
        ]
        return ", ".join(parts)


def _epoch(value: object) -> float | None:
    """An ISO 8601 time from the server (``last_seen_at``) in epoch seconds."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _device(index: int, prefix: str, seed: int | None) -> SimDevice:
    site = SITES[index % len(SITES)]
    number = index // len(SITES) + 1
    return SimDevice(
        device_id=f"{prefix}-{index + 1:04d}",
        site_id=site,
        name=f"{site.replace('-', ' ').title()} sensor {number}",
        model=SignalModel.for_device(index, seed),
    )
