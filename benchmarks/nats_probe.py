"""A NATS subscriber in a process of its own, for the cluster scenario: when each event
reached NATS (the relay's message), on the clock the load generator stamps commits with.

python -m benchmarks.nats_probe URL SUBJECT SECONDS: prints "ready", then after SECONDS
one JSON object {event id: perf_counter at arrival}.
"""

from __future__ import annotations

import asyncio
import sys
import time

import nats
import orjson
import uvloop
from nats.aio.msg import Msg


async def main(url: str, subject: str, seconds: float) -> None:
    client = await nats.connect(url)
    arrived: dict[str, float] = {}

    async def on_message(msg: Msg) -> None:
        now = time.perf_counter()
        for event in orjson.loads(msg.data).get("events", []):
            arrived[str(event[0])] = now

    await client.subscribe(subject, cb=on_message)
    await client.flush()
    print("ready", flush=True)
    await asyncio.sleep(seconds)
    print(orjson.dumps(arrived).decode(), flush=True)
    await client.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
