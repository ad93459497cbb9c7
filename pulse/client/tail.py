"""`pulse tail`: follow a tenant's telemetry in the terminal, as JSON lines or a table."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

import orjson

from pulse.client.client import PulseClient
from pulse.client.errors import PulseClientError
from pulse.client.events import Notice, Telemetry
from pulse.config import Settings


def add_tail_command(sub: Any) -> None:
    tail = sub.add_parser("tail", help="follow a tenant's telemetry (JSON lines or a table)")
    tail.add_argument("--url", default=None, help="default: http://127.0.0.1:$PORT")
    tail.add_argument(
        "--token",
        default=None,
        help="a JWT (default: one minted for --tenant with PULSE_JWT_SECRET, renewed as needed)",
    )
    tail.add_argument("--tenant", default=None, help="the tenant (operators: the one to read)")
    tail.add_argument(
        "--device", action="append", default=None, help="device id(s), comma-separated; repeatable"
    )
    tail.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric name(s), comma-separated; repeatable",
    )
    tail.add_argument("--format", choices=("json", "table"), default="json")
    tail.add_argument(
        "--from-id", type=int, default=None, help="replay every event after this id first"
    )
    tail.add_argument("--transport", choices=("sse", "ws"), default="sse")
    tail.add_argument("--count", type=int, default=None, help="stop after this many events")
    tail.set_defaults(run=run_tail_command)


def _names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return sorted({name.strip() for value in values for name in value.split(",") if name.strip()})


def run_tail_command(args: argparse.Namespace, settings: Settings) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    refresh: Callable[[], str] | None = None
    if args.token is None:
        if not settings.jwt_secret:
            sys.exit("give --token, or set PULSE_JWT_SECRET to mint one")
        if args.tenant is None:
            sys.exit("give --tenant to mint a token for it (or --token)")
        from pulse.auth.dev_tokens import mint_token

        secret, tenant = settings.jwt_secret, args.tenant

        def refresh() -> str:
            return mint_token(secret, tenant_id=tenant, roles=["customer"], subject="pulse-tail")

    client = PulseClient(
        args.url or f"http://127.0.0.1:{settings.port}",
        args.token,
        refresh_token=refresh,
        # A minted token names its tenant; --tenant as a parameter is for operators' tokens.
        tenant_id=args.tenant if args.token else None,
        on_notice=lambda notice: _print_notice(notice, sys.stderr),
    )

    async def main() -> None:
        async with client:
            await tail(
                client,
                transport=args.transport,
                device_ids=_names(args.device),
                metrics=_names(args.metric),
                last_event_id=args.from_id,
                table=args.format == "table",
                count=args.count,
                out=sys.stdout,
            )

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except PulseClientError as exc:
        sys.exit(f"pulse tail: {exc}")


async def tail(
    client: PulseClient,
    *,
    transport: str = "sse",
    device_ids: list[str] | None = None,
    metrics: list[str] | None = None,
    last_event_id: int | None = None,
    table: bool = False,
    count: int | None = None,
    out: TextIO = sys.stdout,
) -> None:
    open_stream = client.sse if transport == "sse" else client.websocket
    formatter = TableFormatter(metrics) if table else None
    seen = 0
    async with open_stream(
        device_ids=device_ids, metrics=metrics, last_event_id=last_event_id
    ) as stream:
        async for event in stream:
            if formatter is None:
                out.write(json_line(event))
            else:
                out.write(formatter.row(event))
            out.flush()
            seen += 1
            if count is not None and seen >= count:
                return


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


class TableFormatter:
    """Aligned columns; one column per metric when the metrics are known, else name=value."""

    def __init__(self, metrics: list[str] | None) -> None:
        self.metrics = metrics
        self._header_done = False

    def row(self, event: Telemetry) -> str:
        line = f"{event.id:>10}  {iso(event):<24}  {event.device_id:<16}  "
        if self.metrics:
            line += "  ".join(f"{_value(event.metrics.get(m)):>12}" for m in self.metrics)
        else:
            line += "  ".join(f"{k}={_value(v)}" for k, v in sorted(event.metrics.items()))
        if self._header_done:
            return line.rstrip() + "\n"
        self._header_done = True
        return self.header() + line.rstrip() + "\n"

    def header(self) -> str:
        head = f"{'ID':>10}  {'TIME':<24}  {'DEVICE':<16}  "
        head += "  ".join(f"{m:>12}" for m in self.metrics) if self.metrics else "METRICS"
        return head.rstrip() + "\n"


def _value(value: float | bool | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _print_notice(notice: Notice, err: TextIO) -> None:
    if notice.kind == "disconnected":
        print(f"# disconnected: {notice.detail}; retrying in {notice.retry_in_s:.1f} s", file=err)
    elif notice.kind in ("connected", "reset", "lagging", "error"):
        print(f"# {notice.kind}: {notice.detail}", file=err)
    err.flush()
