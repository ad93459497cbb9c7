"""pulse serve | migrate | token | demo | simulate | tail | export"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import NoReturn

from pulse.auth.principal import KNOWN_ROLES, OPERATOR_ROLES
from pulse.client.arguments import positive_float, positive_int, tcp_port
from pulse.config import MAX_WORKERS, ConfigError, Settings
from pulse.logs import configure_logging
from pulse.names import is_valid_id


def build_parser() -> argparse.ArgumentParser:
    """Every command's arguments. Light: each command loads what it needs when it runs."""
    parser = argparse.ArgumentParser(prog="pulse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server", description="Run the server.")
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    serve.add_argument("--port", type=tcp_port, default=None, help="default: $PORT or 8000")
    serve.add_argument(
        "--workers",
        type=worker_count,
        default=None,
        help="server processes (default: $PULSE_WORKERS or 1)",
    )
    serve.add_argument("--fd", type=int, default=None, help=argparse.SUPPRESS)  # a worker's socket
    # A worker's supervisor: given, not read with getppid(), which is already 1 in a
    # worker whose supervisor died while it started.
    serve.add_argument("--supervisor", type=int, default=None, help=argparse.SUPPRESS)
    # Which worker of the supervisor's: the first says what is true of the whole
    # instance (pulse.logs.INSTANCE_WIDE), the others do not repeat it.
    serve.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)

    sub.add_parser(
        "migrate",
        help="apply database migrations",
        description="Apply the missing migrations to DATABASE_URL, or without it to the "
        "embedded PostgreSQL.",
    )

    token = sub.add_parser(
        "token",
        help="mint a development JWT with PULSE_JWT_SECRET",
        description="Print a JWT signed with PULSE_JWT_SECRET (HS256), which a server with "
        "the same secret accepts: for PULSE_TOKEN, `pulse tail`, curl.",
    )
    token.add_argument(
        "--tenant", type=tenant_name, default=None, help="required but for operator roles"
    )
    token.add_argument(
        "--role",
        action="append",
        dest="roles",
        default=None,
        choices=sorted(KNOWN_ROLES),
        help="repeatable; default: customer",
    )
    token.add_argument(
        "--lifetime", type=token_lifetime, default=3600.0, help="seconds; default: 3600"
    )
    token.add_argument("--subject", default="dev-user", help="its sub claim; default: dev-user")

    from pulse.client.export import add_export_command
    from pulse.client.tail import add_tail_command
    from pulse.sim.commands import add_sim_commands

    add_sim_commands(sub)  # demo, simulate
    add_tail_command(sub)
    add_export_command(sub)
    return parser


def worker_count(value: str) -> int:
    """As PULSE_WORKERS is checked: 5000 forked that many processes, each with its pool."""
    count = positive_int(value)
    if count > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_WORKERS:,} processes")
    return count


def tenant_name(value: str) -> str:
    """A tenant id the server takes (it refused the tokens minted for any other)."""
    if not is_valid_id(value):
        raise argparse.ArgumentTypeError(
            f'{value!r} is not a tenant id: 1 to 64 of [A-Za-z0-9_.:-], other than "." and ".."'
        )
    return value


def token_lifetime(value: str) -> float:
    """Seconds of a token's life: positive, and ending before the year 10000, past
    which the server refuses its exp."""
    seconds = positive_float(value)
    if time.time() + seconds >= LAST_EXP:
        raise argparse.ArgumentTypeError(f"{value} s would end past the year 9999")
    return seconds


