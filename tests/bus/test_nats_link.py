"""The bus's subjects and messages (pulse.bus.nats_link), without a server; and what
the link says of a server that does not answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
import pytest

from pulse.bus import nats_link
from pulse.bus.events import TelemetryEvent
from pulse.bus.nats_link import Events, NatsLink, Signal, decode, encode_events, encode_signal


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
    ((message, last, count),) = list(encode_events(6, events))
    assert (last, count) == (8, 2)
    decoded = decode(message)
    assert isinstance(decoded, Events) and decoded.after == 6
    assert [e.encode() for e in decoded.events] == [e.encode() for e in events]
    signal = decode(encode_signal("alerts"))
    assert isinstance(signal, Signal) and signal.kind == "alerts"
    assert decode(orjson.dumps({"something": "new"})) is None


def test_large_batches_are_split_into_messages_that_each_say_what_they_follow() -> None:
    metrics = orjson.dumps({f"m{i}": i for i in range(200)}).decode()
    events = [TelemetryEvent(i, "d", "2026-12-04T10:00:00.000Z", metrics) for i in range(11, 211)]
    for limit in (nats_link.MAX_MESSAGE_BYTES, 8192, len(metrics) * 3):
        messages = list(encode_events(10, events, limit))
        assert len(messages) > 1
        assert all(len(m.data) <= limit for m in messages)  # the server takes every one
        after = 10
        ids = []
        for message in messages:
            decoded = decode(message.data)
            assert isinstance(decoded, Events) and decoded.after == after
            ids += [e.id for e in decoded.events]
            after = decoded.events[-1].id
            assert (message.last, message.event_count) == (after, len(decoded.events))
        assert ids == list(range(11, 211))


def test_an_event_larger_than_the_limit_is_a_message_of_its_own() -> None:
    small, large = '{"v": 1}', orjson.dumps({f"m{i}": i for i in range(1000)}).decode()
    events = [
        TelemetryEvent(i, "d", "2026-12-04T10:00:00.000Z", large if i == 3 else small)
        for i in range(1, 6)
    ]
    messages = list(encode_events(0, events, 1000))
    assert [(m.last, m.event_count) for m in messages] == [(2, 2), (3, 1), (5, 2)]
    assert [len(m.data) > 1000 for m in messages] == [False, True, False]
    wakeup = decode(nats_link.encode_wakeup(3))  # what the relay says when it cannot publish
    assert isinstance(wakeup, Events) and wakeup.after == 3 and wakeup.events == []


def test_the_limit_is_the_servers_when_it_takes_less() -> None:
    assert nats_link.message_limit(1024 * 1024) == nats_link.MAX_MESSAGE_BYTES
    assert nats_link.message_limit(8192) == 8192


async def test_a_failure_without_words_is_named_by_its_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From the review of 7 December: a NATS server that took the connection and said
    nothing (SIGSTOPped) was logged as `bus: NATS at nats://...: ` and nothing more, the
    one line an operator got for the whole outage: a TimeoutError has no text."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    link = NatsLink(f"nats://127.0.0.1:{port}")
    caplog.set_level(logging.WARNING, logger="pulse.bus.nats_link")
    running = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(30):
            while not caplog.records:  # noqa: ASYNC110  a log record has no event to wait on
                await asyncio.sleep(0.05)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        silent.close()
    said = caplog.records[0].getMessage()
    assert said.startswith(f"bus: NATS at nats://127.0.0.1:{port}: "), said
    assert said.rstrip().endswith("Error"), said  # TimeoutError, named
