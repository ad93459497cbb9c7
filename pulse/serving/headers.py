"""h11's checks of a response's headers, made once per distinct list of headers.

Building a response, h11 checks every header against the grammar of names and
values (two regular expressions each), three times for a streamed response:
hypercorn's ``h11.Response``, then each of the two framing headers h11 sets
(Content-Length dropped, Transfer-Encoding: chunked), each of which rebuilds and
checks the whole list. That was about a tenth of the server's CPU in a storm of
reconnecting SSE clients, whose responses carry the same headers every time but
the date, which changes once a second.

``normalize_and_validate`` is a pure function of the (name, value) pairs it is
given, and the ``Headers`` it returns is never changed afterwards (h11 and
hypercorn only read it), so equal lists share one result. What fails the checks
is not kept, and raises as before. Applied by ``pulse.serving.tuning``.
"""

from __future__ import annotations

from typing import Any

# Distinct header lists kept at once; the whole memo is dropped when full (a
# new second's date header, or responses whose headers vary, fill it).
MEMO_SIZE = 256
_memo: dict[tuple[Any, ...], Any] = {}


def memoize_header_checks() -> None:
    """Put the memo in front of h11's ``normalize_and_validate`` (once)."""
    from h11 import _events, _headers

    if getattr(_headers.normalize_and_validate, "pulse_memo", False):
        return
    check = _headers.normalize_and_validate
    memo = _memo

    def normalize_and_validate(headers: Any, _parsed: bool = False) -> Any:
        if _parsed:  # from h11's own parser: not checked, only lowered
            return check(headers, _parsed)
        key = tuple(headers)
        try:
            return memo[key]
        except KeyError:
            pass
        except TypeError:  # a pair given as a list: checked as it is, not kept
            return check(headers, _parsed)
        checked = check(headers, _parsed)
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        memo[key] = checked
        return checked

    normalize_and_validate.pulse_memo = True  # type: ignore[attr-defined]
    _headers.normalize_and_validate = normalize_and_validate  # used by set_comma_header
    # and by the events' __init__ (h11.Response, h11.Request):
    _events.normalize_and_validate = normalize_and_validate  # type: ignore[attr-defined]
