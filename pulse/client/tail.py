"""`pulse tail`: follow a tenant's telemetry in the terminal, as JSON lines or a table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from pulse.client.arguments import add_server_arguments, positive_int, seconds_or_zero
from pulse.client.errors import PulseClientError
from pulse.client.events import Notice, Telemetry
from pulse.client.terminal import Output, one_line, run_until_signal
from pulse.config import Settings

# How long the first connection may take before `pulse tail` gives up (a wrong
# --url, a server that is not there). Once connected, it retries for ever.
CONNECT_TIMEOUT_S = 10.0

# On the way out, what is still queued for stdout and stderr gets this long to
# be written: a reader that stopped reading must not hold the exit.
FLUSH_ON_EXIT_S = 0.5


def add_tail_command(sub: Any) -> None:
    tail = sub.add_parser("tail", help="follow a tenant's telemetry (JSON lines or a table)")
    add_server_arguments(
        tail,
        token="a JWT (default: $PULSE_TOKEN, else one minted for --tenant with "
        "PULSE_JWT_SECRET, renewed as needed)",
    )
    tail.add_argument("--tenant", default=None, help="the tenant (operators: the one to read)")
    tail.add_argument(
        "--device",
        action="append",
        default=None,
        type=names_argument,
        help="device id(s), comma-separated; repeatable",
    )
    tail.add_argument(
        "--metric",
        action="append",
        default=None,
        type=names_argument,
        help="metric name(s), comma-separated; repeatable (table columns in this order)",
    )
    tail.add_argument("--format", choices=("json", "table"), default="json")
    tail.add_argument(
        "--from-id", type=int, default=None, help="replay every event after this id first"
    )
    tail.add_argument("--transport", choices=("sse", "ws"), default="sse")
    tail.add_argument(
        "--count", type=positive_int, default=None, help="stop after this many events"
    )
    tail.add_argument(
        "--connect-timeout",
        type=seconds_or_zero,
        default=CONNECT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up if the first connection is not made in this time (default "
        f"{CONNECT_TIMEOUT_S:g}; 0: never); once connected, tail retries for ever",
    )
    tail.set_defaults(run=run_tail_command)


def _names(values: list[str] | None) -> list[str] | None:
    """Comma-separated and repeated names, in the order given, each once."""
    if not values:
        return None
    names = (name.strip() for value in values for name in value.split(","))
    return list(dict.fromkeys(name for name in names if name)) or None


def names_argument(value: str) -> str:
    """A --device or --metric value that names something: `--device "$DEV"` with DEV
    unset streamed every device."""
    if not any(part.strip() for part in value.split(",")):
        raise argparse.ArgumentTypeError(f"{value!r} names none: give one or more, comma-separated")
    return value


@dataclasses.dataclass(frozen=True)
class TailOptions:
    url: str
    token: str | None = None
    refresh_token: Callable[[], str] | None = None
    tenant_id: str | None = None
    transport: str = "sse"
    device_ids: list[str] | None = None
    metrics: list[str] | None = None
    last_event_id: int | None = None
    table: bool = False
    count: int | None = None
    connect_timeout_s: float | None = CONNECT_TIMEOUT_S


def minted_tokens(
    args: argparse.Namespace, settings: Settings, subject: str
) -> Callable[[], str] | None:
    """Without --token: a way to mint customer tokens for --tenant with PULSE_JWT_SECRET
    (a development setup); exits with a message when neither is given. ``subject`` is
    the command's name (``pulse-tail``), the tokens' subject."""
    if args.token is not None:
        return None
    command = subject.replace("-", " ", 1)
    if not settings.jwt_secret:
        sys.exit(
            f"{command}: give --token (or set PULSE_TOKEN), or set PULSE_JWT_SECRET to mint one"
        )
    if args.tenant is None:
        sys.exit(f"{command}: give --tenant to mint a token for it (or --token)")
    from pulse.auth.dev_tokens import mint_token

    secret, tenant = settings.jwt_secret, args.tenant

    def refresh() -> str:
        return mint_token(secret, tenant_id=tenant, roles=["customer"], subject=subject)

    return refresh


def run_tail_command(args: argparse.Namespace, settings: Settings) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    refresh = minted_tokens(args, settings, "pulse-tail")
    options = TailOptions(
        url=args.url or f"http://127.0.0.1:{settings.port}",
        token=args.token,
        refresh_token=refresh,
        # A minted token names its tenant; --tenant as a parameter is for operators' tokens.
        tenant_id=args.tenant if args.token else None,
        transport=args.transport,
        device_ids=_names(args.device),
        metrics=_names(args.metric),
        last_event_id=args.from_id,
        table=args.format == "table",
        count=args.count,
        connect_timeout_s=args.connect_timeout if args.connect_timeout > 0 else None,
    )
    try:
        status = asyncio.run(run_tail(options))
    except KeyboardInterrupt:  # before the loop's own handlers were in place
        status = 0
    sys.exit(status)


class TailError(Exception):
    """Ends `pulse tail` with this message on stderr and exit status 1."""


async def run_tail(options: TailOptions, *, stdout: int = 1, stderr: int = 2) -> int:
    """The whole command on these file descriptors; returns the exit status.

    0: it stopped because ``count`` events were printed, SIGINT or SIGTERM came,
    or stdout was closed (``pulse tail | head -3``); 1: an error it printed.
    """
    out, err = Output(stdout), Output(stderr)
    status = 0
    try:
        await run_until_signal(Tail(options, out, err).run())
    except (TailError, PulseClientError) as exc:
        err.write_nowait(f"pulse tail: {one_line(str(exc))}\n".encode())
        status = 1
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(FLUSH_ON_EXIT_S):
            for output in (out, err):
                with contextlib.suppress(OSError):
                    await output.drain()
    return status


class Tail:
    """One run: the stream, its output, and the notices on stderr."""

    def __init__(self, options: TailOptions, out: Output, err: Output) -> None:
        self.options = options
        self.out = out
        self.err = err
        self.formatter = TableFormatter(options.metrics, options.device_ids)
        self.last_failure: str | None = None
        self._first_connection: asyncio.Timeout | None = None

    def notice(self, notice: Notice) -> None:
        deadline = self._first_connection
        if notice.kind == "connected" and deadline is not None and not deadline.expired():
            deadline.reschedule(None)
        elif notice.kind == "disconnected":
            self.last_failure = notice.detail
        line = notice_line(notice)
        if line is not None:
            self.err.write_nowait(line.encode())  # dropped if nobody reads stderr

    async def run(self) -> None:
        options = self.options
        try:
            async with asyncio.timeout(options.connect_timeout_s) as deadline:
                self._first_connection = deadline
                await self._follow()
        except TimeoutError:
            if not deadline.expired():
                raise
            raise TailError(
                f"no connection to {options.url} within {options.connect_timeout_s:g} s: "
                f"{self.last_failure or 'no answer'}"
            ) from None

    async def _follow(self) -> None:
        options = self.options
        from pulse.client.client import PulseClient  # loaded when tail runs

        client = PulseClient(
            options.url,
            options.token,
            refresh_token=options.refresh_token,
            tenant_id=options.tenant_id,
            on_notice=self.notice,
        )
        async with client:
            open_stream = client.sse if options.transport == "sse" else client.websocket
            seen = 0
            async with open_stream(
                device_ids=options.device_ids,
                metrics=options.metrics,
                last_event_id=options.last_event_id,
            ) as stream:
                async for event in stream:
                    line = self.formatter.row(event) if options.table else json_line(event)
                    if not await self._stdout(self.out.write(line.encode())):
                        return
                    seen += 1
                    if options.count is not None and seen >= options.count:
                        break
        await self._stdout(self.out.drain())

    async def _stdout(self, step: Awaitable[None]) -> bool:
        """False once stdout is closed: its reader is gone, and so is tail's purpose."""
        try:
            await step
        except BrokenPipeError:
            return False
        except OSError as exc:
            raise TailError(f"cannot write to stdout: {exc}") from None
        return True


