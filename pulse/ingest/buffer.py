"""How many bytes of ingest request bodies the process holds at once, across all requests.

A device proves who it is with a token that comes with its reading (in a
header, or inside a batch's body), and the token is checked only once the
body is complete. Until then its bytes are held for a sender nobody knows: 150
requests declaring 1 MiB and sending all but the last byte held about 170 MB
for as long as the 60 s body timeout. Each ingest request takes the bytes it
receives from this one budget and gives them back when it has been answered;
a request whose bytes do not fit is refused at once (503, ``server_busy``).
"""

from __future__ import annotations


class IngestBuffer:
    __slots__ = ("held", "limit")

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError("the ingest buffer needs at least one byte")
        self.limit = limit_bytes
        self.held = 0

    def hold(self) -> Holding:
        """What one request holds; a context manager that gives it all back on exit."""
        return Holding(self)


class Holding:
    __slots__ = ("_buffer", "bytes")

    def __init__(self, buffer: IngestBuffer) -> None:
        self._buffer = buffer
        self.bytes = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (nothing taken) when they do not fit."""
        buffer = self._buffer
        if buffer.held + size > buffer.limit:
            return False
        buffer.held += size
        self.bytes += size
        return True

    def release(self) -> None:
        self._buffer.held -= self.bytes
        self.bytes = 0

    def __enter__(self) -> Holding:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
