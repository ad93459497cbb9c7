"""One logging setup for every command (``pulse serve``, its workers, the demo, the tools).

One handler on stderr, on the root logger: hypercorn's error and access logs
are handed loggers of their own (``pulse.serving.hypercorn_config``) that
propagate here, so each line is written once, in one format: text, or with
PULSE_LOG_FORMAT=json one JSON object per line for log shippers.

PULSE_LOG_LEVEL sets Pulse's own loggers. Other libraries never log below
INFO, and those whose output carries credentials never below WARNING: at
DEBUG, hpack (HTTP/2, which hypercorn speaks where Pulse's tunings do not apply) logs every
header it decodes, ``Authorization`` and ``X-Provision-Token`` included, and
the ``:path`` with its query string (tickets); httpx logs request URLs at
INFO; h2, h11, wsproto and websockets log frames and handshakes. Tokens and
tickets are never logged, at any level (CONTRACT section 7).
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from datetime import UTC, datetime
from time import monotonic  # a name of this module's own: tests set it
from typing import TextIO

import orjson

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Under ``serve --workers``, whose processes write to one stderr, which said what.
TEXT_FORMAT_PID = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

# Libraries whose records may hold request headers, URLs or frames.
QUIET_LIBRARIES = (
    "hpack",
    "h2",
    "h11",
    "wsproto",
    "httpx",
    "httpcore",
    "websockets",
    "asyncio",
    "asyncpg",
)
# hypercorn's error log ("Running on ...") follows PULSE_LOG_LEVEL, down to INFO.
SERVER_LOGGER = "hypercorn.error"
ACCESS_LOGGER = "hypercorn.access"
# Its reconnect attempts during an outage, once per 10 s (OncePer).
POOL_LOGGER = "asyncpg.pool"
_HANDLER = "pulse"

# ``extra`` of a record about the whole instance, not the process that finds it (the
# database's state at start, say): under ``serve --workers`` only the first worker
# says it, where every worker finds it.
INSTANCE_WIDE = {"instance_wide": True}


def configure_logging(
    level: str = "INFO",
    log_format: str = "text",
    *,
    stream: TextIO | None = None,
    with_pid: bool = False,
    says_instance_wide: bool = True,
) -> None:
    """Install the one handler and the levels; calling it again replaces them. JSON
    lines always name their process; text lines do ``with_pid``. Without
    ``says_instance_wide`` (a worker of several, not the first), records marked
    ``INSTANCE_WIDE`` are not written."""
    # Either case, as Settings.check takes them (and cli.fail reads PULSE_LOG_FORMAT).
    level, log_format = level.strip().upper(), log_format.strip().lower()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(LEVELS)}")
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else TextFormatter(TEXT_FORMAT_PID if with_pid else TEXT_FORMAT)
    )
    handler.set_name(_HANDLER)
    if not says_instance_wide:
        handler.addFilter(_said_by_another)
    root = logging.getLogger()
    # Only ours: others (pytest's, an embedding program's) stay.
    for old in [h for h in root.handlers if h.get_name() == _HANDLER]:
        root.removeHandler(old)
    root.addHandler(handler)
    number = logging.getLevelName(level)
    root.setLevel(max(number, logging.INFO))
    logging.getLogger("pulse").setLevel(number)
    logging.getLogger(SERVER_LOGGER).setLevel(max(number, logging.INFO))
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(number, logging.WARNING))
    # Asked for with PULSE_ACCESS_LOG=1, so shown whatever the level.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    pool = logging.getLogger(POOL_LOGGER)
    for old_filter in [f for f in pool.filters if isinstance(f, OncePer)]:
        pool.removeFilter(old_filter)
    pool.addFilter(OncePer())


class TextFormatter(logging.Formatter):
    """A record's message on its one line, its line breaks written ``\\n``: an error's
    text put into a message may hold them (the server's DETAIL after the driver's
    message), and a line with no time or level is a stray line to a log shipper. A
    traceback, when there is one, still follows on lines of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if "\n" in record.message or "\r" in record.message:
            record.message = record.message.replace("\r", "\\r").replace("\n", "\\n")
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, and the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def _said_by_another(record: logging.LogRecord) -> bool:
    return not getattr(record, "instance_wide", False)


class OncePer(logging.Filter):
    """A logger's filter: one record per ``every_s`` seconds, its traceback cut to the
    exception's line. asyncpg's pool logs "Failed to restore the pool connection floor"
    with a 20-line traceback every 2 to 4 s of a database outage.

    The count of records left out belongs to its incident, as with Throttled: when the
    last was left out more than ``every_s`` before (that incident ended), the next line
    says the count as the earlier incident's, until when. Before, the next outage's
    first line claimed it ("(and 4 more times in the last 70 s)")."""

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self._every_s = every_s
        self._said_at: float | None = None
        self._unsaid = 0
        self._left_out_at = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = monotonic()
        if self._said_at is not None and now - self._said_at < self._every_s:
            self._unsaid += 1
            self._left_out_at = now
            return False
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message += f": {type(error).__name__}: {error}"
        if self._unsaid and self._said_at is not None:
            if now - self._left_out_at <= self._every_s:
                message += (
                    f" (and {self._unsaid} more times in the last {now - self._said_at:.0f} s)"
                )
            else:
                message += (
                    f" (the last incident: {self._unsaid} more times in the "
                    f"{self._left_out_at - self._said_at:.0f} s after its line, until "
                    f"{now - self._left_out_at:.0f} s ago)"
                )
        record.msg, record.args = message, None
        record.exc_info = record.exc_text = None
        self._said_at, self._unsaid = now, 0
        return True