LAST_EXP = 253402300800  # 10000-01-01T00:00:00Z


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        fail(f"pulse: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    if hasattr(args, "run"):
        args.run(args, settings)
    elif args.command == "serve":
        from pulse import serving
        from pulse.runtime import StartupError, check_settings

        port = settings.port if args.port is None else args.port
        workers = settings.workers if args.workers is None else args.workers
        if args.fd is not None or workers > 1:  # one of several processes
            configure_logging(
                settings.log_level,
                settings.log_format,
                with_pid=True,
                says_instance_wide=args.worker == 0,
            )
        try:
            check_settings(settings)
            if args.supervisor is None:  # a worker has its supervisor's limit, and said
                serving.raise_open_files_limit(settings)
            if args.fd is not None:  # a worker of serve --workers
                from pulse.serving.workers import tell_ready, watch_parent

                supervisor = args.supervisor or os.getppid()
                watch_parent(supervisor)
                ready = None if args.supervisor is None else partial(tell_ready, supervisor)
                serving.run(serving.serve_forever(settings, f"fd://{args.fd}", ready))
            elif workers > 1:
                sys.exit(serving.serve_workers(settings, args.host, port, workers))
            else:
                sock = serving.listen(args.host, port)
                serving.run(serving.serve_forever(settings, f"fd://{sock.fileno()}"))
        except StartupError as exc:
            # A worker's reason is a log line like its others (the supervisor's, before
            # any worker runs, is the one line a single process says).
            fail(f"pulse serve: {exc}", logged=args.fd is not None)
    elif args.command == "migrate":
        asyncio.run(run_migrations(settings))
    elif args.command == "token":
        if not settings.jwt_secret:
            sys.exit(
                "pulse token: PULSE_JWT_SECRET is not set (the secret the server verifies "
                "its tokens with)"
            )
        from pulse.auth.dev_tokens import mint_token

        roles = args.roles or ["customer"]
        if args.tenant is None and not OPERATOR_ROLES.intersection(roles):
            sys.exit("pulse token: give --tenant: only operators have no tenant of their own")
        token = mint_token(
            settings.jwt_secret,
            tenant_id=args.tenant,
            roles=roles,
            lifetime_s=args.lifetime,
            subject=args.subject,
        )
        try:
            print(token, flush=True)
        except BrokenPipeError:  # `pulse token | head -c 20`: the reader has all it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:  # a full disk, /dev/full
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(f"pulse token: cannot write the token: {exc}")


def fail(message: str, *, logged: bool = False) -> NoReturn:
    """Stop with status 1 and ``message``: a plain line on stderr, or with
    PULSE_LOG_FORMAT=json a JSON log line like every other (a log shipper that reads
    JSON would drop the one line that says why the process did not start). ``logged``:
    a log line in any format, for one of several processes, whose lines carry the time,
    the level and the pid (as a plain line it could not be told from the others')."""
    if os.environ.get("PULSE_LOG_FORMAT", "").strip().lower() == "json":
        configure_logging("INFO", "json")  # again: the settings may be what failed
        logged = True
    if logged:
        logging.getLogger("pulse").critical(message)
        sys.exit(1)
    sys.exit(message)


async def run_migrations(settings: Settings) -> None:
    import asyncpg

    from pulse.db.database import Database
    from pulse.db.errors import DatabaseUnavailable, refusal
    from pulse.db.migrate import MigrationError, migrate
    from pulse.db.pool import describe

    async def apply(dsn: str) -> None:
        try:
            async with Database.open(
                dsn, pool_size=1, connect_timeout=settings.db_connect_timeout_s
            ) as db:  # its errors name the database
                try:
                    async with db.connection() as conn:
                        applied = await migrate(conn, dsn=dsn)
                except DatabaseUnavailable as exc:  # lost on the way: its errors do not
                    raise DatabaseUnavailable(
                        f"{describe(dsn)}: {exc} (each migration is applied whole or not "
                        "at all: run `pulse migrate` again)"
                    ) from exc
        except DatabaseUnavailable as exc:
            fail(f"pulse migrate: cannot use the database {exc}")
        except MigrationError as exc:
            fail(f"pulse migrate: {exc}")
        except asyncpg.PostgresError as exc:  # a permission missing, say
            fail(
                f"pulse migrate: cannot use the database {describe(dsn)}: "
                f"{refusal(exc, migrating=True)}"
            )
        # Which database, never its user or password: the one DATABASE_URL meant?
        where = describe(dsn)
        print(f"applied to {where}: {', '.join(applied)}" if applied else f"{where} is up to date")

    if settings.database_url:
        await apply(settings.database_url)
        return
    from pulse.db.embedded import embedded_postgres

    try:
        with embedded_postgres(settings.data_dir) as dsn:
            await apply(dsn)  # says its own errors
    except DatabaseUnavailable as exc:  # the data directory's
        fail(f"pulse migrate: cannot use the embedded database {exc}")
