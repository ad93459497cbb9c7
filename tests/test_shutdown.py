"""Graceful shutdown: streams end first, in-flight ingest finishes, nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.streams.sse_client import SSE_PATH, ResumingClient
from tests.streams.ws_support import closed, open_ws, recv
from tests.support import provision_device, pulse_serve, sse_events, start_serve, until
from tests.uploads import slow_upload
from tests.web.db_proxy import database_proxy

pytestmark = pytest.mark.timeout(120)


async def test_sigterm_ends_streams_and_finishes_ingest(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token
) -> None:  # type: ignore[no-untyped-def]
    device_token = await provision_device(pool, "t1", "d1")
    # A timeout far beyond what a clean shutdown takes: streams that held it open would
    # show as the full 20 s (a busy machine takes a second or two).
    env = {"PULSE_SHUTDOWN_TIMEOUT_S": "20", "PULSE_INGEST_BURST_PER_DEVICE": "100000"}
    async with pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server:  # noqa: SIM117
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            acknowledged: list[int] = []
            fifty = asyncio.Event()
            failed = 0

            async def ingest_forever() -> None:
                nonlocal failed
                while True:
                    try:
                        r = await http.post(
                            "/ingest/v1/tenant/t1/device/d1/telemetry",
                            json={"metrics": {"v": 1}},
                            headers={"X-Provision-Token": device_token},
                        )
                    except httpx.TransportError:
                        failed += 1
                        return
                    if r.status_code == 201:
                        acknowledged.append(r.json()["id"])
                        if len(acknowledged) >= 50:
                            fifty.set()
                    else:
                        failed += 1
                        return

            async with http.stream(
                "GET", SSE_PATH, headers={"Authorization": f"Bearer {make_token('t1')}"}
            ) as stream:
                events = sse_events(stream, comments=True)
                writers = [asyncio.create_task(ingest_forever()) for _ in range(8)]
                await asyncio.wait_for(fifty.wait(), 15)
                started = time.monotonic()
                server.proc.terminate()
                # The stream ends by itself, cleanly (a complete chunked body).
                async for _ in events:
                    pass
                await asyncio.wait_for(asyncio.gather(*writers), 15)
            await server.stop()
            took = time.monotonic() - started
    assert took < 12, took
    # The log says it: the deploy, not a gap, for whoever reads it at 3 a.m.
    log = server.stderr.decode()
    assert "shutting down: streams end now" in log and "INFO pulse.serving: stopped" in log, log
    committed = {r["id"] for r in await pool.fetch("SELECT id FROM telemetry")}
    assert set(acknowledged) <= committed  # every 201 was committed
    assert len(acknowledged) >= 50


async def test_sighup_stops_one_process_as_sigterm_does(
    database_url: str, tmp_path: Path, make_token
) -> None:  # type: ignore[no-untyped-def]
    """From the operations review of 8 December: under --workers SIGHUP (a closed
    terminal, a process manager's) was a graceful stop; one process died of it at once
    with status 129, saying nothing, its streams cut without their 1012."""
    async with pulse_serve(data_dir=tmp_path, database_url=database_url) as server:
        async with open_ws(server.url, token=make_token("t1")) as ws:
            assert (await recv(ws))["type"] == "connected"
            server.proc.send_signal(signal.SIGHUP)
            code, _ = await closed(ws, timeout=20)
            assert code == 1012
        assert await server.stop() == 0
    assert "stopped" in server.stderr.decode(), server.stderr.decode()[-2000:]


async def test_rolling_restart_loses_nothing(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token
) -> None:  # type: ignore[no-untyped-def]
    """Two servers on one database; one is restarted under load; clients move to the other."""
    device_token = await provision_device(pool, "t1", "d1")
    env = {"PULSE_INGEST_BURST_PER_DEVICE": "100000", "PULSE_SSE_KEEPALIVE_S": "0.3"}
    async with (
        pulse_serve(data_dir=tmp_path / "a", database_url=database_url, env=env) as a,
        pulse_serve(data_dir=tmp_path / "b", database_url=database_url, env=env) as b,
    ):
        final: list[int] = []

        def caught_up(c: ResumingClient) -> bool:
            return bool(final) and (c.last_id or 0) >= final[0]

        clients = [ResumingClient(a.url, make_token("t1"), seed=i) for i in range(3)]
        readers = [
            asyncio.create_task(c.run(caught_up, drop_after=(10**6, 10**6), fallback_urls=(b.url,)))
            for c in clients
        ]
        async with httpx.AsyncClient(base_url=b.url, timeout=20) as http:
            written = 0

            async def write(n: int) -> None:
                nonlocal written
                for _ in range(n):
                    r = await http.post(
                        "/ingest/v1/tenant/t1/device/d1/telemetry",
                        json={"metrics": {"v": 1}},
                        headers={"X-Provision-Token": device_token},
                    )
                    assert r.status_code == 201
                    written += 1
                    await asyncio.sleep(0.002)  # a steady trickle, not a burst

            writing = asyncio.gather(*(write(150) for _ in range(4)))
            await until(lambda: written >= 100, timeout=30)
            await a.stop()  # SIGTERM mid-stream
            await writing
        final.append(await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id='t1'"))
        await asyncio.wait_for(asyncio.gather(*readers), 30)
    expected = [r["id"] for r in await pool.fetch("SELECT id FROM telemetry ORDER BY id")]
    assert len(expected) == 600
    for client in clients:
        assert client.ids == expected
        assert client.connections >= 2  # each one moved to the other server


@pytest.mark.parametrize("group_commit", ["1", "0"])
async def test_a_write_still_waiting_when_time_is_up_is_rolled_back_and_answered_503(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, group_commit: str
) -> None:
    """From the operations audit (HIGH): readings waiting on a lock when the shutdown's
    time ran out were answered hypercorn's empty 500, then committed once the lock was
    released, and the process overran PULSE_SHUTDOWN_TIMEOUT_S waiting for them. Now
    the writer ends its writes a second before the time is up: their statements are
    cancelled, nothing is committed, each caller gets 503 with Retry-After, and the
    process exits on time. Without group commit too, where the write ran in its request's
    task, which hypercorn cancelled at the timeout: an empty 500."""
    device_token = await provision_device(pool, "t1", "d1")
    env = {"PULSE_SHUTDOWN_TIMEOUT_S": "3", "PULSE_GROUP_COMMIT": group_commit}
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        # A connection of its own: the pool's would be ended idle in its transaction.
        locker = await asyncpg.connect(database_url)
        blocked = locker.transaction()
        await blocked.start()
        await locker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
        posts = [
            asyncio.create_task(
                http.post(
                    "/ingest/v1/tenant/t1/device/d1/telemetry",
                    json={"metrics": {"v": i}, "seq": i},
                    headers={"X-Provision-Token": device_token},
                )
            )
            for i in range(4)
        ]
        async with asyncio.timeout(15):  # the writes wait on the lock
            while not await pool.fetchval(  # noqa: ASYNC110  (no event to wait on)
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'pulse' AND wait_event_type = 'Lock'"
            ):
                await asyncio.sleep(0.05)
        started = time.monotonic()
        server.proc.terminate()
        answers = await asyncio.wait_for(asyncio.gather(*posts), 15)
        await server.stop()
        took = time.monotonic() - started
        await blocked.rollback()
        await locker.close()
    assert [r.status_code for r in answers] == [503] * 4, [r.text for r in answers]
    assert all(r.headers.get("retry-after") for r in answers)
    assert took < 3 + 3, took  # the timeout, and a busy machine's second or two
    assert await pool.fetchval("SELECT count(*) FROM telemetry") == 0


async def test_a_request_cut_at_the_timeout_is_one_line_not_a_traceback(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """From the operations audit (LOW): a request whose body was still arriving when the
    shutdown's time was up was cut, as documented, but the log said so with an ERROR and
    a 25-line asyncio traceback (a CancelledError in a callback of asyncio's streams),
    which reads like a crash. Now one WARNING line counts what was cut. And the review of
    8 December: the client got hypercorn's empty 500 (a device drops a reading on a 500),
    now the 503 ingest answers when it cannot write, with its Retry-After."""
    token = await provision_device(pool, "t1", "d1")
    env = {"PULSE_SHUTDOWN_TIMEOUT_S": "1"}
    async with pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server:
        upload = await slow_upload(server.url, "t1", "d1", token)
        started = time.monotonic()
        await server.stop()
        took = time.monotonic() - started
        head, _, body = (await upload.cut()).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"\r\nretry-after: 1\r\n" in head.lower(), head
        assert json.loads(body)["error"] == "database_unavailable", body
    log = server.stderr.decode()
    assert took < 1 + 3, took  # the timeout, and a busy machine's second or two
    assert "Traceback" not in log, log
    assert not [line for line in log.splitlines() if " ERROR " in line], log
    assert "shutting down: 1 request still in flight after 1 s was cut" in log, log
    assert await pool.fetchval("SELECT count(*) FROM telemetry") == 0


async def test_sigterm_with_the_database_frozen_ends_streams_at_once_and_exits_in_time(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token
) -> None:  # type: ignore[no-untyped-def]
    """From the operations audit (HIGH): SIGTERM while the database had stopped answering
    (SIGSTOPped: its connections open, nothing answered) closed the WebSocket after 5 s,
    answered the write in flight hypercorn's empty 500 with no Retry-After, cut the SSE
    stream, and exited after 75 s with status 1, the last line blaming the *start*
    (`did not start within 60 s`). Each stream waited for its slot's release, a statement
    the database never answered, before it was closed; the runtime's stop waited for
    ever on tasks cancelled in the middle of a statement, until hypercorn's 60 s lifespan
    timeout. Now streams end at once (1012, a clean SSE end), the write gets 503 with
    Retry-After, and the process exits within about PULSE_SHUTDOWN_TIMEOUT_S, logging
    what it gave up on and then `stopped`."""
    device_token = await provision_device(pool, "t1", "d1")
    timeout_s = 4
    env = {"PULSE_SHUTDOWN_TIMEOUT_S": str(timeout_s)}
    async with database_proxy(database_url) as proxy:
        server = await start_serve(data_dir=tmp_path, database_url=proxy.dsn, env=env)
        try:
            await server.wait_ready()
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=60) as http,
                open_ws(server.url, token=make_token("t1")) as ws,
                http.stream(
                    "GET", SSE_PATH, headers={"Authorization": f"Bearer {make_token('t1')}"}
                ) as stream,
            ):
                assert (await recv(ws))["type"] == "connected"
                lines = stream.aiter_lines()
                # Its first lines come once it holds its slot and has its start (two
                # statements): it is live, and ends at SIGTERM whatever the database does.
                assert (await anext(lines)).startswith("retry:")
                while not (await anext(lines)).startswith("id:"):
                    pass
                proxy.freeze()
                post = asyncio.create_task(
                    http.post(
                        "/ingest/v1/tenant/t1/device/d1/telemetry",
                        json={"metrics": {"v": 1}},
                        headers={"X-Provision-Token": device_token},
                    )
                )

                async def in_flight() -> bool:
                    metrics = (await http.get("/metrics")).text
                    return "\npulse_ingest_in_flight 1.0\n" in metrics

                async with asyncio.timeout(15):  # the write waits on the frozen database
                    while not await in_flight():  # noqa: ASYNC110  (no event to wait on)
                        await asyncio.sleep(0.05)
                started = time.monotonic()
                server.proc.terminate()

                def since() -> float:
                    return round(time.monotonic() - started, 2)

                async def sse_end() -> tuple[str, float]:
                    try:
                        async for _ in sse_events(stream, comments=True, lines=lines):
                            pass
                    except httpx.HTTPError as exc:  # cut, not ended
                        return type(exc).__name__, since()
                    return "ended", since()

                async def ws_end() -> tuple[int | None, float]:
                    code, _ = await closed(ws, timeout=wait_s)
                    return code, since()

                async def answered() -> tuple[httpx.Response, float]:
                    return await post, since()

                async def exited() -> tuple[bytes, float]:
                    _, stderr = await server.proc.communicate()
                    return stderr, since()

                # Well past the time it should take; long enough to see what it does.
                wait_s = timeout_s + 10
                tasks = [
                    asyncio.ensure_future(c) for c in (ws_end(), sse_end(), answered(), exited())
                ]
                await asyncio.wait(tasks, timeout=wait_s)
                if not tasks[-1].done():
                    server.kill()
                (code, ws_took), (sse_end_, sse_took), (answer, answer_took), (stderr, took) = [
                    t.result() if t.done() and not t.exception() else (None, None)
                    for t in tasks[:-1]
                ] + [await tasks[-1]]
                for task in tasks:
                    task.cancel()
        finally:
            proxy.thaw()
            if server.proc.returncode is None:
                server.kill()
                await server.proc.wait()
    log = stderr.decode()
    # Streams end at once, whatever the database does (a busy machine's second).
    seen = {
        "websocket": (code, ws_took),
        "sse": (sse_end_, sse_took),
        "write": (answer and (answer.status_code, answer.text), answer_took),
        "exit": (server.proc.returncode, took),
    }
    assert code == 1012 and sse_end_ == "ended", (seen, log)
    assert ws_took < 1.5 and sse_took < 1.5, (seen, log)
    # The write, not committed, is refused in time for its client to retry elsewhere.
    assert answer is not None and answer.status_code == 503, (seen, log)
    assert answer.json()["error"] == "database_unavailable"
    assert answer.headers.get("retry-after")
    assert answer_took < timeout_s + 1, seen
    # The whole process within about the timeout: a stop, not a failed start.
    assert not server.killed and took < timeout_s + 3, (seen, log)
    assert server.proc.returncode == 0, log
    assert "did not start" not in log, log
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines[-1].endswith("INFO pulse.serving: stopped"), log
    assert any(f"did not stop within {timeout_s} s" in line for line in lines), log


def test_the_stop_keeps_time_for_mqtt_to_leave() -> None:
    """The review of 988acec: the runtime's stop got what was left of
    PULSE_SHUTDOWN_TIMEOUT_S, 1 s at least, so requests that took the whole time left
    MQTT's leave (up to LEAVE_TIMEOUT_S, 5 s) cut short, and the log blamed the
    database."""
    from pulse.config import Settings
    from pulse.mqtt.link import LEAVE_TIMEOUT_S
    from pulse.runtime import MIN_STOP_S, ShutdownClock, least_stop_s

    assert least_stop_s(Settings()) == MIN_STOP_S
    with_mqtt = least_stop_s(Settings(mqtt_url="mqtt://127.0.0.1:1883"))
    assert with_mqtt > LEAVE_TIMEOUT_S
    spent = ShutdownClock(0.0, with_mqtt)  # every second of it taken by the requests
    spent.start()
    assert spent.left() == with_mqtt
