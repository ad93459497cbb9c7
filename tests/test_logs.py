"""One logging setup: one line per record, text or JSON, and no credentials at any level.

The subprocess tests run `pulse serve` as deployed and read everything it writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from pulse.config import ConfigError, Settings
from pulse.logs import QUIET_LIBRARIES, configure_logging
from tests.support import TEST_SECRET, ServeProcess, pulse_serve

pytestmark = pytest.mark.timeout(120)

RUNNING_ON = "Running on http://"


def test_json_lines() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    logging.getLogger("pulse.test").info("hello %s", "world")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("pulse.test").exception("it failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "hello world"
    assert (first["level"], first["logger"]) == ("INFO", "pulse.test")
    assert first["time"].endswith("Z") and isinstance(first["process"], int)
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exception"]


def test_debug_is_for_pulse_only() -> None:
    out = io.StringIO()
    configure_logging("DEBUG", "text", stream=out)
    logging.getLogger("pulse.test").debug("ours")
    for name in (*QUIET_LIBRARIES, "hpack.hpack", "some.library"):
        logging.getLogger(name).debug("Decoded (b'authorization', b'Bearer leaked')")
    logging.getLogger("httpx").info("HTTP Request: GET http://x/?ticket=leaked")
    logging.getLogger("hypercorn.error").info(RUNNING_ON)
    text = out.getvalue()
    assert "pulse.test: ours" in text
    assert "leaked" not in text
    assert text.count(RUNNING_ON) == 1


def test_text_lines_name_their_process_when_asked() -> None:
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out, with_pid=True)
    logging.getLogger("pulse.test").info("which one")
    assert f"INFO [{os.getpid()}] pulse.test: which one" in out.getvalue()


def test_a_text_line_is_one_line_whatever_its_message_holds() -> None:
    """From the operations audit: a driver's error in a message (its DETAIL after a
    newline) wrote a second line with no time or level, a stray line to a log shipper."""
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    logging.getLogger("pulse.test").warning("unavailable: %s", "no partition\nDETAIL:  key\r")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("WARNING pulse.test: unavailable: no partition\\nDETAIL:  key\\r")


def test_configuring_again_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "text", stream=first)
    configure_logging("WARNING", "text", stream=second)
    logging.getLogger("pulse.test").warning("once")
    logging.getLogger("hypercorn.error").info(RUNNING_ON)
    assert first.getvalue() == "" and second.getvalue().count("once") == 1
    assert RUNNING_ON not in second.getvalue()


@pytest.mark.parametrize(
    ("variable", "value"), [("PULSE_LOG_FORMAT", "xml"), ("PULSE_LOG_LEVEL", "LOUD")]
)
def test_unknown_level_or_format_is_a_config_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(("level", "log_format"), [("info", "JSON"), (" Warning ", " Json ")])
def test_the_level_and_the_format_are_taken_in_either_case(level: str, log_format: str) -> None:
    """From the first-ten-minutes audit: PULSE_LOG_FORMAT=JSON made `pulse`'s own last line
    JSON (cli.fail lower-cases it) saying `'JSON' is not one of text, json`."""
    settings = Settings.from_env({"PULSE_LOG_LEVEL": level, "PULSE_LOG_FORMAT": log_format})
    out = io.StringIO()
    configure_logging(settings.log_level, settings.log_format, stream=out)
    logging.getLogger("pulse.test").warning("in JSON")
    assert json.loads(out.getvalue())["message"] == "in JSON"


async def test_running_on_is_one_line_at_info_and_silent_at_warning(
    database_url: str, tmp_path: Path
) -> None:
    for level, expected in (("INFO", 1), ("WARNING", 0)):
        async with pulse_serve(
            data_dir=tmp_path, database_url=database_url, env={"PULSE_LOG_LEVEL": level}, stdout=-1
        ) as server:
            pass
        output = (server.stdout + server.stderr).decode()
        assert output.count(RUNNING_ON) == expected, output


@contextlib.asynccontextmanager
async def said_on_failure(server: ServeProcess) -> AsyncIterator[None]:
    """A request that fails shows what the server logged up to then."""
    try:
        yield
    except httpx.TransportError as exc:
        with contextlib.suppress(Exception):
            await server.stop()
        said = (server.stdout + server.stderr).decode(errors="replace")[-4000:]
        raise AssertionError(f"{exc!r}; the server logged:\n{said}") from exc


async def test_no_token_or_ticket_in_the_log_at_debug(database_url: str, tmp_path: Path) -> None:
    """At DEBUG, where hpack logged every decoded header while HTTP/2 was served.

    The credentials go where they go in real use: a JWT in Authorization, a device
    token in X-Provision-Token, a ticket in the query string of a stream URL.
    """
    from pulse.auth.dev_tokens import mint_token

    jwt = mint_token(TEST_SECRET, tenant_id="t1", roles=["tenant-admin"])
    env = {"PULSE_LOG_LEVEL": "DEBUG", "PULSE_LOG_FORMAT": "json", "PULSE_ACCESS_LOG": "1"}
    # A connection per request: one left idle for hypercorn's keep-alive timeout (5 s;
    # a stalled loaded machine) is closed by the server as the next request goes out on
    # it, which a client sees as "Server disconnected" (once in CI, 5 December).
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url, env=env, stdout=-1) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, limits=fresh) as http,
        said_on_failure(server),
    ):
        bearer = {"Authorization": f"Bearer {jwt}"}
        r = await http.post("/api/v1/customer/devices", json={"device_id": "d1"}, headers=bearer)
        assert r.status_code == 201, r.text
        device_token = r.json()["provision_token"]
        r = await http.post(
            "/ingest/v1/tenant/t1/device/d1/telemetry",
            json={"metrics": {"v": 1}},
            headers={"X-Provision-Token": device_token},
        )
        assert r.status_code == 201, r.text
        ticket = (await http.post("/api/v1/stream-ticket", headers=bearer)).json()["ticket"]
        sse = "/api/v1/customer/telemetry/stream/sse"
        async with http.stream("GET", sse, params={"ticket": ticket}) as stream:
            assert stream.status_code == 200
            async for chunk in stream.aiter_bytes():
                assert chunk.startswith(b"retry:")
                break
        r = await http.get(sse, params={"token": jwt, "last_event_id": "x"})
        assert r.status_code == 400
    output = server.stdout + server.stderr
    lines = output.decode().splitlines()
    assert all(json.loads(line) for line in lines), "one JSON object per line"
    assert any("GET /api/v1/customer/telemetry/stream/sse 1.1" in line for line in lines), lines
    for secret in (jwt, device_token, ticket, jwt.split(".")[2], device_token[4:], ticket[4:]):
        assert secret.encode() not in output
    assert b"token=" not in output and b"ticket=" not in output
    assert b"authorization" not in output.lower() and b"x-provision-token" not in output.lower()


def test_a_throttled_warning_is_said_once_per_interval_with_what_it_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pulse import logs

    clock = [100.0]
    monkeypatch.setattr(logs, "monotonic", lambda: clock[0])
    throttled = logs.Throttled(logging.getLogger("pulse.test"), every_s=10)
    with caplog.at_level(logging.WARNING, logger="pulse.test"):
        for _ in range(5):
            throttled.warning("database unavailable: %s", "refused")
            clock[0] += 1
        clock[0] += 5
        throttled.warning("database unavailable: %s", "back?")
        throttled.warning("database unavailable: %s", "no")
    assert [r.getMessage() for r in caplog.records] == [
        "database unavailable: refused",
        "database unavailable: back? (and 4 more times in the last 10 s)",
    ]


def test_a_throttled_count_is_said_as_its_incidents_not_the_next_ones(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """From the operations audit: the count left out at the end of an outage went onto
    the next outage's first line ("(and 17 more times in the last 64 s)", a minute
    later), under-counting one and over-counting the other."""
    from pulse import logs

    clock = [100.0]
    monkeypatch.setattr(logs, "monotonic", lambda: clock[0])
    throttled = logs.Throttled(logging.getLogger("pulse.test"), every_s=10)
    with caplog.at_level(logging.WARNING, logger="pulse.test"):
        for _ in range(4):  # an outage: at 100, 101, 102 and 103 s
            throttled.warning("database unavailable: %s", "refused")
            clock[0] += 1
        clock[0] += 60  # quiet, then the next outage at 164 s
        throttled.warning("database unavailable: %s", "shutting down")
        clock[0] += 1
        throttled.warning("database unavailable: %s", "shutting down")
    assert [r.getMessage() for r in caplog.records] == [
        "database unavailable: refused",
        "database unavailable: refused (3 more times in the 3 s after the line before, "
        "until 61 s ago)",
        "database unavailable: shutting down",
    ]


def test_a_throttled_error_traced_is_remembered_past_a_hundred_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The errors traced were forgotten all at once past 100 different ones, and each
    was then traced in full again: the one that lasts is kept, as the latest seen."""
    from pulse import logs

    clock = [100.0]
    monkeypatch.setattr(logs, "monotonic", lambda: clock[0])
    throttled = logs.Throttled(logging.getLogger("pulse.test"), every_s=10)
    lasting = PermissionError("permission denied for table telemetry")
    with caplog.at_level(logging.ERROR, logger="pulse.test"):
        for n in range(150):
            throttled.error("reading failed", exc=lasting)
            throttled.error("reading failed", exc=KeyError(n))
            clock[0] += 20
    traced = [r for r in caplog.records if r.exc_info and r.exc_info[1] is lasting]
    assert len(traced) == 1


