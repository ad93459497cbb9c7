"""SSE clients that stop reading, on a tenant with large events: what they cost the server.

Each client opens a stream, reads the response head and never reads again (a tiny
receive buffer, as a frozen tab or a stalled proxy); when the server cuts it as
lagging and resets it, it connects again. Meanwhile the tenant's devices post
events of 200 metrics (about 14 kB each) at a steady rate. Measured: the server's
resident memory at its peak, over what it holds with no such client, and how long
a small request waits meanwhile (the event loop's stalls).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time

import httpx
import orjson

from benchmarks.harness import Figure, Postgres, PulseServer, percentile, provision, token

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"
BATCH = 50


def _large_metrics(rng: random.Random) -> dict[str, float]:
    return {f"m{i:03d}_" + "x" * 59: round(rng.random(), 4) for i in range(200)}


async def _stuck_client(port: int, tok: str, stop: float, opened: list[int]) -> None:
    """Open a stream, read its head, read nothing more; again once the server drops it."""
    loop = asyncio.get_running_loop()
    request = f"GET {SSE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n"
    while time.monotonic() < stop:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, request.encode())
            await loop.sock_recv(sock, 1024)  # the head; nothing after it is read
            opened[0] += 1
            while time.monotonic() < stop:
                await asyncio.sleep(0.25)
                sock.send(b"")  # raises once the server has reset the connection
                with contextlib.suppress(BlockingIOError):
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        break  # closed by the server
        except OSError:
            pass  # reset by the server: connect again
        finally:
            sock.close()


async def _run(
    pg: Postgres, clients: int, seconds: float, rate: int
) -> tuple[list[int], list[float], int, int]:
    """Server RSS samples, small-request latencies, events posted, streams opened."""
    dsn = await pg.fresh_database()
    async with PulseServer(dsn) as server:
        devices = await provision(server.url, "tenant-1", 4)
        rng = random.Random(1)
        pairs = list(devices.items())
        bodies = [
            orjson.dumps(
                {
                    "messages": [
                        {
                            "tenant_id": "tenant-1",
                            "device_id": pairs[i % len(pairs)][0],
                            "provision_token": pairs[i % len(pairs)][1],
                            "metrics": _large_metrics(rng),
                        }
                        for i in range(BATCH)
                    ]
                }
            )
            for _ in range(4)
        ]
        stop = time.monotonic() + seconds
        opened = [0]
        tok = token("tenant-1", roles=("customer",))
        tasks = [
            asyncio.create_task(_stuck_client(server.port, tok, stop, opened))
            for _ in range(clients)
        ]
        rss: list[int] = []
        waits: list[float] = []

        async def sample() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                while time.monotonic() < stop + 2:
                    rss.append(server.rss())
                    started = time.perf_counter()
                    await http.get("/healthz")
                    waits.append(time.perf_counter() - started)
                    await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        posted = 0
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            began = time.monotonic()
            while time.monotonic() < stop:
                answer = await http.post(
                    "/ingest/v1/batch",
                    content=bodies[(posted // BATCH) % len(bodies)],
                    headers={"Content-Type": "application/json"},
                )
                assert answer.status_code == 200, answer.text[:200]
                posted += BATCH
                ahead = posted / rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*tasks, sampler)
    return rss, waits, posted, opened[0]


async def stuck_readers(pg: Postgres, quick: bool) -> list[Figure]:
    clients, seconds, rate = (20, 8.0, 500) if quick else (99, 60.0, 1000)
    base_rss, base_waits, _, _ = await _run(pg, 0, seconds, rate)
    rss, waits, posted, opened = await _run(pg, clients, seconds, rate)
    over = (max(rss) - max(base_rss)) / 2**20
    scenario = f"{clients} SSE clients that stop reading, 14 kB events at {rate}/s"
    return [
        Figure(
            scenario,
            "server peak RSS over no such client",
            over,
            "MiB",
            note=f"{over / clients:.1f} MiB per client; peak {max(rss) / 2**20:.0f} MiB, "
            f"{max(base_rss) / 2**20:.0f} MiB without them; {opened} streams opened, "
            f"{posted / seconds:,.0f} events/s posted",
        ),
        Figure(
            scenario,
            "small request p99 (max)",
            percentile(waits, 99) * 1000,
            "ms",
            baseline=percentile(base_waits, 99) * 1000,
            note=f"max {max(waits) * 1000:.0f} ms; without them p99 "
            f"{percentile(base_waits, 99) * 1000:.0f} ms",
        ),
    ]
