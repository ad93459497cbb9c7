"""`pulse serve --workers N`: N server processes on one listening socket, supervised.

A worker that dies while the instance runs (killed, out of memory) is logged and
replaced at once, its metrics' live gauges dropped with it (``pulse.ops.metrics``):
an instance that went on at half its workers said nothing, and its /metrics kept
the dead worker's gauges (a second relay, streams long gone). A worker that exits
with an error within STARTUP_S of its start, before any worker of the instance has
served, stops the instance instead, with status 1: it would not start again (the
database not migrated, say). Once one has served, a replacement that fails so is
started again after a backoff (1 s doubling to 30 s, a log line each), the others
serving on, and with none left the supervisor keeps trying: a replacement started
while the database was down used to stop the whole instance, healthy workers
included, which the platform's restarts could then not start either. SIGTERM, SIGINT and SIGHUP stop
every worker, and the supervisor closes its copy of the listening socket at once: the
socket stops listening as soon as the workers have closed theirs, each as its shutdown
starts, so new connections are refused, as with one process. (The supervisor's copy
kept it listening until the last worker had exited: connections the kernel accepted
for the whole graceful timeout, read by no one, then reset.) A worker whose supervisor
has gone stops itself (``watch_parent``), rather than keep the port from the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from prometheus_client.multiprocess import mark_process_dead

log = logging.getLogger(__name__)

STARTUP_S = 10.0
POLL_S = 0.2
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
READY_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

Spawn = Callable[[int], "subprocess.Popen[bytes]"]


def supervise(
    spawn: Spawn, count: int, metrics_dir: str, stop_listening: Callable[[], None]
) -> int:
    """Run ``count`` workers made by ``spawn(index)`` until a stop signal (or one that
    cannot start at the instance's first start); the exit status: 0, or 1 when a worker
    failed. ``stop_listening`` closes the supervisor's copy of the listening socket:
    called once the workers have been told to stop, after which ``spawn`` is never
    called. A worker says it serves with READY_SIGNAL (``tell_ready``)."""
    ready: list[bool] = []
    # Installed before the first spawn: the signal's default action ends the process.
    signal.signal(READY_SIGNAL, lambda _signum, _frame: ready.append(True))
    running = {index: (spawn(index), time.monotonic()) for index in range(count)}
    # Replacements that failed to start, waiting for their next try: index -> when.
    due: dict[int, float] = {}
    failures = dict.fromkeys(range(count), 0)  # in a row, by index
    stopping: list[int] = []
    failed = False
    reaping = False  # the loop below may be spawning: the socket is still needed

    def tell(children: list[subprocess.Popen[bytes]], signum: int) -> None:
        for child in children:
            if child.poll() is None:
                # SIGHUP (a closed terminal) ends a worker the way SIGTERM does.
                child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    def stop(signum: int, _frame: object = None) -> None:
        stopping.append(signum)
        tell([child for child, _ in running.values()], signum)
        if not reaping:
            stop_listening()

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    while running or (due and not stopping):
        time.sleep(POLL_S)
        reaping, stops, spawned = True, len(stopping), []
        for index, (child, since) in list(running.items()):
            code = child.poll()
            if code is None:
                continue
            del running[index]
            mark_process_dead(child.pid, metrics_dir)  # type: ignore[no-untyped-call]
            as_it_started = code > 0 and time.monotonic() - since < STARTUP_S
            if stopping:
                # A worker still starting when stopped ends by the signal itself.
                failed = failed or code not in (0, -signal.SIGTERM, -signal.SIGINT)
            elif as_it_started and not ready:
                log.error("worker %d exited with status %d as it started; stopping", index, code)
                failed = True
                stop(signal.SIGTERM)
            elif as_it_started:
                failures[index] += 1
                delay = backoff(failures[index])
                log.error(
                    "worker %d exited with status %d as it started (%d in a row); starting "
                    "it again in %g s",
                    index,
                    code,
                    failures[index],
                    delay,
                )
                due[index] = time.monotonic() + delay
            else:
                failures[index] = 0
                log.error(
                    "worker %d (pid %d) exited with status %d; starting another",
                    index,
                    child.pid,
                    code,
                )
                spawned.append(new := spawn(index))
                running[index] = (new, time.monotonic())
        for index, at in list(due.items()):
            if not stopping and time.monotonic() >= at:
                del due[index]
                spawned.append(new := spawn(index))
                running[index] = (new, time.monotonic())
        reaping = False
        if len(stopping) > stops:  # stopped meanwhile: a worker spawned then was not told
            tell(spawned, stopping[-1])
            stop_listening()
    return 1 if failed else 0


def backoff(failures: int) -> float:
    """The wait before the next start of a worker whose last ``failures`` starts failed:
    1 s, doubling, at most BACKOFF_MAX_S."""
    return min(BACKOFF_FIRST_S * 2.0 ** max(failures - 1, 0), BACKOFF_MAX_S)


def tell_ready(supervisor: int) -> None:
    """In a worker, once it serves: READY_SIGNAL to its supervisor, so that a later
    worker that fails to start (the database down) is started again rather than taken
    for an instance that cannot start. Not sent once the supervisor has gone: its pid
    may be another process's by then, which the signal would end."""
    if os.getppid() == supervisor:
        os.kill(supervisor, READY_SIGNAL)


def watch_parent(parent: int) -> None:
    """In a worker: SIGTERM to itself once its supervisor ``parent`` has gone (killed,
    it could stop no one), so that it does not serve on without one, holding the port."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the supervisor (pid %d) has gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
