"""Fuzz both WebSockets with a few thousand bad frames: every frame gets an error or a
close from the contract, the process survives, and other clients keep receiving."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from pulse.config import Settings
from tests.streams.ws_support import V2_PATH, WS_PATH, recv, request, until_no_connections, ws_url
from tests.support import insert_readings, running_server

pytestmark = pytest.mark.timeout(180)

FRAMES_PER_PATH = 1500
WINDOW = 25  # frames sent before their answers are read


@dataclasses.dataclass(frozen=True)
class Frame:
    data: str | bytes
    text: bool  # sent as a text frame (bytes in a text frame: not valid UTF-8)
    closes: int | None = None  # the close code it must get; None: an error message


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value."""
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**70, 1.5e308, -0.0, rng.randint(-(10**9), 10**9)])
    if kind == 3:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
    if kind == 4:
        return rng.choice(["", " ", "null", "ping", "subscribe", "\u0000", "é" * 100])
    if kind == 5:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {
        rng.choice(["action", "type", "device_id", "device_ids", "metrics", "token", "x"]): junk(
            rng, depth + 1
        )
        for _ in range(rng.randrange(0, 4))
    }


def bad_name(rng: random.Random) -> Any:
    return rng.choice(
        [
            None if rng.random() < 0.1 else 7,
            "has space",
            "x" * 65,
            "ünïcode",
            "",
            ["d1"],
            {"d": 1},
            "d1;DROP TABLE devices",
            "x" * rng.randrange(1000, 20_000),
        ]
    )


def bad_message(rng: random.Random, path: str) -> Any:
    """A JSON message that is wrong in a way the protocol must answer with an error."""
    if path == WS_PATH:
        choices: list[Any] = [
            {"action": junk(rng)} if rng.random() < 0.5 else {"no": "action"},
            {"action": "subscribe", "device_id": bad_name(rng)},
            {"action": "subscribe", "device_ids": [bad_name(rng)]},
            {"action": "subscribe", "device_ids": junk(rng) or 5},
            {"action": "unsubscribe", "device_ids": rng.choice([[], None, "d1"])},
            {"action": "set_metrics", "metrics": rng.choice([None, "temp", 3, {}, [1]])},
            {"action": "set_metrics", "metrics": [bad_name(rng)]},
            {"action": "auth", "token": rng.choice([None, "", 5, "a.b.c", "x" * 5000])},
            {"action": rng.choice(["PING", "Subscribe", "ping ", "auth2", "close"])},
        ]
    else:
        choices = [
            {"action": junk(rng), "type": "fleet"},
            {"action": "subscribe", "type": junk(rng)},
            {"action": "subscribe", "type": "device", "device_id": bad_name(rng)},
            {"action": "unsubscribe", "type": "device", "device_id": bad_name(rng)},
            {"action": rng.choice(["ping", "auth", "SUBSCRIBE"]), "type": "alerts"},
        ]
    message = rng.choice(choices)
    if message.get("action") in ("ping", "clear_filters") and path == WS_PATH:
        message["action"] = "pingg"
    if path == V2_PATH and message.get("type") in ("alerts", "fleet"):
        message["type"] = "fleets"  # a valid subscription is not what this is for
    return message


def frames(rng: random.Random, path: str, count: int) -> list[Frame]:
    out: list[Frame] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.35:
            value = junk(rng)
            if isinstance(value, dict):
                value = [value]  # an object might be a valid message; an array never is
            out.append(Frame(json.dumps(value), text=True))
        elif roll < 0.75:
            out.append(Frame(json.dumps(bad_message(rng, path)), text=True))
        elif roll < 0.85:
            size = rng.choice([1, 10, 1000, 60_000])
            out.append(Frame(rng.randbytes(size), text=False))
        elif roll < 0.92:
            # Not JSON: random text, cut JSON, or text up to the limit.
            text = rng.choice(
                ["{", '{"action":', "}", "nul", "\ufeff{}", "x" * rng.randrange(1, 64 * 1024)]
            )
            out.append(Frame(text, text=True))
        elif roll < 0.96:
            out.append(Frame("y" * rng.randrange(64 * 1024 + 1, 200_000), text=True, closes=1009))
        else:
            broken = b'{"action": "' + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]) + b'"}'
            out.append(Frame(broken, text=True, closes=1007))
    return out