def json_line(event: Telemetry) -> str:
    """The contract's event shape, one per line."""
    wire = {
        "type": "telemetry",
        "id": event.id,
        "device_id": event.device_id,
        "data": {"time": iso(event), "metrics": event.metrics},
    }
    return orjson.dumps(wire).decode() + "\n"


def iso(event: Telemetry) -> str:
    return event.time.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass
class Column:
    header: str
    width: int
    right: bool  # numbers align right, text left

    def cell(self, text: str) -> str:
        return text.rjust(self.width) if self.right else text.ljust(self.width)


class TableFormatter:
    """Aligned columns, in the order the metrics were asked for; without metrics,
    one last column of ``name=value`` pairs.

    A column is as wide as the widest of its header, its default (ID 10, TIME 24,
    DEVICE 16, a metric 12) and, for DEVICE, the device ids asked for. A longer
    value widens its column for its row and every row after it: only the rows
    printed before it are out of line with it, and never by more than it needs.
    """

    def __init__(self, metrics: Sequence[str] | None, device_ids: Sequence[str] | None = None):
        self.metrics = list(metrics or [])
        device_width = max([16, *(len(d) for d in device_ids or [])])
        self.columns = [Column("ID", 10, True), Column("TIME", 24, False)]
        self.columns.append(Column("DEVICE", device_width, False))
        self.columns += [Column(m, max(12, len(m)), True) for m in self.metrics]
        if not self.metrics:
            self.columns.append(Column("METRICS", 0, False))
        self._header_done = False

    def row(self, event: Telemetry) -> str:
        cells = [str(event.id), iso(event), event.device_id]
        if self.metrics:
            cells += [_value(event.metrics.get(m)) for m in self.metrics]
        else:
            cells.append(" ".join(f"{k}={_value(v)}" for k, v in sorted(event.metrics.items())))
        for column, text in zip(self.columns, cells, strict=True):
            column.width = max(column.width, len(text))
        line = self._line(cells)
        if self._header_done:
            return line
        self._header_done = True
        return self._line([column.header for column in self.columns]) + line

    def _line(self, cells: list[str]) -> str:
        line = "  ".join(c.cell(t) for c, t in zip(self.columns, cells, strict=True))
        return line.rstrip() + "\n"


def _value(value: float | bool | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def notice_line(notice: Notice) -> str | None:
    """The stderr line for a notice (stdout carries only events)."""
    if notice.kind == "disconnected":
        return f"# disconnected: {notice.detail}; retrying in {notice.retry_in_s:.1f} s\n"
    if notice.kind in ("connected", "reset", "lagging", "error"):
        return f"# {notice.kind}: {notice.detail}\n"
    return None
