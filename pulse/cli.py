"""pulse serve | migrate | token"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from pulse.config import Settings

# Never log query strings: they may carry tokens or tickets.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss'


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pulse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: $PORT or 8000")

    sub.add_parser("migrate", help="apply database migrations")

    token = sub.add_parser("token", help="mint a development JWT with PULSE_JWT_SECRET")
    token.add_argument("--tenant", default=None)
    token.add_argument("--role", action="append", dest="roles", default=None)
    token.add_argument("--lifetime", type=float, default=3600.0, help="seconds")
    token.add_argument("--subject", default="dev-user")

    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        asyncio.run(serve_forever(settings, args.host, args.port or settings.port))
    elif args.command == "migrate":
        asyncio.run(run_migrations(settings))
    elif args.command == "token":
        if not settings.jwt_secret:
            sys.exit("PULSE_JWT_SECRET is not set")
        from pulse.auth.dev_tokens import mint_token

        print(
            mint_token(
                settings.jwt_secret,
                tenant_id=args.tenant,
                roles=args.roles or ["customer"],
                lifetime_s=args.lifetime,
                subject=args.subject,
            )
        )


async def serve_forever(settings: Settings, host: str, port: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from pulse.app import create_app, shutdown_trigger

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = "-"
    config.access_log_format = ACCESS_LOG_FORMAT
    config.graceful_timeout = settings.shutdown_timeout_s
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    app = create_app(settings)
    await serve(app, config, shutdown_trigger=shutdown_trigger(app, stop))  # type: ignore[arg-type]


async def run_migrations(settings: Settings) -> None:
    from pulse.db.migrate import migrate
    from pulse.db.pool import connect

    async def apply(dsn: str) -> None:
        conn = await connect(dsn)
        try:
            applied = await migrate(conn)
        finally:
            await conn.close()
        print("applied: " + ", ".join(applied) if applied else "database is up to date")

    if settings.database_url:
        await apply(settings.database_url)
        return
    from pulse.db.embedded import embedded_postgres

    with embedded_postgres(settings.data_dir) as dsn:
        await apply(dsn)
