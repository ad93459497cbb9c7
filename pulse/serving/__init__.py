"""Serving the app with hypercorn: one process, or several workers on one socket.

``serve`` is the one way an app is served (``pulse serve``, the demo, the
tests): it applies the server tunings (``pulse.serving.tuning``) and, when
``stop`` is set, ends every stream first, so that clients reconnect elsewhere
and resume, then lets hypercorn finish in-flight requests and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any

from quart import Quart

from pulse.app import create_app, drain
from pulse.config import Settings
from pulse.db.errors import DatabaseUnavailable
from pulse.logs import ACCESS_LOGGER, SERVER_LOGGER
from pulse.ops.metrics import MULTIPROCESS_DIR
from pulse.runtime import StartupError
from pulse.serving import collector, descriptors, idle, tuning
from pulse.serving.workers import STOP_SIGNALS, supervise
from pulse.streams.messages import MAX_INBOUND_BYTES
from pulse.web import RUNTIME, runtime_of

log = logging.getLogger(__name__)

# Never log query strings: they may carry tokens or tickets. The path is the raw one,
# as sent (AccessLogger).
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss'
# Connections waiting to be accepted (capped by the kernel's net.core.somaxconn).
LISTEN_BACKLOG = 2048
# Open files a process needs beside its connections: the database pool, the
# listener, logs, the libraries' own.
RESERVED_FILES = 200
# hypercorn's own limit on the app's stop, beyond PULSE_SHUTDOWN_TIMEOUT_S: a backstop
# only, the runtime bounds its stop by what is left of that time (pulse.runtime._stop).
SHUTDOWN_BACKSTOP_S = 5.0


def run(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run on uvloop when it is installed (it is a dependency; the fallback
    keeps the code importable where it cannot be)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
    else:
        uvloop.run(main)
    # Shut down already: closing the loop restored the default signal actions,
    # and a second SIGTERM (a supervisor repeating itself) must not turn a clean
    # exit into a kill while the interpreter finishes.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def raise_open_files_limit(settings: Settings) -> int:
    """Raise the process's limit of open files to the most it may have; say when that is
    too few for ``max_connections``. Returns the limit.

    Every connection is a file. Where none is left, the event loop accepts a new
    connection and closes it at once: the client sees it closed before any answer.
    Services commonly start with a soft limit of 1024 below a far higher hard one
    (systemd's defaults). A reconnect storm holds the streams that are ending beside
    those coming back, each dashboard with a ticket's request too: about twice
    ``max_connections``. Workers inherit the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.debug("could not raise the limit of open files to %d: %s", wanted, exc)
    open_at_once = settings.max_connections + RESERVED_FILES
    needed = open_at_once + settings.max_connections
    if soft != resource.RLIM_INFINITY and soft < needed:
        # A warning only when the connections allowed cannot even be open together; a
        # limit that falls short only in a storm (a host's 20,000 against 20,200 for the
        # default 10,000) is said once, not as a warning at every start.
        (log.warning if soft < open_at_once else log.info)(
            "this process may open %d files (ulimit -n), and PULSE_MAX_CONNECTIONS=%d "
            "streams coming back at once need about %d: connections beyond the limit "
            "are closed unanswered. Raise the limit (LimitNOFILE in systemd, ulimit -n) "
            "or lower PULSE_MAX_CONNECTIONS.",
            soft,
            settings.max_connections,
            needed,
        )
    return soft


def hypercorn_config(settings: Settings, bind: str) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [bind]
    # Loggers, not "-": hypercorn then adds no handler of its own, and its lines
    # reach the one handler of pulse.logs once ("Running on ..." was printed twice).
    config.errorlog = logging.getLogger(SERVER_LOGGER)
    config.accesslog = logging.getLogger(ACCESS_LOGGER) if settings.access_log else None
    if settings.access_log:
        config.access_log_format = ACCESS_LOG_FORMAT
        config.logger_class = access_logger_class()
    config.graceful_timeout = settings.shutdown_timeout_s
    # The app's stop (the lifespan's shutdown) begins once the requests are done, and
    # the runtime ends it within what is left of PULSE_SHUTDOWN_TIMEOUT_S. hypercorn's
    # default of 60 s, were the runtime's bound missed, kept a process past the
    # platform's SIGKILL (Heroku's 30 s).
    config.shutdown_timeout = settings.shutdown_timeout_s + SHUTDOWN_BACKSTOP_S
    # After a restart every client reconnects at once. With hypercorn's listen
    # backlog of 100, the connections beyond it lose their SYN and retry a
    # second later; the workers' shared socket has the same 2048.
    config.backlog = LISTEN_BACKLOG
    # A connection is closed when it has sent no request for this long, also before
    # its first: hypercorn's 5 s closed, unanswered, the connections of a reconnect
    # storm that waited longer than that for the server to read them (5,121 of 10,000
    # clients coming back to a busy process; docs/performance.md).
    config.keep_alive_timeout = settings.http_idle_timeout_s
    # Before its first request, a connection that sends nothing is closed sooner (with
    # the tunings: pulse.serving.idle).
    setattr(config, idle.FIRST_REQUEST_TIMEOUT, settings.http_first_request_timeout_s)
    # Inbound WebSocket messages over 64 KiB are closed with 1009 before they
    # are buffered whole (the default would buffer 16 MiB per connection).
    config.websocket_max_message_size = MAX_INBOUND_BYTES
    if tuning.mismatches():
        # The v2 WebSocket's keepalive is a ping frame its handler sends on its schedule,
        # through the tunings (pulse.serving.direct). Without them, hypercorn pings
        # every WebSocket itself (a task per connection), at the same interval.
        config.websocket_ping_interval = settings.ws_keepalive_s
    return config


def access_logger_class() -> type[Any]:
    """hypercorn's Logger, with the path of an access line as it was sent, escaped.

    hypercorn logs the percent-decoded path: ``%0a`` in a URL wrote a line break,
    and so a forged log line, and ``%1b[`` raw terminal escapes. The raw path
    keeps the percent-encoding, and anything else that is not printable ASCII
    (HTTP/2 carries bytes h11 refuses), as well as the quote and the backslash
    that delimit the fields, is written as ``\\xNN``.
    """
    from hypercorn.logging import Logger

    class AccessLogger(Logger):  # type: ignore[misc]
        def atoms(self, request: Any, response: Any, request_time: float) -> Any:
            atoms: Any = super().atoms(request, response, request_time)
            raw = request.get("raw_path")
            atoms["U"] = log_safe(raw.decode("latin-1") if raw else request["path"])
            atoms["m"] = log_safe(atoms["m"])
            return atoms

    return AccessLogger


def log_safe(text: str) -> str:
    """``text`` with every character but printable ASCII, ``"`` and ``\\`` as ``\\xNN``
    (``\\uNNNN`` beyond Latin-1)."""
    return _UNSAFE.sub(_escape, text)


_UNSAFE = re.compile(r"[^\x21\x23-\x5b\x5d-\x7e]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


async def serve(app: Quart, config: Any, stop: asyncio.Event) -> None:
    """Serve ``app`` until ``stop`` is set, then shut down gracefully (streams first).

    Raises StartupError, with the operator's one sentence, when the app cannot start.
    """
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.utils import LifespanFailureError, LifespanTimeoutError

    tuning.apply()
    cut = CutConnections(asyncio.get_running_loop())
    trigger = _streams_first(app, stop, config.graceful_timeout, cut.watch)

    def exhausted() -> None:
        if RUNTIME in app.extensions:
            runtime_of(app).metrics.open_files_exhausted.inc()

    # libuv closes connections it cannot accept without a word (pulse.serving.descriptors).
    watching = asyncio.create_task(descriptors.watch(exhausted))
    try:
        await hypercorn_serve(app, config, shutdown_trigger=trigger)  # type: ignore[arg-type]
    except LifespanFailureError as exc:
        # hypercorn 0.18 words it "Lifespan failure in startup. '<the app's error>'".
        said = str(exc).partition(". ")[2]
        if len(said) > 1 and said[0] == said[-1] == "'":  # its quotes, not the app's
            said = said[1:-1]
        raise StartupError(said) from None
    except LifespanTimeoutError:
        # Its own words blame the ASGI lifespan protocol. The database's connect is
        # bounded well below this (PULSE_DB_CONNECT_TIMEOUT_S, at most 25 s, and its
        # set-up as long again: pulse.db.pool), and says so: this
        # is a service that answered the connection, then stopped answering.
        if RUNTIME not in app.extensions:  # the runtime never started
            raise StartupError(
                f"did not start within {config.startup_timeout:g} s: a service it starts "
                "with (the database, PULSE_BUS_URL's) stopped answering"
            ) from None
        # Started, then stopping: its stop outlasted hypercorn's backstop.
        log.warning(
            "shutting down: did not stop within %g s of the requests' end: a service it "
            "stops with (the database, PULSE_BUS_URL's) stopped answering",
            config.shutdown_timeout,
        )
    finally:
        cut.close()
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    if cut.count:
        log.warning(
            "shutting down: %d request%s still in flight after %g s %s cut",
            cut.count,
            "" if cut.count == 1 else "s",
            config.graceful_timeout,
            "was" if cut.count == 1 else "were",
        )
    if stop.is_set():
        log.info("stopped")


def _streams_first(
    app: Quart, stop: asyncio.Event, graceful_s: float, stopping: Callable[[], None]
) -> Callable[[], Awaitable[None]]:
    async def trigger() -> None:
        await stop.wait()
        # Said, so that whoever reads the log at 3 a.m. sees the deploy, not a gap.
        log.info(
            "shutting down: streams end now (clients resume elsewhere), requests in "
            "flight have %g s",
            graceful_s,
        )
        stopping()
        drain(app)

    return trigger


# The task hypercorn's asyncio server runs for each connection (hypercorn.asyncio.run).
CONNECTION_TASK = "worker_serve.<locals>._server_callback"


class CutConnections:
    """The connections still busy when a shutdown's time is up, which hypercorn then
    cancels (a request whose body is still arriving, say): counted, for one line.

    On Python 3.11 asyncio's ``start_server`` logs each of them as an ERROR, ``Exception
    in callback StreamReaderProtocol.connection_made.<locals>.callback`` with a 25-line
    CancelledError traceback (its done callback asks the cancelled task for its
    exception; 3.12 checks first): a cut that docs/operations.md calls normal read like
    a crash. Once the shutdown has begun, that report is left out; any other goes on to
    the loop's handler as before.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.count = 0
        self._loop = loop
        self._previous = loop.get_exception_handler()
        self._stopping = False
        loop.set_exception_handler(self._report)

    def watch(self) -> None:
        """The shutdown begins: each connection open now counts if it ends cancelled."""
        self._stopping = True
        for task in asyncio.all_tasks(self._loop):
            coro = task.get_coro()
            if getattr(coro, "__qualname__", None) == CONNECTION_TASK:
                task.add_done_callback(self._ended)

    def close(self) -> None:
        self._loop.set_exception_handler(self._previous)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self.count += 1

    def _report(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if (
            self._stopping
            and isinstance(context.get("exception"), asyncio.CancelledError)
            and "StreamReaderProtocol.connection_made" in str(context.get("message"))
        ):
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts: a port in use is one clear line."""
    try:
        sock = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
    except OverflowError:  # --port 99999 (PORT is checked with the settings)
        raise StartupError(f"cannot listen on {host}:{port}: not a TCP port") from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from exc
    sock.set_inheritable(True)
    return sock


async def serve_forever(
    settings: Settings, bind: str, ready: Callable[[], None] | None = None
) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP, then shut down gracefully (streams first).
    ``ready`` is called once the app has started (its runtime open)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP (a closed terminal or SSH session, a process manager's) stops it as the
    # supervisor of `--workers` does: one process died of it at once, saying nothing.
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    app = create_app(settings)
    if ready is not None:

        @app.while_serving  # after the app's own, so once its runtime is open
        async def started() -> AsyncGenerator[None, None]:
            ready()
            yield

    config = hypercorn_config(settings, bind)
    collector.tune()
    collecting = asyncio.create_task(collector.watch(arrivals=idle.connections_made))
    try:
        await serve(app, config, stop)
    finally:
        collecting.cancel()


def serve_workers(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run ``workers`` server processes sharing one listening socket.

    Every worker is a whole Pulse process (its own listener and pool); fan-out
    between them goes through Postgres like between machines. With no
    DATABASE_URL the embedded database is started here, once, for all of them.
    """
    sock = listen(host, port)
    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        if not settings.database_url:
            from pulse.db.embedded import embedded_postgres

            try:
                env["DATABASE_URL"] = stack.enter_context(embedded_postgres(settings.data_dir))
            except DatabaseUnavailable as exc:
                raise StartupError(f"cannot use the embedded database {exc}") from exc
            run(_migrate(env["DATABASE_URL"]))
        env["PULSE_WORKERS"] = "1"
        # One set of metrics for the instance, whichever worker a scrape reaches
        # (pulse.ops.metrics): a new, empty folder for each run.
        shared = stack.enter_context(tempfile.TemporaryDirectory(prefix="pulse-metrics-"))
        env[MULTIPROCESS_DIR] = shared

        def spawn(index: int) -> subprocess.Popen[bytes]:
            fd, supervisor = str(sock.fileno()), str(os.getpid())
            worker = ["--fd", fd, "--supervisor", supervisor, "--worker", str(index)]
            return subprocess.Popen(
                [sys.executable, "-m", "pulse", "serve", *worker],
                env=_worker_env(env, settings, index),
                pass_fds=[sock.fileno()],
            )

        # At a stop, the supervisor's copy of the socket is closed with the workers told:
        # it stops listening once they have closed theirs (pulse.serving.workers).
        status = supervise(spawn, workers, shared, stop_listening=sock.close)
    sock.close()
    return status


def _worker_env(env: dict[str, str], settings: Settings, index: int) -> dict[str, str]:
    """With MQTT, each worker its own session: the broker keeps one per client id."""
    if not settings.mqtt_url:
        return env
    from pulse.mqtt.topics import default_client_id

    base = settings.mqtt_client_id or default_client_id()
    return {**env, "PULSE_MQTT_CLIENT_ID": f"{base}-{index}"}


async def _migrate(dsn: str) -> None:
    from pulse.db.migrate import migrate
    from pulse.db.pool import connect

    conn = await connect(dsn)
    try:
        await migrate(conn, dsn=dsn)
    finally:
        await conn.close()