def test_a_throttled_error_is_traced_once_then_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that lasts (a permission revoked) wrote its whole traceback at every
    try: each different error's traceback once, then a line per interval."""
    from pulse import logs

    clock = [100.0]
    monkeypatch.setattr(logs, "monotonic", lambda: clock[0])
    throttled = logs.Throttled(logging.getLogger("pulse.test"), every_s=10)

    def fail(error: Exception) -> None:
        try:
            raise error
        except Exception:
            throttled.error("reading %s failed", "t1")

    with caplog.at_level(logging.ERROR, logger="pulse.test"):
        for _ in range(12):
            fail(PermissionError("permission denied for table telemetry"))
            clock[0] += 1
        fail(KeyError("other"))
        fail(PermissionError("permission denied for table telemetry"))
        clock[0] += 10
        fail(KeyError("other"))
    said = [(r.getMessage(), bool(r.exc_info)) for r in caplog.records]
    assert said == [
        ("reading t1 failed", True),
        (
            "reading t1 failed: PermissionError: permission denied for table telemetry "
            "(again) (and 9 more times in the last 10 s)",
            False,
        ),
        ("reading t1 failed (and 1 more times in the last 2 s)", True),
        ("reading t1 failed: KeyError: 'other' (again) (and 1 more times in the last 10 s)", False),
    ]


