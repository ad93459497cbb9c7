"""The `pulse demo` and `pulse simulate` subcommands."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from pulse.client.arguments import add_server_arguments, positive_float, positive_int, tcp_port
from pulse.config import Settings


def add_sim_commands(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", help="run the server, a simulated fleet and the dashboard in one process"
    )
    demo.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    demo.add_argument("--port", type=tcp_port, default=None, help="default: $PORT or 8000")
    _fleet_arguments(demo)
    demo.set_defaults(run=_demo)

    simulate = sub.add_parser("simulate", help="send simulated telemetry to a running server")
    add_server_arguments(
        simulate,
        token="a tenant-admin JWT (default: $PULSE_TOKEN, else one minted for --tenant with "
        "PULSE_JWT_SECRET)",
    )
    simulate.add_argument("--tenant", default="demo", help="default: demo")
    # Not the demo's "dev": a run with the defaults would take over a running demo's devices.
    simulate.add_argument(
        "--prefix", default="sim", help="device ids are <prefix>-0001, ...; default: sim"
    )
    simulate.add_argument(
        "--duration", type=positive_float, default=None, help="seconds; default: forever"
    )
    simulate.add_argument(
        "--no-rules", action="store_true", help="do not create the demo's alert rules"
    )
    simulate.add_argument(
        "--clean-up",
        action="store_true",
        help="when it stops, delete the devices and alert rules this run created",
    )
    _fleet_arguments(simulate)
    simulate.set_defaults(run=_simulate)


def _fleet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=positive_int, default=25, help="default: 25")
    parser.add_argument(
        "--rate",
        type=simulated_rate,
        default=1.0,
        help=f"readings per second per device, at most {MAX_RATE:g}; default: 1",
    )
    parser.add_argument("--seed", type=int, default=None, help="repeatable signals")


# Readings a second per device: ten times the server's default limit per device
# (PULSE_INGEST_RATE_PER_DEVICE). Beyond, one pass of the run built millions of readings
# (1e9 took all the memory and never stopped at --duration). And for the fleet: 1,000
# devices at 1,000 a second held 905 MiB and ran 82 s of a 3 s --duration (review 4);
# more than a server of two cores takes in batches (about 80,000).
MAX_RATE = 1000.0
MAX_FLEET_RATE = 100_000.0


def simulated_rate(value: str) -> float:
    rate = positive_float(value)
    if rate > MAX_RATE:
        raise argparse.ArgumentTypeError(
            f"{value} is more than {MAX_RATE:g} readings a second per device"
        )
    return rate


def _check_fleet_rate(command: str, args: argparse.Namespace) -> None:
    """Exit 2, as argparse refuses a value, for a fleet beyond MAX_FLEET_RATE."""
    total = args.devices * args.rate
    if total > MAX_FLEET_RATE:
        print(
            f"pulse {command}: --devices {args.devices} at --rate {args.rate:g} is "
            f"{total:,.0f} readings a second: at most {MAX_FLEET_RATE:,.0f}",
            file=sys.stderr,
        )
        sys.exit(2)


def _demo(args: argparse.Namespace, settings: Settings) -> None:
    _check_fleet_rate("demo", args)
    from pulse.runtime import StartupError
    from pulse.sim.demo import DemoError, run_demo
    from pulse.sim.simulator import SimulatorError

    try:
        asyncio.run(
            run_demo(
                settings,
                host=args.host,
                port=args.port or settings.port,
                devices=args.devices,
                rate=args.rate,
                seed=args.seed,
                program=sys.argv[0] if sys.argv[0].endswith("pulse") else "pulse",
            )
        )
    except (DemoError, SimulatorError, StartupError) as exc:
        sys.exit(f"pulse demo: {exc}")


def _simulate(args: argparse.Namespace, settings: Settings) -> None:
    _check_fleet_rate("simulate", args)
    import httpx

    from pulse.sim.simulator import Provisioned, RuleRefused, Simulator, SimulatorError

    token = args.token or _admin_token(settings, args.tenant)
    url = args.url or f"http://127.0.0.1:{settings.port}"
    failed: list[str] = []  # what --clean-up could not delete, however the run ended

    async def main() -> None:
        # SIGTERM (a process manager, `timeout`) stops the run as Ctrl-C does, and
        # --clean-up still deletes what it created (the default handler just exited).
        running = asyncio.current_task()
        assert running is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, running.cancel)
        simulator = Simulator(
            url,
            token,
            tenant_id=args.tenant,
            devices=args.devices,
            rate=args.rate,
            seed=args.seed,
            prefix=args.prefix,
        )
        # Filled in as devices are made: a run stopped while provisioning (Ctrl-C, or a
        # device it must not take over) still removes what it created.
        provisioned = Provisioned()
        try:
            await simulator.provision(done=provisioned)
            first, last = simulator.devices[0].device_id, simulator.devices[-1].device_id
            print(
                f"devices {first} to {last} of tenant {args.tenant!r}: {provisioned.describe()}",
                file=sys.stderr,
            )
            if not args.no_rules:
                try:
                    rules = await simulator.ensure_rules()
                except RuleRefused as exc:
                    raise SimulatorError(
                        f"{exc} (--no-rules simulates without adding alert rules)"
                    ) from None
                added = len(simulator.created_rules)
                print(
                    f"alert rules {', '.join(repr(r) for r in rules)}: {added} added "
                    "(--no-rules leaves the tenant's rules alone)",
                    file=sys.stderr,
                )
            print(
                f"simulating {args.devices} devices at {args.rate:g} reading/s each; Ctrl-C "
                + ("stops and deletes what this run created" if args.clean_up else "stops"),
                file=sys.stderr,
            )
            await simulator.run(args.duration)
        finally:
            if simulator.sent or simulator.rejected:
                said = simulator.describe_rejections()
                print(f"sent {simulator.sent} readings{said}", file=sys.stderr)
            if args.clean_up:
                if not args.token:  # minted here: a fresh one, whatever the run's length
                    simulator.use_token(_admin_token(settings, args.tenant))
                removed = await simulator.remove(provisioned, simulator.created_rules)
                print(removed.describe(), file=sys.stderr)
                failed.extend(removed.failed)
            await simulator.aclose()

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass  # stopped (Ctrl-C, SIGTERM): what --clean-up left is said below
    except SimulatorError as exc:
        sys.exit(f"pulse simulate: {exc}")
    except httpx.TransportError as exc:
        sys.exit(f"pulse simulate: cannot reach {url}: {str(exc) or type(exc).__name__}")
    if failed:
        sys.exit(f"pulse simulate: --clean-up left {len(failed)} things in place (above)")


def _admin_token(settings: Settings, tenant: str) -> str:
    if not settings.jwt_secret:
        sys.exit(
            "pulse simulate: give --token (or set PULSE_TOKEN), or set PULSE_JWT_SECRET to mint one"
        )
    from pulse.auth.dev_tokens import mint_token

    return mint_token(settings.jwt_secret, tenant_id=tenant, roles=["tenant-admin"])
