"""`pulse demo`: the whole product in one process, with a simulated fleet and a dashboard.

Embedded PostgreSQL (unless DATABASE_URL is set), migrations, the server, a
demo tenant with its devices and alert rules, and the simulator sending
through the real ingest API; Ctrl-C stops all of it. With a broker (the one of
PULSE_MQTT_URL, or else a Mosquitto of the demo's own when it is installed),
every fifth device publishes over MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import httpx

from pulse.auth.dev_tokens import mint_token
from pulse.config import Settings
from pulse.logs import configure_logging
from pulse.sim.broker import Mosquitto, mosquitto_binaries
from pulse.sim.simulator import MqttSender, Simulator

log = logging.getLogger(__name__)

TENANT = "demo"
TOKEN_LIFETIME_S = 12 * 3600.0

# Applied where the environment left the server's default, so that devices
# going quiet show up as STALE and OFFLINE within a minute rather than five,
# and the terminal shows the demo's instructions rather than routine logs.
DEMO_DEFAULTS = {
    "stale_after_s": 15.0,
    "offline_after_s": 60.0,
    "log_level": "WARNING",
    "shutdown_timeout_s": 3.0,
}


def demo_settings(settings: Settings) -> Settings:
    defaults = Settings()
    changes: dict[str, object] = {
        name: value
        for name, value in DEMO_DEFAULTS.items()
        if getattr(settings, name) == getattr(defaults, name)
    }
    # Its own data folder, so the demo never mixes with a database you serve.
    changes["data_dir"] = settings.data_dir / "demo"
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]


@dataclasses.dataclass
class DemoState:
    """What a demo keeps in its data folder so that a restart resumes: the secret its
    tokens are signed with (so an open dashboard keeps working) and its devices' tokens
    (so a printed curl command keeps working). Readable by its owner only."""

    jwt_secret: str
    device_tokens: dict[str, str]
    path: Path
    # A digest of the secret the last run signed its printed tokens with (its own, or
    # PULSE_JWT_SECRET's): never the secret from the environment itself.
    signed_with: str | None = None

    @classmethod
    def load(cls, data_dir: Path) -> DemoState:
        path = data_dir / "demo-state.json"
        try:
            saved = json.loads(path.read_text())
            return cls(
                str(saved["jwt_secret"]),
                dict(saved["device_tokens"]),
                path,
                saved.get("signed_with"),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls(secrets.token_urlsafe(32), {}, path)

    def sign_with(self, secret: str) -> bool:
        """Record that this run signs with ``secret``; whether the last run's tokens were
        signed with another."""
        digest = hashlib.sha256(secret.encode()).hexdigest()[:16]
        changed = self.signed_with is not None and self.signed_with != digest
        self.signed_with = digest
        return changed

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {
                "jwt_secret": self.jwt_secret,
                "device_tokens": self.device_tokens,
                "signed_with": self.signed_with,
            }
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(body)


async def run_demo(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    devices: int = 25,
    rate: float = 1.0,
    seed: int | None = None,
    program: str = "pulse",
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set (by default: until SIGINT or SIGTERM)."""
    settings = demo_settings(settings)
    with _only_demo_in(settings.data_dir):
        await _run_demo(
            settings, host=host, port=port, devices=devices, rate=rate, seed=seed,
            program=program, out=out, stop=stop,
        )  # fmt: skip


async def _run_demo(
    settings: Settings,
    *,
    host: str,
    port: int,
    devices: int,
    rate: float,
    seed: int | None,
    program: str,
    out: TextIO,
    stop: asyncio.Event | None,
) -> None:
    from pulse.app import create_app
    from pulse.serving import hypercorn_config, serve

    _check_port_free(host, port)
    stop = stop or _stop_on_signals()
    state = DemoState.load(settings.data_dir)
    if not settings.jwt_secret:
        settings = dataclasses.replace(settings, jwt_secret=state.jwt_secret)
    assert settings.jwt_secret is not None
    if state.sign_with(settings.jwt_secret):
        print(
            "This run signs tokens with another secret than the last run"
            + (" (PULSE_JWT_SECRET)" if settings.jwt_secret != state.jwt_secret else "")
            + ": the link and the token it printed are refused; use the ones below.",
            file=out,
            flush=True,
        )
    configure_logging(settings.log_level, settings.log_format)
    if settings.database_url is None:
        print(f"Starting PostgreSQL with its data in {settings.data_dir} ...", file=out, flush=True)
    broker, settings = await _open_broker(settings, out)
    assert settings.jwt_secret is not None

    config = hypercorn_config(settings, f"{host}:{port}")
    app = create_app(settings)
    server = asyncio.create_task(serve(app, config, stop), name="pulse-demo-server")
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    simulator: Simulator | None = None
    simulating: asyncio.Task[None] | None = None
    try:
        await _wait_ready(base_url, server, stop)
        if stop.is_set():
            return
        admin = mint_token(
            settings.jwt_secret,
            tenant_id=TENANT,
            roles=["tenant-admin"],
            lifetime_s=TOKEN_LIFETIME_S,
            subject="demo-admin",
        )
        simulator = Simulator(
            base_url,
            admin,
            tenant_id=TENANT,
            devices=devices,
            rate=rate,
            seed=seed,
            mqtt=_mqtt_fleet(settings),
        )
        await simulator.provision(state.device_tokens)
        state.device_tokens = {d.device_id: d.provision_token for d in simulator.devices}
        state.save()
        rules = await simulator.ensure_rules()
        simulating = asyncio.create_task(simulator.run(), name="pulse-demo-simulator")
        simulating.add_done_callback(_report_simulator_end)
        print(banner(base_url, admin, simulator, rules, program), file=out, flush=True)
        # Until Ctrl-C, or until the server stops by itself (then its error is raised below).
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, server}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
    finally:
        stop.set()
        if simulating is not None:
            simulating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await simulating
        if simulator is not None:
            await simulator.aclose()
        try:
            await server
        finally:  # also when the server did not start (its error is raised)
            if broker is not None:
                await broker.stop()
    print("Pulse demo stopped.", file=out, flush=True)


