"""`pulse export`: a device's telemetry over a time range, as CSV or NDJSON on stdout."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import TYPE_CHECKING, Any

from pulse.client.arguments import add_server_arguments, seconds_or_zero
from pulse.client.history import EXPORT_READ_TIMEOUT_S
from pulse.client.tail import minted_tokens
from pulse.client.terminal import Output, one_line, run_until_signal
from pulse.config import Settings
from pulse.names import is_valid_id

if TYPE_CHECKING:
    from pulse.client.errors import ExportCut

# The client (httpx) is imported when the command runs: `pulse serve` builds the
# same parser and must not load it.
FORMATS = ("csv", "ndjson")


def add_export_command(sub: Any) -> None:
    export = sub.add_parser(
        "export", help="a device's telemetry over a time range, as CSV or NDJSON"
    )
    add_server_arguments(
        export,
        token="a JWT (default: $PULSE_TOKEN, else one minted for --tenant with PULSE_JWT_SECRET)",
    )
    export.add_argument("--tenant", default=None, help="the tenant (operators: the one to read)")
    export.add_argument("--device", required=True, type=device_id_argument, help="the device id")
    export.add_argument("--from", dest="start", default=None, help="ISO 8601; default: --to - 1 h")
    export.add_argument("--to", dest="end", default=None, help="ISO 8601; default: now")
    export.add_argument("--format", choices=FORMATS, default="csv")
    export.add_argument("--metrics", default=None, help="comma-separated; default: every one")
    export.add_argument(
        "--bucket",
        choices=("raw", "1m", "5m", "15m", "1h", "1d"),
        default="raw",
        help="raw readings (default), or buckets of this width",
    )
    export.add_argument(
        "--wait",
        type=seconds_or_zero,
        default=60.0,
        help="seconds to wait for the server to take the export when it is streaming as"
        " many as it may (429 export_limit); default: 60",
    )
    export.add_argument(
        "--resume",
        type=int,
        default=5,
        help="times in a row a raw export cut short (the server's PULSE_EXPORT_MAX_S, a"
        " restart, a lost connection) is asked for again from where it stopped, with"
        " nothing written twice; 0: never; default: 5",
    )
    export.add_argument(
        "--read-timeout",
        type=seconds_or_zero,
        default=EXPORT_READ_TIMEOUT_S,
        metavar="SECONDS",
        help="take the server for gone when nothing comes for this long (the answer, or"
        " the export's next bytes): a cut, resumed as one; 0: wait for ever; default:"
        f" {EXPORT_READ_TIMEOUT_S:g}",
    )
    export.set_defaults(run=run_export_command)


def device_id_argument(value: str) -> str:
    """A device id, refused in argparse's one line when it is none (the client's
    ValueError was a traceback)."""
    if not is_valid_id(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a device id: 1 to 64 of [A-Za-z0-9_.:-], not '.' nor '..'"
        )
    return value


DRAIN_S = 30.0  # what came, written before the reason it stopped (a reader that reads)


def run_export_command(args: argparse.Namespace, settings: Settings) -> None:
    refresh = minted_tokens(args, settings, "pulse-export")
    url = args.url or f"http://127.0.0.1:{settings.port}"
    try:
        status = asyncio.run(run_export(args, url, refresh, sys.stdout.fileno()))
    except KeyboardInterrupt:  # before the loop's own handlers were in place
        status = 130
    sys.exit(status)


async def run_export(args: argparse.Namespace, url: str, refresh: Any, stdout: int) -> int:
    """The whole command, its output written by a thread of its own (``Output``), so
    that SIGINT or SIGTERM stop it at once even while a reader does not read; returns
    the exit status: 0 done, or the reader went away (``| head``); 1 an error said on
    stderr; 130 stopped by a signal."""
    import httpx

    from pulse.client.errors import PulseClientError

    # A few chunks ahead at most: a reader that does not read holds the export back
    # (and the server then cuts it, as it would a slow client).
    out = Output(stdout, max_pending=4)
    try:
        if await run_until_signal(export(args, url, refresh, out)) is None:
            return 130
    except BrokenPipeError:
        return 0  # the reader has what it wanted
    except OSError as exc:
        return _failed(f"cannot write to stdout: {exc}")
    except PulseClientError as exc:
        # What came is written before the reason (a cut export says how many bytes
        # came: they are all on stdout then).
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(DRAIN_S):
                await out.drain()
        return _failed(str(exc))
    except httpx.ReadTimeout:  # a cut once it has answered: raised as ExportCut then
        return _failed(f"no answer from {url} in {args.read_timeout:g} s (--read-timeout)")
    except httpx.TransportError as exc:
        return _failed(f"cannot reach {url}: {str(exc) or type(exc).__name__}")
    return 0


def _failed(message: str) -> int:
    print(f"pulse export: {one_line(message)}", file=sys.stderr, flush=True)
    return 1


async def export(args: argparse.Namespace, url: str, refresh: Any, out: Output) -> bool:
    """Write the export to ``out``; True once all of it is written."""
    from pulse.client.client import PulseClient

    async with PulseClient(
        url,
        args.token,
        refresh_token=refresh,
        # A minted token names its tenant; --tenant as a parameter is for operators' tokens.
        tenant_id=args.tenant if args.token else None,
    ) as client:
        async for chunk in client.export(
            args.device,
            format=args.format,
            metrics=args.metrics.split(",") if args.metrics else None,
            start=args.start,
            end=args.end,
            bucket=args.bucket,
            wait_s=args.wait,
            on_wait=_waiting,
            resume=args.resume,
            on_resume=_resuming,
            read_timeout_s=args.read_timeout or None,
        ):
            await out.write(chunk)
    await out.drain()
    return True


def _waiting(refusal: Exception, delay_s: float) -> None:
    print(f"pulse export: {refusal}; asking again in {delay_s:g} s", file=sys.stderr, flush=True)


def _resuming(cut: ExportCut, delay_s: float) -> None:
    silent = "" if cut.silent_s is None else f" (nothing came for {cut.silent_s:g} s)"
    print(
        f"pulse export: cut after {cut.received:,} bytes{silent}; asking for the rest in "
        f"{delay_s:.1f} s",
        file=sys.stderr,
        flush=True,
    )
