"""`pulse serve` with no DATABASE_URL runs on an embedded PostgreSQL and keeps its data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pulse.auth.dev_tokens import mint_token
from pulse.db.embedded import embedded_postgres
from tests.support import TEST_SECRET, pulse_serve

pytestmark = pytest.mark.timeout(120)


async def test_serve_without_database_url(tmp_path: Path) -> None:
    admin = {
        "Authorization": "Bearer "
        + mint_token(TEST_SECRET, tenant_id="demo", roles=["tenant-admin"])
    }
    async with (
        pulse_serve(data_dir=tmp_path) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        created = await http.post(
            "/api/v1/customer/devices", json={"device_id": "dev-1"}, headers=admin
        )
        assert created.status_code == 201, created.text
        device_token = created.json()["provision_token"]
        r = await http.post(
            "/ingest/v1/tenant/demo/device/dev-1/telemetry",
            json={"metrics": {"temp": 21.5}},
            headers={"X-Provision-Token": device_token},
        )
        assert r.status_code == 201 and r.json() == {"id": 1}
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()

    # A second start reuses the data folder: the device and its events are still there.
    async with (
        pulse_serve(data_dir=tmp_path) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        devices = (await http.get("/api/v1/customer/devices", headers=admin)).json()["devices"]
        assert [d["device_id"] for d in devices] == ["dev-1"]
        r = await http.post(
            "/ingest/v1/tenant/demo/device/dev-1/telemetry",
            json={"metrics": {"temp": 22.0}},
            headers={"X-Provision-Token": device_token},
        )
        assert r.status_code == 201 and r.json() == {"id": 2}


def test_a_user_killed_outright_does_not_keep_the_server_running(tmp_path: Path) -> None:
    """From the operations audit: two `pulse serve` on one data folder, one killed with
    SIGKILL, then the other stopped: the embedded PostgreSQL ran on, orphaned, because
    pgserver still counted the killed process as a user."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that used the server and no longer exists
    postmaster = tmp_path / "pgdata" / "postmaster.pid"
    with embedded_postgres(tmp_path):
        users = tmp_path / "pgdata" / ".handle_pids.json"
        users.write_text(json.dumps([*json.loads(users.read_text()), gone.pid]))
        assert postmaster.exists()
        server_pid = int(postmaster.read_text().split()[0])
    if postmaster.exists():  # the failure: stop it here, not leave it to the machine
        os.kill(server_pid, signal.SIGTERM)
        raise AssertionError("PostgreSQL still runs")


# Run by two processes at once: makes the embedded server's system user as
# pulse.db.embedded does, under another name, and prints the uid it was given.
_MAKE_USER = """
import sys, warnings
warnings.simplefilter("ignore")
import pgserver.utils
from pulse.db import embedded
name = sys.argv[1]
made = pgserver.utils.ensure_user_exists
given = []
pgserver.utils.ensure_user_exists = lambda _pgserver: given.append(made(name)) or given[-1]
print("ready", flush=True)
sys.stdin.readline()  # both started: go together
embedded._system_user_made_once()
print(given[-1].pw_uid)
"""


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or not Path("/usr/sbin/useradd").exists(),
    reason="pgserver makes a system user only when run as root (useradd)",
)
def test_two_processes_starting_at_once_as_root_agree_on_the_system_user() -> None:
    """Two useradd at once both succeeded, one with a uid the other then overwrote: that
    process's initdb failed ("could not change permissions ... Operation not permitted"),
    as the suite's two workers did on a fresh machine. Three rounds (without the lock,
    five of five lost the race here)."""
    for round_ in range(3):
        name = f"pulsetest{os.getpid() % 10000}r{round_}"
        try:
            runs = [
                subprocess.Popen(
                    [sys.executable, "-c", _MAKE_USER, name],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            for run in runs:  # imported and waiting, however slowly each started
                assert run.stdout is not None and run.stdout.readline() == "ready\n"
            for run in runs:
                assert run.stdin is not None
                run.stdin.write("go\n")
                run.stdin.flush()
            uids = {int(run.communicate(timeout=60)[0]) for run in runs}
            final = int(subprocess.check_output(["id", "-u", name], text=True))
            assert uids == {final}, f"round {round_}: processes saw {uids}, the user is {final}"
        finally:
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)
