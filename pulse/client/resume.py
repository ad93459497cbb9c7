"""Where a raw export stands, so that a cut one goes on from there with nothing lost or
written twice.

A raw export is in (device time, id) order, one line per reading (NDJSON) or per
metric of a reading (CSV, after a header line). Its lines show times to the
millisecond, not the microsecond the order uses, so the export is asked for again
from the last whole line's millisecond (``cursor``: that time, id 0, so every reading
of that millisecond comes again) and the lines of that millisecond already handed
over are left out, known by their id (and metric, in CSV). Only whole lines are
handed over: a line the cut split in two comes again whole.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from pulse.client.history import after_cursor

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RawExportTail:
    def __init__(self, format: str) -> None:
        self._csv = format == "csv"
        self._partial = b""  # the start of a line not yet whole
        self._header = self._csv  # the next whole line is a CSV header
        self._header_given = False
        self._time: bytes | None = None  # the last whole line's time
        self._seen: set[bytes] = set()  # the keys of the lines handed over with that time
        self._resumed = False  # skipping the head of an answer asked again

    def take(self, chunk: bytes) -> bytes:
        """The whole lines that ``chunk`` completes, less those handed over already."""
        data = self._partial + chunk
        end = data.rfind(b"\n") + 1
        self._partial = data[end:]
        if not end:
            return b""
        whole = data[:end]
        header = b""
        if self._header:
            self._header = False
            line_end = whole.index(b"\n") + 1
            header = b"" if self._header_given else whole[:line_end]
            self._header_given = True
            whole = whole[line_end:]
        if self._resumed and whole:
            whole = self._drop_seen(whole)
        if whole:
            self._note(whole)
        return header + whole

    def rest(self) -> bytes:
        """What is left once the answer ended whole (nothing: every line ends)."""
        rest, self._partial = self._partial, b""
        return rest

    def resume(self, params: dict[str, str]) -> dict[str, str]:
        """The parameters that ask for the rest; from now on, answers are taken as its."""
        self._partial = b""
        self._header = self._csv
        self._resumed = self._time is not None
        if self._time is None:
            return params  # no reading came whole: the export again, its header left out
        time = self._time.decode()
        micros = (datetime.fromisoformat(time) - _EPOCH) // timedelta(microseconds=1)
        return after_cursor(params, f"{micros}.0")

    def _drop_seen(self, whole: bytes) -> bytes:
        """Leave out the lines of the resumed millisecond that were handed over."""
        kept = []
        start = 0
        while start < len(whole):
            line_end = whole.index(b"\n", start) + 1
            line = whole[start:line_end]
            time, key = self._parse(line)
            if time != self._time:
                self._resumed = False  # past that millisecond: the rest is all new
                kept.append(whole[start:])
                break
            if key not in self._seen:  # one committed since, or after the cut
                kept.append(line)
            start = line_end
        return b"".join(kept)

    def _note(self, whole: bytes) -> None:
        """Remember the last line's time and the keys of the lines with it."""
        end = len(whole)
        while end > 0:
            start = whole.rfind(b"\n", 0, end - 1) + 1
            time, key = self._parse(whole[start:end])
            if time != self._time:
                if end < len(whole):
                    break  # an earlier time: the last millisecond's lines are all noted
                self._time = time
                self._seen = set()
            self._seen.add(key)
            end = start

    def _parse(self, line: bytes) -> tuple[bytes, bytes]:
        """A line's time, and the key that tells it from the others with that time."""
        if self._csv:
            reading_id, time, metric, _ = line.split(b",", 3)
            return time, reading_id + b"," + metric
        reading = orjson.loads(line)
        return reading["time"].encode(), str(reading["id"]).encode()
