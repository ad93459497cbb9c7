"""Kill the server under consuming clients (SSE, WebSocket, `pulse tail`) and bring it back:
each one's events equal the table's rows, none missing and none twice."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from pulse.client import BadRequest, FleetSummary, Notice, PulseClient, Telemetry
from tests.client.conftest import table_events
from tests.client.restartable import restartable_server
from tests.support import insert_readings

pytestmark = pytest.mark.timeout(120)

FAST = {
    "PULSE_SSE_KEEPALIVE_S": "0.5",
    "PULSE_WS_PING_S": "0.5",
    "PULSE_WS_KEEPALIVE_S": "0.5",
    "PULSE_SHUTDOWN_TIMEOUT_S": "2",
}


async def writer(pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    """Small batches for random devices, straight into the table, server up or not."""
    rng = random.Random(3)
    n = 0
    while not stop.is_set():
        batch = []
        for _ in range(rng.randint(1, 5)):
            n += 1
            batch.append(
                (f"dev-{rng.randint(1, 4)}", {"temp": round(rng.uniform(15, 30), 2), "n": n})
            )
        await insert_readings(pool, "t1", batch)
        await asyncio.sleep(0.02)


async def eventually(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Poll ``condition`` (the consumers' progress) until it holds."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met")


async def committed(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM telemetry WHERE tenant_id = 't1'"))


async def eventually_async(
    read: Callable[[], Awaitable[int]], holds: Callable[[int], bool], timeout: float = 30
) -> None:
    """Poll ``read()`` until ``holds`` its value."""
    async with asyncio.timeout(timeout):
        while not holds(await read()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def collect(stream: AsyncIterator[Telemetry], out: list[Telemetry]) -> None:
    async for event in stream:
        out.append(event)


async def read_lines(stdout: asyncio.StreamReader, out: list[dict[str, Any]]) -> None:
    async for line in stdout:
        out.append(orjson.loads(line))


async def test_clients_resume_exactly_across_a_killed_server(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    token = make_token()
    stop_writing = asyncio.Event()
    sse_events: list[Telemetry] = []
    ws_events: list[Telemetry] = []
    tail_events: list[dict[str, Any]] = []
    async with (
        restartable_server(database_url, tmp_path, env=FAST) as server,
        PulseClient(server.url, token, backoff_base_s=0.05, backoff_cap_s=0.5) as client,
    ):
        sse, ws = client.sse(last_event_id=0), client.websocket(last_event_id=0)
        tail = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pulse",
            "tail",
            "--url",
            server.url,
            "--token",
            token,
            "--from-id",
            "0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert tail.stdout is not None and tail.stderr is not None
        tasks = [
            asyncio.create_task(collect(sse, sse_events)),
            asyncio.create_task(collect(ws, ws_events)),
            asyncio.create_task(read_lines(tail.stdout, tail_events)),
            asyncio.create_task(writer(pool, stop_writing)),
        ]
        try:
            await eventually(lambda: min(len(sse_events), len(ws_events), len(tail_events)) > 30)
            await server.kill()
            # Rows keep committing while nobody serves them.
            down_at = await committed(pool)
            await eventually_async(lambda: committed(pool), lambda n: n >= down_at + 20)
            await server.start()
            before = len(sse_events), len(ws_events), len(tail_events)
            await eventually(
                lambda: min(len(sse_events), len(ws_events), len(tail_events)) > max(before) + 30
            )
            stop_writing.set()
            await tasks[3]
            newest = await pool.fetchval("SELECT max(id) FROM telemetry WHERE tenant_id = 't1'")
            await eventually(
                lambda: (
                    bool(sse_events and ws_events and tail_events)
                    and sse_events[-1].id == ws_events[-1].id == tail_events[-1]["id"] == newest
                )
            )
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(ProcessLookupError):
                tail.send_signal(signal.SIGINT)
            _, tail_stderr = await asyncio.wait_for(tail.communicate(), 10)
            await asyncio.gather(*tasks, return_exceptions=True)

    table = await table_events(pool, "t1")
    assert len(table) > 100
    assert [(e.id, e.device_id, e.metrics) for e in sse_events] == table
    assert [(e.id, e.device_id, e.metrics) for e in ws_events] == table
    assert [(e["id"], e["device_id"], e["data"]["metrics"]) for e in tail_events] == table
    assert sse.connections >= 2 and ws.connections >= 2
    assert sse.duplicates_dropped == ws.duplicates_dropped == 0
    assert b"# disconnected" in tail_stderr and tail.returncode == 0, tail_stderr.decode()


async def test_filters_and_subscriptions_are_sent_again_after_a_restart(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    """Filters changed while connected, and v2 subscriptions, survive a killed server."""
    stop_writing = asyncio.Event()
    filtered: list[Telemetry] = []
    summaries: list[tuple[int, FleetSummary]] = []  # (server start number, summary)
    async with (
        restartable_server(database_url, tmp_path, env=FAST) as server,
        PulseClient(server.url, make_token(), backoff_base_s=0.05, backoff_cap_s=0.5) as client,
    ):
        ws = client.websocket(device_ids=["dev-1"])
        v2 = client.v2(fleet=True)

        async def follow_v2() -> None:
            async for event in v2:
                if isinstance(event, FleetSummary):
                    summaries.append((server.starts, event))

        tasks = [
            asyncio.create_task(collect(ws, filtered)),
            asyncio.create_task(follow_v2()),
            asyncio.create_task(writer(pool, stop_writing)),
        ]
        try:
            await eventually(lambda: len(filtered) > 5 and bool(summaries))
            # The metric filter first: the server takes a connection's frames in order,
            # so from the first dev-2 event on, both are in force.
            await ws.set_metrics(["temp"])
            await ws.subscribe(["dev-2"])
            await eventually(lambda: any(e.device_id == "dev-2" for e in filtered))
            await server.kill()
            await server.start()
            restarted_at = len(filtered)
            await eventually(lambda: len(filtered) > restarted_at + 20)
            await eventually(lambda: any(start == 2 for start, _ in summaries))
            stop_writing.set()
            await tasks[2]
            newest = await pool.fetchval("SELECT max(id) FROM telemetry WHERE tenant_id = 't1'")
            await eventually(lambda: ws.last_event_id == newest)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # From the first dev-2 event on (the subscription in force), exactly the matching rows.
    first = next(e.id for e in filtered if e.device_id == "dev-2")
    expected = [
        (i, device, {"temp": metrics["temp"]})
        for i, device, metrics in await table_events(pool, "t1")
        if i >= first and device in ("dev-1", "dev-2")
    ]
    assert [(e.id, e.device_id, e.metrics) for e in filtered if e.id >= first] == expected
    assert ws.connections >= 2 and v2.connections >= 2
    assert (ws.device_ids, ws.metrics) == ({"dev-1", "dev-2"}, {"temp"})


async def test_filters_changed_while_apart_are_replayed_and_malformed_ones_refused_at_once(
    database_url: str, pool: asyncpg.Pool, make_token: Callable[..., str], tmp_path: Path
) -> None:
    """From the client reviews of 7 December.

    - A malformed id given to `subscribe` was sent, refused by the server (an `error`
      notice), and kept: the next reconnect's URL held it, which the server refused, and
      after a restart the stream died with `400 invalid_parameter`. It is refused at once
      now (ValueError), never sent or kept.
    - A reconnect's URL carries the filters wanted, so a `subscribe` made while the
      server was down is in the replay of what was missed (review 6 lost d3's readings
      when only the filters the server had granted were carried).
    - More devices than PULSE_MAX_DEVICE_FILTERS, asked for on an open connection, are an
      `error` notice; kept, they end the stream at its next reconnect, `400
      invalid_parameter` (a clear error, where a fallback to fewer filters lost events:
      review 7)."""
    notices: list[Notice] = []
    got: list[Telemetry] = []
    env = FAST | {"PULSE_MAX_DEVICE_FILTERS": "2"}
    async with (
        restartable_server(database_url, tmp_path, env=env) as server,
        PulseClient(
            server.url, make_token(), backoff_base_s=0.05, backoff_cap_s=0.5,
            on_notice=notices.append,
        ) as client,
    ):  # fmt: skip
        ws = client.websocket(device_ids=["dev-1"])
        task = asyncio.create_task(collect(ws, got))

        def said(kind: str) -> int:
            return sum(n.kind == kind for n in notices)

        try:
            await eventually(lambda: said("connected") == 1)
            with pytest.raises(ValueError, match="'no such id!' is not a device id"):
                await ws.subscribe(["dev-2", "no such id!"])
            with pytest.raises(ValueError, match="'bad metric' is not a metric name"):
                await ws.set_metrics(["temp", "bad metric"])
            assert ws.device_ids == {"dev-1"} and ws.metrics is None

            await server.kill()
            await ws.subscribe(["dev-3"])  # while apart, with readings it must replay
            apart = await insert_readings(pool, "t1", [("dev-3", {"n": 1}), ("dev-2", {"n": 2})])
            apart += await insert_readings(pool, "t1", [("dev-3", {"n": 3})])
            await server.start()
            await eventually(lambda: said("connected") == 2)
            await eventually(lambda: bool(got) and got[-1].id >= apart[-1])
            assert [e.id for e in got if e.id in apart] == [apart[0], apart[2]]  # not dev-2
            assert said("error") == 0

            await ws.subscribe(["dev-4"])  # a third device: over the server's limit
            await eventually(lambda: said("error") == 1)
            await server.kill()
            await server.start()
            await eventually(task.done)
            with pytest.raises(BadRequest, match="400 invalid_parameter"):
                task.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
