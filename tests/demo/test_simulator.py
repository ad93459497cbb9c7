"""The simulator provisions through the device API and sends through real ingest."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from pulse.sim.simulator import DEFAULT_RULES, Simulator
from tests.support import TEST_SECRET, provision_device, running_server

pytestmark = pytest.mark.timeout(60)


async def test_provision_rules_and_readings(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    admin = make_token(tenant_id="sim", roles=("tenant-admin",))
    simulator = Simulator(server, admin, tenant_id="sim", devices=6, rate=5.0, seed=1)
    try:
        await simulator.provision()
        assert await simulator.ensure_rules() == [r["name"] for r in DEFAULT_RULES]
        assert await simulator.ensure_rules() == [r["name"] for r in DEFAULT_RULES]
        await simulator.run(duration_s=1.2)
    finally:
        await simulator.aclose()

    async with httpx.AsyncClient(
        base_url=server, headers={"Authorization": f"Bearer {admin}"}
    ) as http:
        devices = (await http.get("/api/v1/customer/devices")).json()["devices"]
        rules = (await http.get("/api/v1/customer/alert-rules")).json()["rules"]
    assert [d["device_id"] for d in devices] == [f"dev-{i:04d}" for i in range(1, 7)]
    assert all(d["site_id"] and d["name"] for d in devices)
    assert sorted(r["name"] for r in rules) == sorted(r["name"] for r in DEFAULT_RULES)

    rows = await pool.fetch("SELECT device_id, metrics FROM telemetry WHERE tenant_id = 'sim'")
    assert simulator.sent == len(rows) >= 6 * 4 and simulator.rejected == 0
    assert {row["device_id"] for row in rows} == {d["device_id"] for d in devices}
    assert all(set(row["metrics"]) == {"temp", "humidity", "battery"} for row in rows)


async def test_readings_keep_their_rate_whatever_a_loop_takes(
    server: str, make_token: Callable[..., str]
) -> None:
    """From the client review of 7 December: at 20 readings/s a device sent 168 of 200 in
    10 s (one reading per device per turn of the loop, and a turn took longer than the
    interval, the send included). A device behind now sends what it owes; at 100/s the
    shortfall shows on a quiet machine too."""
    admin = make_token(tenant_id="sim", roles=("tenant-admin",))
    simulator = Simulator(server, admin, tenant_id="sim", devices=2, rate=100.0, seed=1)
    try:
        await simulator.provision()
        await simulator.run(duration_s=4.0)
    finally:
        await simulator.aclose()
    # Each device's readings due within the 4 s, less a turn's (up to 0.1 s) at the end;
    # before, 375 of 400 in 2 s on a quiet machine.
    assert 2 * 400 - 20 <= simulator.sent <= 2 * 400 + 2, simulator.sent
    assert simulator.rejected == 0


async def test_a_second_run_takes_over_the_existing_devices(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    admin = make_token(tenant_id="sim", roles=("tenant-admin",))
    first = Simulator(server, admin, tenant_id="sim", devices=2, rate=5.0)
    second = Simulator(server, admin, tenant_id="sim", devices=2, rate=5.0)
    try:
        await first.provision()
        await second.provision()  # the devices exist: their tokens are rotated
        await second.run(duration_s=0.5)
        await first.run(duration_s=0.5)  # the old tokens no longer work
    finally:
        await first.aclose()
        await second.aclose()
    assert second.sent > 0 and second.rejected == 0
    assert first.sent == 0 and first.rejected > 0


async def simulate(server: str, *args: str, status: int = 0, timeout: float = 60) -> str:
    """`pulse simulate` against the server, ending with ``status``; what it wrote to
    stderr."""
    env = dict(os.environ, PULSE_JWT_SECRET=TEST_SECRET)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", "simulate", "--url", server, "--tenant", "sim",
        "--devices", "3", "--rate", "5", "--duration", "1", *args,  # a later one wins
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == status, stderr
    return stderr.decode()


async def test_simulate_says_what_it_created_and_can_remove_it(
    server: str, make_token: Callable[..., str]
) -> None:
    """Issue #22 item 7: nothing is left in the tenant without saying so."""
    said = await simulate(server, "--clean-up")
    assert "devices sim-0001 to sim-0003 of tenant 'sim': 3 created" in said
    assert "2 added" in said and "deleted 3 devices and 2 alert rules" in said
    admin = {"Authorization": f"Bearer {make_token('sim', roles=('tenant-admin',))}"}
    async with httpx.AsyncClient(base_url=server, headers=admin) as http:
        assert (await http.get("/api/v1/customer/devices")).json()["devices"] == []
        assert (await http.get("/api/v1/customer/alert-rules")).json()["rules"] == []
    said = await simulate(server)
    assert "3 created" in said and "deleted" not in said
    said = await simulate(server, "--clean-up")  # the devices were there: they stay
    assert "3 already there, with a new token" in said and "0 added" in said
    async with httpx.AsyncClient(base_url=server, headers=admin) as http:
        assert len((await http.get("/api/v1/customer/devices")).json()["devices"]) == 3