async def _open_broker(settings: Settings, out: TextIO) -> tuple[Mosquitto | None, Settings]:
    """A Mosquitto of the demo's own, in its data folder, when none is configured
    (PULSE_MQTT_URL) and one is installed; without either, the fleet is all HTTP."""
    if settings.mqtt_url is not None or mosquitto_binaries() is None:
        return None, settings
    broker = Mosquitto(settings.data_dir / "mosquitto")
    print(f"Starting Mosquitto with its data in {broker.directory} ...", file=out, flush=True)
    await broker.start()
    client_id = settings.mqtt_client_id or "pulse-demo"
    return broker, dataclasses.replace(settings, mqtt_url=broker.url, mqtt_client_id=client_id)


def _mqtt_fleet(settings: Settings) -> MqttSender | None:
    if settings.mqtt_url is None:
        return None
    # Imported here: without MQTT the demo does not load the MQTT client.
    from pulse.sim.mqtt_fleet import MqttFleet

    url = urlsplit(settings.mqtt_url)
    return MqttFleet(url.hostname or "127.0.0.1", url.port or 1883)


def banner(base_url: str, token: str, simulator: Simulator, rules: list[str], program: str) -> str:
    """What to open, paste and run, with this demo's token and one device's token."""
    device = simulator.devices[0]
    ws_base = base_url.replace("http://", "ws://", 1)
    python = shlex.quote(sys.executable)
    rules_line = "; ".join(rules) if rules else "none (this server has no alert rules API)"
    return f"""
Pulse demo is running: tenant "{TENANT}", {len(simulator.devices)} simulated devices, \
{simulator.rate:g} reading/s each.
Alert rules: {rules_line}

  Dashboard:  {base_url}/#token={token}
              (the token rides in the URL fragment, which browsers never send to a server)

The server and a tenant-admin token for this demo (valid {TOKEN_LIFETIME_S / 3600:g} h); \
`pulse tail`, `export` and `simulate` read them:

  export PULSE_URL={base_url}
  export PULSE_TOKEN={token}

Send a reading as device {device.device_id}:

  curl -X POST {base_url}/ingest/v1/tenant/{TENANT}/device/{device.device_id}/telemetry \\
    -H 'X-Provision-Token: {device.provision_token}' \\
    -H 'Content-Type: application/json' -d '{{"metrics": {{"temp": 21.5}}}}'

Follow the telemetry stream (Server-Sent Events):

  curl -N {base_url}/api/v1/customer/telemetry/stream/sse -H "Authorization: Bearer $PULSE_TOKEN"

Or the WebSocket:

  {python} -m websockets "{ws_base}/api/v1/customer/telemetry/stream?token=$PULSE_TOKEN"

{_mqtt_lines(simulator)}Or a readable table in this terminal:

  {shlex.quote(program)} tail --format table

Press Ctrl-C to stop.
"""


def _mqtt_lines(simulator: Simulator) -> str:
    """How to publish as one of the devices that send over MQTT, if any do."""
    mqtt = simulator.mqtt
    over_mqtt = [d for d in simulator.devices if d.over_mqtt]
    if mqtt is None or not over_mqtt:
        return ""
    device = over_mqtt[0]
    where = f"{mqtt.host}:{mqtt.port}"
    topic = f"pulse/{TENANT}/{device.device_id}/telemetry"
    return (
        f"{len(over_mqtt)} of the devices publish over MQTT, through the broker at {where}.\n"
        f"Publish a reading as device {device.device_id}:\n\n"
        f"  mosquitto_pub -h {mqtt.host} -p {mqtt.port} -V mqttv5 -q 1 \\\n"
        f"    -i '{TENANT}/{device.device_id}' \\\n"
        f"    -u '{TENANT}/{device.device_id}' -P '{device.provision_token}' \\\n"
        f"    -t '{topic}' -m '{{\"metrics\": {{\"temp\": 21.5}}}}'\n\n"
    )


def _report_simulator_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the simulator stopped", exc_info=task.exception())


class DemoError(RuntimeError):
    pass


@contextlib.contextmanager
def _only_demo_in(data_dir: Path) -> Iterator[None]:
    """One demo per data folder: a second would share its database and run a second
    simulator for the same devices. An advisory lock the system drops with the
    process, however it ends."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "demo.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        # One line naming the setting, as `pulse serve` says it (a file there, /proc).
        raise DemoError(
            f"cannot keep its data in PULSE_DATA_DIR={data_dir.parent}: "
            f"{exc.strerror or exc} ({exc.filename or data_dir})"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(
                f"a demo is already running with its data in {data_dir}: stop it first, "
                "or give this one another folder (PULSE_DATA_DIR)"
            ) from None
        yield
    finally:
        os.close(fd)


def _check_port_free(host: str, port: int) -> None:
    """Fail before starting a database, rather than after, when the port is taken."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DemoError(
                f"cannot serve on {host}:{port} ({exc.strerror}); choose another with --port"
            ) from None


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _wait_ready(base_url: str, server: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Until /readyz answers 200; raises what the server died of, if it did."""
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as http:
        while not stop.is_set():
            if server.done():
                server.result()
                raise RuntimeError("the server stopped before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready within 120 s")
            await asyncio.sleep(0.1)
