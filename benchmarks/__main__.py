"""python -m benchmarks [all|SCENARIO ...] [--quick] [--json PATH]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import psutil
import uvloop

from benchmarks.harness import Figure, Postgres
from benchmarks.scenarios import SCENARIOS


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "scenarios", nargs="*", default=["all"], help="all, " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/latest.json"))
    parser.add_argument("--database-url", default=None, help="admin URL of a server to use")
    args = parser.parse_args()
    # A SIGTERM (a timeout) still stops the servers and the embedded database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if "all" in args.scenarios:
        # The two-process variants repeat a scenario: left out of the one-minute smoke run.
        names = [n for n in SCENARIOS if not (args.quick and n.endswith("-workers"))]
    else:
        names = args.scenarios
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    # uvloop, as the server uses: the load generator should cost as little as it can.
    figures, errors = uvloop.run(run(names, args.quick, args.database_url))
    print_table(figures)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "quick": args.quick,
                "machine": {
                    "cpus": os.cpu_count(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "figures": [{**f.__dict__, "ratio": f.ratio} for f in figures],
                "errors": errors,
            },
            indent=2,
        )
    )
    print(f"\nwritten to {args.json}")
    if errors:
        sys.exit(1)


async def run(names: list[str], quick: bool, dsn: str | None) -> tuple[list[Figure], list[str]]:
    figures: list[Figure] = []
    errors: list[str] = []
    async with Postgres(dsn) as pg:
        for name in names:
            started = time.perf_counter()
            print(f"== {name} ...", flush=True)
            try:
                got = await SCENARIOS[name](pg, quick)
            except Exception as exc:
                traceback.print_exc()
                errors.append(f"{name}: {exc!r}")
                continue
            figures += got
            for f in got:
                print(f"   {f.metric}: {f.value:,.1f} {f.unit}  {f.note}", flush=True)
            print(f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    return figures, errors


def print_table(figures: list[Figure]) -> None:
    rows = [("scenario", "measure", "value", "ratio", "target", "notes")]
    for f in figures:
        rows.append(
            (
                f.scenario,
                f.metric,
                f"{f.value:,.1f} {f.unit}",
                "" if f.ratio is None else f"{f.ratio:.2f}x",
                f.target,
                f.note,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(widths[j]) for j, cell in enumerate(row[:5])) + " | " + row[5])
        if i == 0:
            print("-+-".join("-" * w for w in widths) + "-+-" + "-" * 20)


if __name__ == "__main__":
    main()
