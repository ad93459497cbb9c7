"""h11's header checks made once per distinct list (pulse.serving.headers): the same
answers and the same refusals as h11's own, from a bounded memo."""

from __future__ import annotations

import h11
import pytest
from h11 import _headers

from pulse.serving import headers
from pulse.serving.headers import MEMO_SIZE, memoize_header_checks

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-store"),
    (b"date", b"Sat, 05 Dec 2026 11:00:00 GMT"),
    (b"server", b"hypercorn-h11"),
]


@pytest.fixture(autouse=True)
def memoized() -> None:
    memoize_header_checks()


def _response_bytes(header_list: list[tuple[bytes, bytes]]) -> bytes:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"GET /s HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(connection.next_event(), h11.Request)
    return connection.send(h11.Response(status_code=200, headers=header_list)) or b""


def test_a_list_of_headers_is_checked_once_and_its_answer_shared() -> None:
    first = _headers.normalize_and_validate(list(SSE_HEADERS))
    again = _headers.normalize_and_validate(list(SSE_HEADERS))
    assert again is first
    assert first.raw_items() == SSE_HEADERS


def test_a_streamed_response_is_written_as_h11_writes_it() -> None:
    head = _response_bytes(list(SSE_HEADERS))
    assert head == _response_bytes(list(SSE_HEADERS))
    assert head.startswith(b"HTTP/1.1 200 \r\n")
    assert b"transfer-encoding: chunked\r\n" in head.lower()
    assert head.count(b"\r\n") == len(SSE_HEADERS) + 3  # status line, headers, framing, end


@pytest.mark.parametrize(
    "bad",
    [
        [(b"content-type", b"text/plain\r\nx-injected: 1")],
        [(b"bad name", b"1")],
        [(b"content-length", b"1"), (b"content-length", b"2")],
    ],
)
def test_what_h11_refuses_is_refused_every_time_and_not_kept(
    bad: list[tuple[bytes, bytes]],
) -> None:
    for _ in range(2):
        with pytest.raises(h11.LocalProtocolError):
            _headers.normalize_and_validate(list(bad))
    assert tuple(bad) not in headers._memo


def test_pairs_given_as_lists_are_checked_without_the_memo() -> None:
    checked = _headers.normalize_and_validate([[b"x-a", b"1"], [b"X-B", "2"]])
    assert checked.raw_items() == [(b"x-a", b"1"), (b"X-B", b"2")]
    with pytest.raises(h11.LocalProtocolError):
        _headers.normalize_and_validate([[b"x-a", b"1\n"]])


def test_the_memo_stays_bounded() -> None:
    for n in range(MEMO_SIZE * 3):
        _headers.normalize_and_validate([(b"content-length", str(n).encode())])
        assert len(headers._memo) <= MEMO_SIZE


def test_applied_once_however_often_asked() -> None:
    applied = _headers.normalize_and_validate
    memoize_header_checks()
    assert _headers.normalize_and_validate is applied
    assert h11._events.normalize_and_validate is applied  # type: ignore[attr-defined]
