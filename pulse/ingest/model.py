"""What goes into the write path and what comes out of it, one entry per message."""

from __future__ import annotations

import dataclasses

import msgspec

from pulse.errors import ErrorCode
from pulse.ingest.validation import Reading

Device = tuple[str, str]  # (tenant_id, device_id)


class Submission(msgspec.Struct, gc=False):  # a Struct: see validation.Reading
    """One authenticated-to-be message: a reading, or a heartbeat when ``reading`` is None."""

    tenant_id: str
    device_id: str
    token: str
    reading: Reading | None
    # Taken by the MQTT broker from the device's own topic (pulse.mqtt): the broker
    # checked the device's credentials, so ``token`` is not checked again, and the
    # broker may deliver it twice, so a reading with a ``seq`` is stored once.
    broker: bool = False

    @property
    def device(self) -> Device:
        return (self.tenant_id, self.device_id)


class Accepted(msgspec.Struct, gc=False):
    """Committed. ``event_id`` is the stored row's id; None for a heartbeat, and for a
    broker's second delivery of a reading stored already (``duplicate``)."""

    event_id: int | None
    duplicate: bool = False


@dataclasses.dataclass(frozen=True)
class Rejected:
    """Nothing was stored for this message: ``reason`` is the error of a single request
    and the ``reason`` of a batch result (invalid_payload, invalid_device_token,
    unknown_device, payload_too_large, rate_limited)."""

    reason: ErrorCode
    detail: str
    retry_after_s: float = 0.0


Outcome = Accepted | Rejected
