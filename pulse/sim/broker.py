"""A Mosquitto of Pulse's own, for `pulse demo` (and the tests): dynamic security on,
sessions persisted in a folder, on a loopback port; stopped, started again, the same."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

ADMIN = "pulse-admin"
# The broker's limit on a message's payload, as docs/ingest.md asks of every broker Pulse
# uses: a reading is at most 1 MiB (pulse.mqtt.intake.MAX_PAYLOAD), and the broker
# refuses a larger one at the door (PUBACK 149, "packet too large"), where without it
# it would acknowledge it and then drop it (over 16 MiB, Pulse's Maximum Packet Size).
MESSAGE_SIZE_LIMIT = 1024 * 1024
PLUGIN_NAME = "mosquitto_dynamic_security.so"
MISSING = (
    "mosquitto is not installed: apt-get install mosquitto (Debian's package, with its "
    "dynamic-security plugin), or put it on the PATH"
)


def mosquitto_binaries() -> tuple[str, str, str] | None:
    """(mosquitto, mosquitto_ctrl, the dynamic-security plugin), or None when one is missing."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    broker = shutil.which("mosquitto", path=path)
    ctrl = shutil.which("mosquitto_ctrl", path=path)
    plugins = [*Path("/usr/lib").glob(f"*/{PLUGIN_NAME}"), *Path("/usr/lib").glob(PLUGIN_NAME)]
    if broker is None or ctrl is None or not plugins:
        return None
    return broker, ctrl, str(plugins[0])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _free_or_none(remembered: Path) -> int | None:
    """The port written in ``remembered``, if it is free on 127.0.0.1 now."""
    try:
        port = int(remembered.read_text())
        with socket.socket() as probe:
            # As mosquitto binds: the last broker's connections, closed by it, wait in
            # TIME-WAIT for a minute after it stopped, and only a bind without
            # SO_REUSEADDR fails on them (a new port at every ordinary restart).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
    except (OSError, ValueError, OverflowError):
        return None
    return port


def _running(pid: int) -> bool:
    """Not ended (a process that ended and was not yet reaped has no command line)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


class _ExitedAtStart(RuntimeError):
    pass


class Mosquitto:
    """Its dynamic-security file, its administrator's password and its persisted sessions
    live in ``directory``, so a broker started again there knows what it knew."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        tls: tuple[Path, Path] | None = None,
        message_size_limit: int | None = MESSAGE_SIZE_LIMIT,
    ) -> None:
        found = mosquitto_binaries()
        if found is None:
            raise RuntimeError(MISSING)
        self.binary, self.ctrl, self.plugin = found
        self.directory = directory
        self._chosen = port is None  # ports of our choosing: another may take them first
        self.port = port or free_port()
        # A second listener, with TLS: (certificate chain, key), PEM files.
        self.tls = tls
        self.tls_port = free_port() if tls else None
        # None: no limit (a test of what Pulse does on a broker configured without one).
        self.message_size_limit = message_size_limit
        self.proc: asyncio.subprocess.Process | None = None
        self.password = ""

    ADMIN = ADMIN

    @property
    def url(self) -> str:
        return f"mqtt://{ADMIN}:{self.password}@127.0.0.1:{self.port}"

    def tls_url(self, host: str = "localhost") -> str:
        assert self.tls_port is not None, "started without TLS"
        return f"mqtts://{ADMIN}:{self.password}@{host}:{self.tls_port}"

    async def start(self, timeout: float = 10) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        dynsec = self.directory / "dynamic-security.json"
        secret = self.directory / "admin-password"
        if not dynsec.exists():
            # Hex: mosquitto_ctrl would read a password starting with "-" as an option.
            password = secrets.token_hex(16)
            init = await asyncio.create_subprocess_exec(
                self.ctrl, "dynsec", "init", str(dynsec), ADMIN, password,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            if await init.wait() != 0:
                raise RuntimeError("mosquitto_ctrl dynsec init failed")
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(password)
        self.password = secret.read_text().strip()
        await self._stop_leftover()
        remembered = self.directory / "port"
        if self._chosen:
            # The port of the last start in this folder, while it is free: a broker
            # started again keeps the commands that name it working.
            self.port = _free_or_none(remembered) or self.port
        # A free port may be taken between free_port() and mosquitto's bind: it then
        # exits at start, and ports of our choosing are chosen again.
        for attempt in range(3):
            if attempt:
                self.port = free_port()
                self.tls_port = free_port() if self.tls else None
            try:
                await self._run(timeout)
            except _ExitedAtStart:
                if not self._chosen or attempt == 2:
                    raise
            else:
                if self._chosen:
                    remembered.write_text(f"{self.port}\n")
                return

    async def _run(self, timeout: float) -> None:
        dynsec = self.directory / "dynamic-security.json"
        config = self.directory / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # Run as root, mosquitto would become the user "mosquitto", who cannot read
            # this private folder.
            f"user {getpass.getuser()}\n"
            "allow_anonymous false\n"
            f"plugin {self.plugin}\n"
            f"plugin_opt_config_file {dynsec}\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            f"pid_file {self._pid_file}\n"
            "max_queued_messages 100000\n"
            # Small messages go out at once, not held back by Nagle's algorithm.
            "set_tcp_nodelay true\n"
            + (
                f"message_size_limit {self.message_size_limit}\n"
                if self.message_size_limit is not None
                else ""
            )
            + (
                f"listener {self.tls_port} 127.0.0.1\n"
                f"certfile {self.tls[0]}\nkeyfile {self.tls[1]}\n"
                if self.tls
                else ""
            )
        )
        # A session of its own: the Ctrl-C of the terminal (SIGINT to the foreground
        # process group) reaches whoever started it, which stops it after Pulse let go of
        # it, rather than the broker at the same moment (Pulse would warn of a lost broker).
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        async with asyncio.timeout(timeout):
            while True:
                if self.proc.returncode is not None:
                    raise _ExitedAtStart(f"mosquitto exited at start ({self.proc.returncode})")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                return

    @property
    def _pid_file(self) -> Path:
        return self.directory / "mosquitto.pid"

    async def _stop_leftover(self) -> None:
        """The broker an earlier run left behind in this folder, when that run was killed
        before it could stop it: stopped now (SIGTERM, then SIGKILL after 5 s)."""
        pid = self._leftover()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _running(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                await asyncio.sleep(0.02)

    def _leftover(self) -> int | None:
        """The process of this folder's pid file, if it still runs this folder's broker
        (not a process that took the number since)."""
        try:
            pid = int(self._pid_file.read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(self.directory / "mosquitto.conf").encode() in command else None

    async def stop(self) -> None:
        """SIGTERM: mosquitto saves its sessions and queued messages, then exits."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        self.proc = None
