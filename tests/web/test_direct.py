"""Frames written straight to the connection are the bytes wsproto would have written."""

from __future__ import annotations

import pytest
from wsproto import Connection, ConnectionType
from wsproto.events import TextMessage

from pulse.web.direct import text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_text_frame_matches_wsproto(size: int) -> None:
    payload = (b'{"type":"telemetry","id":1}' * (size // 27 + 1))[:size]
    server = Connection(ConnectionType.SERVER)
    assert text_frame(payload) == server.send(TextMessage(data=payload.decode()))


def test_several_frames_in_one_write_read_back_as_separate_messages() -> None:
    payloads = [b'{"id":%d}' % i * (i * 40) for i in range(1, 6)]
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(b"".join(map(text_frame, payloads)))
    messages = [event.data for event in client.events() if isinstance(event, TextMessage)]
    assert messages == [p.decode() for p in payloads]
