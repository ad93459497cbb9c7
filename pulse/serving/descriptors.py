"""Running out of file descriptors, said: a log line and a counter.

Every connection is an open file. When a process has none left, the event loop
cannot accept: uvloop's libuv then closes its reserve descriptor, accepts every
pending connection and closes it at once, and takes its reserve again (its
"EMFILE trick"), never calling back into Python. So no exception handler hears
of it (asyncio's own loop would log "socket.accept() out of system resource"),
and the clients' connections are closed unanswered in silence: an audit held
all 300 descriptors of a server with 600 idle connections, and every other
client got ECONNRESET for 30 s with nothing in the log.

``watch`` looks once a second whether one more file can be opened. While it
cannot, it counts each look (``pulse_open_files_exhausted_total``: about the
seconds spent without a descriptor) and logs a warning with what to do, once
per 10 s at most; it logs once more when descriptors are free again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time
from collections.abc import Callable

from pulse.logs import Throttled

log = logging.getLogger(__name__)

CHECK_S = 1.0
_OUT = (errno.EMFILE, errno.ENFILE)


def out_of_descriptors() -> int | None:
    """The errno (EMFILE, ENFILE) when no file can be opened now; None when one can."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _OUT:
            return exc.errno
        raise
    os.close(fd)
    return None


def _limit() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


async def watch(on_exhausted: Callable[[], None], every_s: float = CHECK_S) -> None:
    """Until cancelled: ``on_exhausted()`` and a (throttled) warning at each look that
    finds no descriptor left."""
    warn = Throttled(log)
    since: float | None = None
    while True:
        reason = out_of_descriptors()
        if reason is not None:
            since = time.monotonic() if since is None else since
            on_exhausted()
            warn.warning(
                "cannot accept connections: %s: new connections are closed unanswered "
                "(the client sees a reset). Raise the limit (LimitNOFILE in systemd, "
                "ulimit -n), lower PULSE_MAX_CONNECTIONS, or put a proxy in front that "
                "holds idle connections",
                f"this process has no file descriptor left (ulimit -n {_limit()})"
                if reason == errno.EMFILE
                else "the system's table of open files is full (fs.file-max)",
            )
        elif since is not None:
            log.warning(
                "file descriptors are free again, after %.0f s without", time.monotonic() - since
            )
            since = None
        await asyncio.sleep(every_s)