def test_the_same_error_from_another_place_is_traced_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The review of 9082e97: the errors traced were told apart by class and text only,
    so a KeyError('x') from a second place in the code never showed where it came from."""
    from pulse import logs

    throttled = logs.Throttled(logging.getLogger("pulse.test"), every_s=10)

    def here() -> None:
        raise KeyError("x")

    def there() -> None:
        raise KeyError("x")

    with caplog.at_level(logging.ERROR, logger="pulse.test"):
        for place in (here, there, here):
            try:
                place()
            except KeyError:
                throttled.error("handling a request failed")
    traced = [r.exc_info[2] for r in caplog.records if r.exc_info]
    assert len(traced) == 2  # here's, there's; here's again within 10 s is counted
    assert [tb.tb_next.tb_frame.f_code.co_name for tb in traced if tb.tb_next] == ["here", "there"]


def test_the_pools_reconnect_failures_are_one_short_line_per_ten_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """During a database outage asyncpg's pool logged "Failed to restore the pool
    connection floor" with a 20-line traceback every 2 to 4 s."""
    clock = [1000.0]
    monkeypatch.setattr("pulse.logs.monotonic", lambda: clock[0])
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    pool = logging.getLogger("asyncpg.pool")
    for _ in range(5):  # at 0, 3, 6, 9 and 12 s
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except ConnectionRefusedError:
            pool.warning("Failed to restore the pool connection floor", exc_info=True)
        clock[0] += 3
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "Traceback" not in out.getvalue(), lines
    assert lines[0].endswith(
        "Failed to restore the pool connection floor: ConnectionRefusedError: "
        "[Errno 111] Connect call failed"
    )
    assert lines[1].endswith("(and 3 more times in the last 12 s)")


def test_the_pools_count_belongs_to_its_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the operator audit: as Throttled's did, the pool's filter gave an outage's
    count to the next outage's first line ("(and 2 more times in the last 64 s)", a
    minute after the first had ended). It is said as the last incident's now."""
    clock = [1000.0]
    monkeypatch.setattr("pulse.logs.monotonic", lambda: clock[0])
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    pool = logging.getLogger("asyncpg.pool")
    for at in (0, 3, 6, 64):  # an outage of 6 s, then another a minute later
        clock[0] = 1000.0 + at
        pool.warning("Failed to restore the pool connection floor")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[1].endswith(
        "Failed to restore the pool connection floor "
        "(the last incident: 2 more times in the 6 s after its line, until 58 s ago)"
    ), lines


def test_an_error_whose_text_changes_is_traced_once(caplog: pytest.LogCaptureFixture) -> None:
    """From the operator audit's notes: errors were told apart by their text too, so one
    that carries an id or a time (a new text each time) wrote its whole traceback at
    every try. Its class and the line that raised it tell it apart now; each line still
    says its own text."""
    from pulse import logs

    throttled = logs.Throttled(logging.getLogger("pulse.test"), every_s=0)

    def lookup(device: str) -> None:
        raise LookupError(f"no such device {device}")

    with caplog.at_level(logging.ERROR, logger="pulse.test"):
        for n in range(5):
            try:
                lookup(f"d{n}")
            except LookupError:
                throttled.error("handling a reading failed")
    traced = [r for r in caplog.records if r.exc_info]
    assert len(traced) == 1, [r.getMessage() for r in caplog.records]
    assert caplog.records[-1].getMessage() == (
        "handling a reading failed: LookupError: no such device d4 (again)"
    )
