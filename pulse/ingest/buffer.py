"""How many bytes of ingest request bodies the process holds at once, across all requests.

A device proves who it is with a token that comes with its reading (in a
header, or inside a batch's body), and the token is checked only once the
body is complete. Until then its bytes are held for a sender nobody knows: 150
requests declaring 1 MiB and sending all but the last byte held about 170 MB
for as long as the 60 s body timeout. Each ingest request takes the bytes it
receives from this one budget and gives them back when it has been answered;
a request whose bytes do not fit is refused at once (503, ``server_busy``).

That budget alone let one client that never finished its bodies refuse every
device of every tenant (68 connections filled 64 MiB in 3 s). So a request whose
device token is in a header, when the shared budget is more than half full, has
its token checked before its body is read (``under_pressure``): a device that
proves itself reads into a second budget of the same size (``hold(verified=True)``),
which strangers cannot fill.
"""

from __future__ import annotations


class IngestBuffer:
    __slots__ = ("held", "held_verified", "limit")

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError("the ingest buffer needs at least one byte")
        self.limit = limit_bytes
        self.held = 0  # by bodies of senders not known yet
        self.held_verified = 0  # by bodies of devices whose token was checked first

    def hold(self, *, verified: bool = False) -> Holding:
        """What one request holds; a context manager that gives it all back on exit."""
        return Holding(self, verified)

    def under_pressure(self) -> bool:
        """More than half the shared budget is held: check header tokens first."""
        return self.held * 2 > self.limit


class Holding:
    __slots__ = ("_buffer", "_verified", "bytes")

    def __init__(self, buffer: IngestBuffer, verified: bool) -> None:
        self._buffer = buffer
        self._verified = verified
        self.bytes = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (nothing taken) when they do not fit."""
        buffer = self._buffer
        held = buffer.held_verified if self._verified else buffer.held
        if held + size > buffer.limit:
            return False
        if self._verified:
            buffer.held_verified += size
        else:
            buffer.held += size
        self.bytes += size
        return True

    def release(self) -> None:
        if self._verified:
            self._buffer.held_verified -= self.bytes
        else:
            self._buffer.held -= self.bytes
        self.bytes = 0

    def __enter__(self) -> Holding:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