# Different errors a Throttled remembers having traced (the least recently seen forgotten).
_TRACED_AT_MOST = 100


class Throttled:
    """A warning said once per ``every_s`` seconds at most, with how many times it was
    not said in between: an outage answered request by request would otherwise write a
    line per request (136 in 12 s for four clients), burying what the operator needs.

    The count belongs to its incident: when nothing was left unsaid for longer than
    ``every_s`` (the incident ended), the next line does not carry it; it is said first,
    on a line of its own with the last message left out, as "(N more times ... until S s
    ago)". Before, the next incident's first line claimed it ("(and 17 more times in the
    last 64 s)", 63 s after the last outage had ended), and the end of each incident
    went uncounted."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self._logger = logger
        self._every_s = every_s
        self._said_at: float | None = None
        self._unsaid = 0
        # The last call left out: when, at which level, its message and arguments.
        self._left_out: tuple[float, int, str, tuple[object, ...]] | None = None
        self._traced: OrderedDict[tuple[type[BaseException], str | tuple[str, int]], None]
        self._traced = OrderedDict()

    def warning(self, message: str, *args: object) -> None:
        now = monotonic()
        if self._held(now, logging.WARNING, message, args):
            return
        message, args = self._with_count(now, message, args)
        self._logger.warning(message, *args)
        self._said_at, self._unsaid = now, 0

    def error(self, message: str, *args: object, exc: BaseException | None = None) -> None:
        """An error that may last (a permission revoked: every try fails alike), said from
        an ``except`` block (or of ``exc``): the traceback of each different error (its
        class and the line that raised it) in full the first time; else its
        exception's line, once per ``every_s`` at most, with how many times it was not
        said in between. Before, such an error wrote a 28-line traceback a second per
        tenant."""
        error = exc if exc is not None else sys.exc_info()[1]
        now = monotonic()
        key = None if error is None else _error_key(error)
        if key is not None and key not in self._traced:
            if len(self._traced) >= _TRACED_AT_MOST:
                self._traced.popitem(last=False)
            self._traced[key] = None
            message, args = self._with_count(now, message, args)
            self._logger.error(message, *args, exc_info=error)
            self._said_at, self._unsaid = now, 0
            return
        if key is not None:
            self._traced.move_to_end(key)
        if error is not None:
            message += ": %s: %s (again)"
            args = (*args, type(error).__name__, error)
        if self._held(now, logging.ERROR, message, args):
            return
        message, args = self._with_count(now, message, args)
        self._logger.error(message, *args)
        self._said_at, self._unsaid = now, 0

    def _held(self, now: float, level: int, message: str, args: tuple[object, ...]) -> bool:
        """Whether this call is within ``every_s`` of the last said, and so left out."""
        if self._said_at is not None and now - self._said_at < self._every_s:
            self._unsaid += 1
            self._left_out = (now, level, message, args)
            return True
        return False

    def _with_count(
        self, now: float, message: str, args: tuple[object, ...]
    ) -> tuple[str, tuple[object, ...]]:
        """``message`` with the count left out since the last line, if it is this
        incident's; an ended incident's count said on its own line first."""
        if self._say_ended(now) or not self._unsaid or self._said_at is None:
            return message, args
        return (
            message + " (and %d more times in the last %.0f s)",
            (*args, self._unsaid, now - self._said_at),
        )

    def _say_ended(self, now: float) -> bool:
        """Say the count of an incident that ended (nothing left out for ``every_s``):
        True if it did."""
        if not self._unsaid or self._left_out is None or self._said_at is None:
            return False
        at, level, message, args = self._left_out
        if now - at <= self._every_s:
            return False
        self._logger.log(
            level,
            message + " (%d more times in the %.0f s after the line before, until %.0f s ago)",
            *args,
            self._unsaid,
            at - self._said_at,
            now - at,
        )
        self._unsaid = 0
        return True


def _error_key(error: BaseException) -> tuple[type[BaseException], str | tuple[str, int]]:
    """What tells two errors apart for tracing: their class and where they were raised;
    their text only when that is not known. The text alone told apart errors that differ
    by an id or a time in it: one raised with a new text each time was traced each time."""
    raised_at = _raised_at(error)
    return type(error), str(error) if raised_at is None else raised_at


def _raised_at(error: BaseException) -> tuple[str, int] | None:
    """The file and line an exception was raised at (its traceback's innermost frame):
    the same error raised from two places is two errors to trace."""
    tb = error.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename, tb.tb_lineno