async def _connect(
    base: str, path: str, token: str, device_id: str | None = None
) -> ClientConnection:
    url = ws_url(base, path, token=token, device_id=device_id)
    ws = await connect(url, max_size=None, open_timeout=10)
    if path == WS_PATH:
        assert (await recv(ws))["type"] == "connected"
    return ws


async def fuzz(base: str, path: str, token: str, seed: int) -> dict[str, int]:
    """Send the frames in windows; every one must get its answer. Counts of what came back."""
    rng = random.Random(seed)
    counts = {"error": 0, "1009": 0, "1007": 0, "connections": 1}
    # The fuzzing connections stream no device, so that every message is an answer.
    quiet = "nothing-here" if path == WS_PATH else None
    ws = await _connect(base, path, token, quiet)
    pending = frames(rng, path, FRAMES_PER_PATH)
    while pending:
        # A frame that closes the connection goes alone: the server closes at once
        # (hypercorn itself, for 1009 and 1007), and answers still on their way to
        # the client are lost with the connection.
        window = [pending.pop(0)]
        while pending and len(window) < WINDOW and not (window[0].closes or pending[0].closes):
            window.append(pending.pop(0))
        for frame in window:
            await ws.send(frame.data, text=frame.text)
        for frame in window:
            if frame.closes is None:
                answer = await recv(ws, timeout=10)
                assert set(answer) == {"type", "message"}, (frame.data[:200], answer)
                assert answer["type"] == "error", (frame.data[:200], answer)
                counts["error"] += 1
                continue
            try:
                unexpected = await asyncio.wait_for(ws.recv(), 10)
                raise AssertionError(f"expected a close, got {unexpected!r}")
            except ConnectionClosed:
                pass
            assert ws.close_code == frame.closes, (frame.data[:100], ws.close_code)
            counts[str(frame.closes)] += 1
            counts["connections"] += 1
            ws = await _connect(base, path, token, quiet)
    await ws.close()
    return counts


async def test_fuzz_both_websockets(
    settings: Settings,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_server(dataclasses.replace(settings, ws_ping_s=60)) as base:
        await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
        token = make_token("t1")
        stream = await _connect(base, WS_PATH, token)
        legacy = await _connect(base, V2_PATH, token)
        await request(legacy, {"action": "subscribe", "type": "device", "device_id": "d1"})
        written: list[int] = []
        stop = asyncio.Event()

        async def write() -> None:
            while not stop.is_set():
                written.extend(await insert_readings(pool, "t1", [("d1", {"v": len(written)})]))
                await asyncio.sleep(0.01)

        async def receive(ws: ClientConnection, into: list[int]) -> None:
            async for data in ws:
                message = json.loads(data)
                assert message["type"] == "telemetry", message
                into.append(message["id"])

        got_stream: list[int] = []
        got_legacy: list[int] = []
        readers = [
            asyncio.create_task(receive(stream, got_stream)),
            asyncio.create_task(receive(legacy, got_legacy)),
        ]
        writing = asyncio.create_task(write())
        results = await asyncio.gather(
            fuzz(base, WS_PATH, token, seed=1), fuzz(base, V2_PATH, token, seed=2)
        )
        stop.set()
        await writing
        for _ in range(100):
            if got_stream[-1:] == written[-1:] and got_legacy[-1:] == written[-1:]:
                break
            await asyncio.sleep(0.05)
        assert got_stream == written and got_legacy == written and len(written) > 20
        for task in readers:
            task.cancel()
        await stream.close()
        await legacy.close()
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).status_code == 200
        await until_no_connections(base, pool)
    for counts in results:
        assert counts["error"] > 1000 and counts["1009"] > 20 and counts["1007"] > 20, counts
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]
