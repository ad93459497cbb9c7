"""The bus's subjects and messages (pulse.bus.nats_link), without a server."""

from __future__ import annotations

import orjson

from pulse.bus import nats_link
from pulse.bus.events import TelemetryEvent
from pulse.bus.nats_link import Events, Signal, decode, encode_events, encode_signal


def test_one_tenant_is_one_subject_token_whatever_its_id() -> None:
    subjects = {
        tenant: nats_link.tenant_subject("db1", tenant)
        for tenant in ("acme", "acme.eu", "acme%2Eeu", "*", "a:b-c_d")
    }
    for subject in subjects.values():
        tokens = subject.split(".")
        assert tokens[:3] == ["pulse", "db1", "t"] and len(tokens) == 4
        assert "*" not in subject and ">" not in subject
    assert len(set(subjects.values())) == len(subjects)  # no two tenants share one
    assert nats_link.relay_subject("db1") == "pulse.db1.relay"


def test_events_survive_the_wire_exactly() -> None:
    events = [
        TelemetryEvent(7, "dev-1", "2026-12-04T10:00:00.000Z", '{"temp": 21.5, "ok": true}'),
        TelemetryEvent(8, 'd"2', "2026-12-04T10:00:01.000Z", '{"v": 1}'),
    ]
    (message,) = list(encode_events(6, events))
    decoded = decode(message)
    assert isinstance(decoded, Events) and decoded.after == 6
    assert [e.encode() for e in decoded.events] == [e.encode() for e in events]
    signal = decode(encode_signal("alerts"))
    assert isinstance(signal, Signal) and signal.kind == "alerts"
    assert decode(orjson.dumps({"something": "new"})) is None


def test_large_batches_are_split_into_messages_that_each_say_what_they_follow() -> None:
    metrics = orjson.dumps({f"m{i}": i for i in range(200)}).decode()
    events = [TelemetryEvent(i, "d", "2026-12-04T10:00:00.000Z", metrics) for i in range(11, 211)]
    messages = list(encode_events(10, events))
    assert len(messages) > 1
    assert all(len(m) <= nats_link.MAX_MESSAGE_BYTES + 10_000 for m in messages)
    after = 10
    ids = []
    for message in messages:
        decoded = decode(message)
        assert isinstance(decoded, Events) and decoded.after == after
        ids += [e.id for e in decoded.events]
        after = decoded.events[-1].id
    assert ids == list(range(11, 211))
