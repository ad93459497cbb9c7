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
proves itself reads into a second budget of the same size (``hold(device)``),
which strangers cannot fill. One device may hold at most an eighth of that second
budget (one largest body at least), so that a device token in the wrong hands cannot
fill it either: the abuse audit's finding, that the budget had no share per device.
"""

from __future__ import annotations

Device = tuple[str, str]  # (tenant_id, device_id)

# The largest ingest request body: a batch of up to 1000 readings.
MAX_BODY_BYTES = 1024 * 1024


class IngestBuffer:
    __slots__ = ("by_device", "device_limit", "held", "held_verified", "limit")

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError("the ingest buffer needs at least one byte")
        self.limit = limit_bytes
        self.held = 0  # by bodies of senders not known yet
        self.held_verified = 0  # by bodies of devices whose token was checked first
        # What one device may hold of the second budget, and what each holds now.
        self.device_limit = max(limit_bytes // 8, MAX_BODY_BYTES)
        self.by_device: dict[Device, int] = {}

    def hold(self, device: Device | None = None) -> Holding:
        """What one request holds; a context manager that gives it all back on exit.
        ``device``: a device whose token was checked first, which reads into the second
        budget, within its share."""
        return Holding(self, device)

    def under_pressure(self) -> bool:
        """More than half the shared budget is held: check header tokens first."""
        return self.held * 2 > self.limit


class Holding:
    __slots__ = ("_buffer", "_device", "bytes")

    def __init__(self, buffer: IngestBuffer, device: Device | None) -> None:
        self._buffer = buffer
        self._device = device
        self.bytes = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (nothing taken) when they do not fit."""
        buffer = self._buffer
        device = self._device
        if device is None:
            if buffer.held + size > buffer.limit:
                return False
            buffer.held += size
        else:
            mine = buffer.by_device.get(device, 0)
            if buffer.held_verified + size > buffer.limit or mine + size > buffer.device_limit:
                return False
            buffer.held_verified += size
            buffer.by_device[device] = mine + size
        self.bytes += size
        return True

    def release(self) -> None:
        buffer = self._buffer
        device = self._device
        if device is None:
            buffer.held -= self.bytes
        elif self.bytes:
            buffer.held_verified -= self.bytes
            left = buffer.by_device[device] - self.bytes
            if left:
                buffer.by_device[device] = left
            else:
                del buffer.by_device[device]
        self.bytes = 0

    def __enter__(self) -> Holding:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
