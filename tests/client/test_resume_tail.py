"""RawExportTail against an export cut at every byte: what it hands over, with the rest
asked for again as it asks, is the export, every line once.

The "server" here answers as Pulse's export does: readings in (device time, id) order
shown to the millisecond, after the cursor (time, id) when there is one, a CSV header
first. Several readings share a millisecond, ordered there by microseconds against
their ids, and a reading of the cut's millisecond can be committed before the rest is
asked for.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from pulse.client.resume import RawExportTail

T0 = datetime(2026, 12, 1, tzinfo=UTC)
Reading = tuple[datetime, int, dict[str, float]]


def readings() -> list[Reading]:
    """Four readings a millisecond (the later id at the earlier microsecond), two metrics
    each; one millisecond with a single reading; some readings with one metric."""
    out = []
    for n in range(1, 41):
        moment = T0 + timedelta(milliseconds=n // 4, microseconds=3 - n % 4)
        metrics = {"a": n + 0.5} if n % 7 == 0 else {"a": n + 0.5, "b": -n}
        out.append((moment, n, metrics))
    out.append((T0 + timedelta(seconds=1), 41, {"a": 1.0, "b": 2.0}))
    return sorted(out, key=lambda r: (r[0], r[1]))


def shown(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def answer(rows: list[Reading], format: str, params: dict[str, str]) -> bytes:
    """The export's bytes for these parameters, as the server writes them."""
    if "cursor" in params:
        micros, _, after = params["cursor"].partition(".")
        since = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(micros))
        cursor = (since, int(after))
        rows = [r for r in rows if (r[0], r[1]) > cursor]
    start = datetime.fromisoformat(params["from"]) if "from" in params else None
    rows = [r for r in rows if start is None or r[0] >= start]
    if format == "ndjson":
        return b"".join(
            b'{"id":%d,"time":"%s","metrics":%s}\n' % (n, shown(t).encode(), orjson.dumps(m))
            for t, n, m in rows
        )
    lines = ["id,time,metric,value\r\n"]
    lines += [f"{n},{shown(t)},{k},{v}\r\n" for t, n, m in rows for k, v in m.items()]
    return "".join(lines).encode()


def pieces(data: bytes, rng: random.Random) -> list[bytes]:
    """The bytes as chunks of random sizes, as a socket hands them over."""
    out, at = [], 0
    while at < len(data):
        size = rng.randint(1, 80)
        out.append(data[at : at + size])
        at += size
    return out


@pytest.mark.parametrize("format", ["csv", "ndjson"])
def test_an_export_cut_anywhere_is_resumed_whole(format: str) -> None:
    rows = readings()
    whole = answer(rows, format, {})
    rng = random.Random(7)
    for cut in range(len(whole) + 1):
        tail = RawExportTail(format)
        out = b"".join(tail.take(piece) for piece in pieces(whole[:cut], rng))
        params = tail.resume({"bucket": "raw"})
        out += b"".join(tail.take(piece) for piece in pieces(answer(rows, format, params), rng))
        out += tail.rest()
        assert out == whole, cut


@pytest.mark.parametrize("format", ["csv", "ndjson"])
def test_a_reading_committed_in_the_cut_millisecond_comes_once(format: str) -> None:
    rows = readings()
    whole = answer(rows, format, {})
    # Cut after the second line of readings (one millisecond has four readings).
    cut = [i for i, byte in enumerate(whole) if byte == ord("\n")][2] + 1
    tail = RawExportTail(format)
    out = tail.take(whole[:cut])
    late = (rows[0][0] + timedelta(microseconds=999), 99, {"a": 9.0})  # same millisecond
    later = sorted([*rows, late], key=lambda r: (r[0], r[1]))
    out += tail.take(answer(later, format, tail.resume({})))
    assert out == answer(later, format, {})


@pytest.mark.parametrize("format", ["csv", "ndjson"])
def test_cut_again_and_again(format: str) -> None:
    """Each answer cut after a few hundred bytes (one millisecond's lines in CSV are
    about 330 with the header), with no line whole in some of them."""
    rows = readings()
    whole = answer(rows, format, {})
    rng = random.Random(11)
    tail = RawExportTail(format)
    out, params = b"", {"bucket": "raw"}
    for _ in range(10_000):
        body = answer(rows, format, params)
        cut = rng.randint(0, 600)
        out += tail.take(body[:cut])
        if cut >= len(body):
            break
        params = tail.resume(params)
    else:
        raise AssertionError("the export never ended")
    out += tail.rest()
    assert out == whole


def test_the_resumed_range_keeps_its_from() -> None:
    tail = RawExportTail("ndjson")
    tail.take(b'{"id":5,"time":"2026-12-01T00:00:00.250Z","metrics":{"a":1}}\n')
    given = {"from": "2026-11-30T00:00:00Z", "to": "2026-12-02T00:00:00Z"}
    assert tail.resume(given) == {**given, "cursor": "1796083200250000.0"}
    tail = RawExportTail("ndjson")
    tail.take(b'{"id":5,"time":"2026-12-01T00:00:00.250Z","metrics":{"a":1}}\n')
    # Without a from, the server's default would move with its clock: the cut's time holds.
    assert datetime.fromisoformat(tail.resume({})["from"]) == T0 + timedelta(milliseconds=250)