async def test_a_clean_up_that_cannot_delete_says_so_and_fails(
    server: str, make_token: Callable[..., str]
) -> None:
    """From the client review of 7 December: --clean-up said "deleted N devices" whatever
    the server answered; a token that expired during the run (the one it mints lived an
    hour) left every device in place. It counts what the server deleted now, says what
    it could not, and exits 1. (A token it minted itself is minted again for it.)"""
    # Expired 15 s ago: taken for 15 s more (HTTP's 30 s leeway), then refused.
    token = make_token("sim", roles=("tenant-admin",), lifetime_s=-15)
    said = await simulate(
        server, "--token", token, "--duration", "20", "--clean-up", status=1, timeout=90
    )
    assert "deleted 0 devices and 0 alert rules; could not delete 5" in said, said
    assert "device sim-0001: 401 token_expired" in said, said
    assert "pulse simulate: --clean-up left 5 things in place (above)" in said, said
    admin = {"Authorization": f"Bearer {make_token('sim', roles=('tenant-admin',))}"}
    async with httpx.AsyncClient(base_url=server, headers=admin) as http:
        assert len((await http.get("/api/v1/customer/devices")).json()["devices"]) == 3


async def simulating(server: str, *args: str) -> tuple[asyncio.subprocess.Process, bytes]:
    """`pulse simulate --clean-up` for a minute, once it says it is simulating; what it
    wrote to stderr so far."""
    env = dict(os.environ, PULSE_JWT_SECRET=TEST_SECRET)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", "simulate", "--url", server, "--tenant", "sim",
        "--duration", "60", "--clean-up", *args, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    said = b""
    async with asyncio.timeout(30):
        while b"simulating " not in said:
            said += await proc.stderr.readline()
    return proc, said


async def test_a_run_stopped_by_sigterm_whose_clean_up_fails_exits_1(
    server: str, make_token: Callable[..., str]
) -> None:
    """From the review of fadd828: a run stopped by Ctrl-C or SIGTERM (the usual end of a
    run without --duration) exited 0 whatever its clean-up left."""
    # Expired 22 s ago: taken for 8 s more (HTTP's 30 s leeway), then refused.
    token = make_token("sim", roles=("tenant-admin",), lifetime_s=-22)
    refused_from = time.monotonic() + 9
    proc, said = await simulating(
        server, "--devices", "2", "--rate", "1", "--no-rules", "--token", token
    )
    await asyncio.sleep(max(0.0, refused_from - time.monotonic()))  # the token refused now
    proc.terminate()
    _, rest = await asyncio.wait_for(proc.communicate(), 30)
    said += rest or b""
    assert proc.returncode == 1, said
    assert b"could not delete 2 (device sim-0001: 401 token_expired" in said, said


async def test_sigterm_stops_a_run_and_cleans_up_as_ctrl_c_does(
    server: str, make_token: Callable[..., str]
) -> None:
    """From the operations audit: `timeout 12 pulse simulate --clean-up` (SIGTERM) left
    its devices, which then raised no-heartbeat alerts; only Ctrl-C cleaned up."""
    proc, said = await simulating(server, "--devices", "3", "--rate", "5")
    proc.terminate()
    _, rest = await asyncio.wait_for(proc.communicate(), 30)
    said += rest or b""
    assert proc.returncode == 0, said
    assert b"deleted 3 devices and 2 alert rules" in said, said
    admin = {"Authorization": f"Bearer {make_token('sim', roles=('tenant-admin',))}"}
    async with httpx.AsyncClient(base_url=server, headers=admin) as http:
        assert (await http.get("/api/v1/customer/devices")).json()["devices"] == []


