"""What reading a 1000-message batch costs the event loop, valid or not, before any device
is authenticated.

    python -m benchmarks.intake_costs [--reps 11]

``pulse.ingest.intake.batch`` in-process (no server, no database), on batches of made-up
devices: anyone can send these, for the cost of a request. Each body is read ``--reps``
times in turns with the others, after one warm-up; the figure is the median CPU time of
the thread per call (less swayed by other work on a shared machine than wall time), the
spread min-max. What it answers: the most a refused batch costs per request, and
that the valid batch pays nothing for it (docs/performance.md, "Unauthenticated
batches").
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import string
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from pulse.ingest import intake

MESSAGES = 1000
# Two-letter metric names, as the security audit's batches (H1) had: the most metrics a
# 1 MiB body (the limit) holds.
NAMES = ["".join(pair) for pair in itertools.product(string.ascii_letters, repeat=2)]


def body(metrics: Callable[[int], dict[str, object]]) -> bytes:
    return orjson.dumps(
        {
            "messages": [
                {
                    "tenant_id": "t",
                    "device_id": f"d{i}",
                    "provision_token": "p",
                    "metrics": metrics(i),
                }
                for i in range(MESSAGES)
            ]
        }
    )


def valid(count: int) -> dict[str, object]:
    return {NAMES[j]: j % 10 for j in range(count)}


BODIES = {
    "valid, 1 metric": body(lambda i: {"m": i % 10}),
    "valid, 120 metrics": body(lambda i: valid(120)),
    "1 bad value (1 metric)": body(lambda i: {"m": "x"}),
    "1 bad name (1 metric)": body(lambda i: {"bad name": 1}),
    # The security audit's H1: 120 valid metrics, then one bad name.
    "120 valid + 1 bad name": body(lambda i: valid(120) | {"bad name": 1}),
    "120 valid + 1 bad value": body(lambda i: valid(120) | {"bad": "x"}),
    # A newline in a name: the case pulse.names.first_invalid_name checks apart.
    "120 valid + 1 newline name": body(lambda i: valid(120) | {"bad\nname": 1}),
    # As many metrics as 1 MiB holds (the body limit), every one of them wrong.
    "100 bad values": body(lambda i: {NAMES[j]: "x" for j in range(100)}),
    "80 bad names": body(lambda i: {f"bad {NAMES[j]}": 1 for j in range(80)}),
    "80 values beyond a double": body(lambda i: {NAMES[j]: "__huge__" for j in range(80)}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=11)
    args = parser.parse_args()
    # Numbers no double holds, which orjson.dumps cannot write: as a device would.
    bodies = {
        name: raw.replace(b'"__huge__"', b"1e400") if b"__huge__" in raw else raw
        for name, raw in BODIES.items()
    }
    for name, raw in bodies.items():
        assert len(raw) <= 2**20, f"{name}: {len(raw)} bytes, over the 1 MiB body limit"
    now = datetime.now(UTC)
    spent: dict[str, list[float]] = {name: [] for name in bodies}
    for raw in bodies.values():
        intake.batch(raw, now)
    for _ in range(args.reps):
        for name, raw in bodies.items():
            started = time.thread_time_ns()
            intake.batch(raw, now)
            spent[name].append((time.thread_time_ns() - started) / 1e6)
    print(f"{'1000 messages of':<30} {'MB':>5} {'CPU ms (median)':>16} {'min-max':>14}")
    for name, values in spent.items():
        size = len(bodies[name]) / 1e6
        low, high = min(values), max(values)
        print(
            f"{name:<30} {size:>5.2f} {statistics.median(values):>16.1f} {low:>6.1f}-{high:<7.1f}"
        )


if __name__ == "__main__":
    main()
