"""What the client commands (`pulse tail`, `export`, `simulate`) read from their command
line alike: the server's address and a token, from the options or from `PULSE_URL`
and `PULSE_TOKEN` (the variables the demo prints and the docs' examples read), and
numbers that must be positive. A wrong value stops the command before it starts,
with argparse's one line, never a retry loop or a traceback."""

from __future__ import annotations

import argparse
import os
from urllib.parse import urlsplit

from pulse.client.credentials import clean_token


def add_server_arguments(parser: argparse.ArgumentParser, *, token: str) -> None:
    """--url and --token; ``token`` says which JWT the command wants and how it gets one
    without either."""
    parser.add_argument(
        "--url",
        type=http_url,
        default=os.environ.get("PULSE_URL") or None,
        help="the server (default: $PULSE_URL, else http://127.0.0.1:$PORT)",
    )
    parser.add_argument(
        "--token", type=token_argument, default=os.environ.get("PULSE_TOKEN") or None, help=token
    )


def token_argument(value: str) -> str:
    """The token without the whitespace around it (``PULSE_TOKEN`` from a CRLF .env file,
    or ``$(cat token.txt)``), or argparse's one line, without the token, for one that
    cannot be a token: it was taken for an unreachable server and retried for ever, with
    the whole token in the messages. (argparse converts the environment's default too.)"""
    try:
        return clean_token(value, "the token (--token, or PULSE_TOKEN)")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def http_url(value: str) -> str:
    problem = address_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def address_problem(value: str) -> str | None:
    """Why ``value`` is not a server's address (None: it is one)."""
    parts = urlsplit(value)
    try:
        port = parts.port  # ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        port = -1
    # A query would be merged into every request's (to the page at /, say), and a
    # fragment is never sent: neither belongs to a server's address.
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or port == -1
        or parts.query
        or parts.fragment
    ):
        return f"{value!r} is not a server's address: give http://HOST:PORT or https://HOST"
    return None


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return number


def tcp_port(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1 to 65535)")
    return number


def seconds_or_zero(value: str) -> float:
    """A duration where 0 has a meaning of its own (never, don't): nothing below it."""
    number = float(value)
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not 0 or a positive number of seconds")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return number