async def test_a_device_of_that_id_that_is_not_simulated_keeps_its_token(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """From the client audit: `pulse simulate` (prefix dev, the README's own example
    device dev-0001) rotated the tokens of the tenant's real devices of those ids, and
    they were refused from then on. It stops instead, and removes what it made."""
    token = await provision_device(pool, "sim", "sim-0002")  # a real device, no name
    said = await simulate(server, status=1)  # no --clean-up: nothing to clean up
    assert "sim-0002 exists and is not a simulated device" in said, said
    # Refused before it made any (review 4 of 8 December: it had made sim-0001 and
    # sim-0003 first, and without --clean-up left them).
    async with httpx.AsyncClient(base_url=server) as http:
        r = await http.post(
            "/ingest/v1/tenant/sim/device/sim-0002/telemetry",
            json={"metrics": {"v": 1}},
            headers={"X-Provision-Token": token},
        )
        assert r.status_code == 201, r.text  # its token still works
        admin = {"Authorization": f"Bearer {make_token('sim', roles=('tenant-admin',))}"}
        devices = (await http.get("/api/v1/customer/devices", headers=admin)).json()["devices"]
    assert [d["device_id"] for d in devices] == ["sim-0002"]


async def test_rules_past_the_first_page_are_found(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """The rule list comes a page at a time (1,000 without a limit): the simulator's
    rules, made after a thousand others, are on the second page and in place."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('sim')")
    await pool.execute(
        """INSERT INTO alert_rules (tenant_id, name, metric, operator, threshold, severity)
           SELECT 'sim', 'other ' || i, 'temp', '>', i, 3 FROM generate_series(1, 1000) AS i"""
    )
    for rule in DEFAULT_RULES:
        await pool.execute(
            """INSERT INTO alert_rules (tenant_id, name, metric, operator, threshold, severity)
               VALUES ('sim', $1, $2, $3, $4, $5)""",
            rule["name"],
            rule["metric"],
            rule["operator"],
            rule["threshold"],
            rule["severity"],
        )
    admin = make_token(tenant_id="sim", roles=("tenant-admin",))
    simulator = Simulator(server, admin, tenant_id="sim", devices=1)
    try:
        assert await simulator.ensure_rules() == [r["name"] for r in DEFAULT_RULES]
    finally:
        await simulator.aclose()
    assert simulator.created_rules == []
    count = "SELECT count(*) FROM alert_rules WHERE tenant_id = 'sim'"
    assert await pool.fetchval(count) == 1000 + len(DEFAULT_RULES)


@pytest.fixture
async def small_quotas(settings: Settings) -> AsyncIterator[str]:
    """A server where a tenant may have 2 devices and 1 alert rule."""
    limits = dataclasses.replace(settings, max_devices_per_tenant=2, max_rules_per_tenant=1)
    async with running_server(limits) as url:
        yield url


async def test_the_device_quota_is_said_as_such(small_quotas: str) -> None:
    """From the user-experience audit: past PULSE_MAX_DEVICES_PER_TENANT, simulate took the
    409 tenant_quota for "the device exists", read it, and stopped with `cannot read
    dev-0003: 404 {"error":"unknown_device",...}`."""
    said = await simulate(small_quotas, "--clean-up", status=1)
    assert "unknown_device" not in said and "404" not in said, said
    assert (
        "pulse simulate: cannot create sim-0003: 409 tenant_quota: The tenant has 2 devices, "
        "as many as it may (2). Delete some, or raise PULSE_MAX_DEVICES_PER_TENANT. 2 of "
        "the 3 simulated devices were ready before the quota (2 created): simulate at most "
        "2 (--devices 2), or make room in tenant 'sim'.\n"
    ) in said, said
    assert "deleted 2 devices" in said  # --clean-up removes what it made


async def test_a_full_rule_quota_says_so_in_one_line_naming_no_rules(small_quotas: str) -> None:
    """From the same audit: past PULSE_MAX_RULES_PER_TENANT, simulate exited 1 with the
    server's raw JSON body, and no word of --no-rules."""
    said = await simulate(small_quotas, "--devices", "2", "--clean-up", status=1)
    last = said.splitlines()[-1]
    assert last.startswith(
        "pulse simulate: cannot create alert rule 'Battery below 15 %': 409 tenant_quota: "
        "The tenant has 1 alert rules, as many as it may (1)."
    ), said
    assert last.endswith("(--no-rules simulates without adding alert rules)"), said
    assert '{"error"' not in said, said
    said = await simulate(small_quotas, "--devices", "2", "--no-rules", "--clean-up")
    assert "simulating 2 devices" in said, said


async def test_devices_another_run_feeds_are_left_alone(
    server: str, make_token: Callable[..., str]
) -> None:
    """From the client review of 8 December: `pulse simulate` with its defaults (then
    prefix dev, the demo's) took over a running demo's devices: it rotated their tokens,
    and the demo's readings were refused from then on, without a word. A device seen
    again while the new run watches it is another run's: the new run stops instead."""
    admin = make_token(tenant_id="sim", roles=("tenant-admin",))
    feeder = Simulator(server, admin, tenant_id="sim", devices=2, rate=5.0)
    await feeder.provision()
    feeding = asyncio.create_task(feeder.run(duration_s=30))
    try:
        async with asyncio.timeout(10):
            while feeder.sent < 2:  # noqa: ASYNC110  both devices seen
                await asyncio.sleep(0.05)
        said = await simulate(server, "--prefix", "dev", "--devices", "2", status=1)
        assert "dev-0001 is fed by another run" in said, said
        sent = feeder.sent
        async with asyncio.timeout(10):
            while feeder.sent < sent + 4:  # noqa: ASYNC110  its tokens still work
                await asyncio.sleep(0.05)
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        await feeder.aclose()
    assert feeder.rejected == 0


@pytest.fixture
async def one_reading_a_second(settings: Settings) -> AsyncIterator[str]:
    """A server that takes one reading a second per device (a burst of one)."""
    limits = dataclasses.replace(settings, ingest_rate_per_device=1.0, ingest_burst_per_device=1)
    async with running_server(limits) as url:
        yield url


async def test_rejected_readings_are_said_once_and_counted(one_reading_a_second: str) -> None:
    """From the same review: beyond the server's rate per device, every rejected reading
    was a line (2,598 in 4 s), and the run ended saying only what was sent."""
    said = await simulate(
        one_reading_a_second, "--devices", "1", "--rate", "20", "--duration", "2", "--no-rules"
    )
    assert said.count("readings rejected: rate_limited") == 1, said
    [summary] = [line for line in said.splitlines() if line.startswith("sent ")]
    sent, rejected = map(int, re.findall(r"\d+", summary.split("(")[0]))
    assert rejected >= 20 and sent >= 1, summary
    assert summary.endswith(f"rejected (rate_limited: {rejected})"), summary


@pytest.mark.parametrize("command", ["simulate", "demo"])
async def test_a_rate_beyond_a_thousand_a_second_is_refused(command: str) -> None:
    """From the same review: --rate 1e9 built millions of readings a turn, took all the
    memory and never stopped at --duration."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", command, "--rate", "1e9", stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"--rate: 1e9 is more than 1000 readings a second per device" in stderr, stderr


async def test_a_fleet_beyond_a_hundred_thousand_readings_a_second_is_refused() -> None:
    """Review 4 of 8 December: the ceiling per device left the fleet's open: 1,000
    devices at 1,000 a second held 905 MiB and ran 82 s of a 3 s --duration."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", "simulate", "--devices", "1000", "--rate", "101",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert stderr.decode().strip() == (
        "pulse simulate: --devices 1000 at --rate 101 is 101,000 readings a second: at most 100,000"
    )


async def test_refused_batches_are_said_once_and_counted_by_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review 4 of 8 December: a batch the server refused whole (503 in a database
    outage) was a line per batch, five a second, and the run's end gave no reason."""
    body = b'{"error":"database_unavailable","detail":"The database is unreachable."}'

    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "application/json"}
        return httpx.Response(503, content=body, headers=headers)

    http = httpx.AsyncClient(base_url="http://pulse.test", transport=httpx.MockTransport(answer))
    simulator = Simulator(
        "http://pulse.test", "token", tenant_id="sim", devices=5, rate=20.0, http=http
    )
    for device in simulator.devices:
        device.provision_token = "t"
    try:
        await simulator.run(duration_s=0.5)
    finally:
        await simulator.aclose()
        await http.aclose()
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("batches refused: 503"), said
    assert simulator.rejected >= 10 and simulator.sent == 0
    assert simulator.describe_rejections() == (
        f"; {simulator.rejected} rejected (database_unavailable: {simulator.rejected})"
    )
