"""An export from a server that stops answering is cut, not waited on for ever.

From the client review of 8 December (finding 2): ``pulse export`` and
``PulseClient.export`` read with no read timeout at all. Against a server that took the
connection and never answered, or one frozen mid-export (a machine or a network gone
without a FIN or a RST, played here by SIGSTOP), they waited for ever, saying nothing,
and ``--resume`` never started. Now silence for ``read_timeout_s`` is a cut: resumed
when asked, raised as ``ExportCut`` otherwise, and before any answer, httpx's
ReadTimeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from pulse.client import ExportCut, PulseClient
from tests.client.exporting import EXPORT
from tests.client.restartable import restartable_server
from tests.client.test_export_resume import readings_sharing_milliseconds

pytestmark = pytest.mark.timeout(120)

READINGS = 100_000  # about 18 MB of CSV: more than the sockets' buffers hold


@contextlib.asynccontextmanager
async def silent_after(head: bytes | None) -> AsyncIterator[str]:
    """A server on a loopback port that reads each request, writes ``head`` (None:
    nothing at all), then says nothing more, the connection open, until the block ends."""
    done = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if head is not None:
                writer.write(head)
                await writer.drain()
            await done.wait()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield f"http://127.0.0.1:{port}"
    finally:
        done.set()


CSV_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/csv; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
    b"16\r\nid,time,metric,value\r\n\r\n"
)


async def test_no_answer_at_all_is_a_read_timeout_and_one_line() -> None:
    async with silent_after(None) as url:
        async with PulseClient(url, "any-token") as client:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                async with asyncio.timeout(20):  # before: for ever
                    async for _ in client.export("d1", read_timeout_s=0.5):
                        pass
            assert time.monotonic() - started < 5
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pulse", "export", "--url", url, "--token", "x",
            "--device", "d1", "--read-timeout", "1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
    assert (proc.returncode, out) == (1, b""), err
    assert err.decode() == f"pulse export: no answer from {url} in 1 s (--read-timeout)\n"


async def test_silence_mid_export_is_a_cut_that_says_so() -> None:
    async with silent_after(CSV_HEAD) as url, PulseClient(url, "any-token") as client:
        received = b""
        with pytest.raises(ExportCut) as cut:
            async with asyncio.timeout(20):  # before: for ever
                async for chunk in client.export("d1", read_timeout_s=0.5):
                    received += chunk
    assert received == b"id,time,metric,value\r\n"
    assert (cut.value.status, cut.value.received, cut.value.silent_s) == (200, len(received), 0.5)
    assert "nothing came from the server for 0.5 s" in str(cut.value)


async def test_an_export_from_a_frozen_server_goes_on_once_it_is_back(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    """A real server frozen mid-export: the client takes its silence for a cut and asks
    for the rest; the server, back (as a network that heals), answers it, and the bytes
    are the export read whole, every line once."""
    # Within the server's retention, whatever the day: an older range's export is
    # another (`auto` exports its buckets).
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    await readings_sharing_milliseconds(pool, READINGS, start)
    window = {"start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat()}
    token = make_token("t1")
    cuts: list[ExportCut] = []
    out = bytearray()
    # Two exports at once for the tenant: the frozen one holds its slot until the
    # server, back, finds its client gone.
    env = {"PULSE_MAX_EXPORTS_PER_TENANT": "2"}
    async with restartable_server(database_url, tmp_path, env) as server:
        assert server.process is not None
        pid = server.process.proc.pid

        def resuming(cut: ExportCut, delay_s: float) -> None:
            cuts.append(cut)
            os.kill(pid, signal.SIGCONT)

        try:
            async with PulseClient(server.url, token, backoff_base_s=0.05) as client:
                chunks = aiter(
                    client.export(
                        "d1", format="csv", **window, resume=5, on_resume=resuming,
                        read_timeout_s=1.0,
                    )
                )  # fmt: skip
                out += await anext(chunks)
                os.kill(pid, signal.SIGSTOP)
                async with asyncio.timeout(60):  # before: for ever
                    async for chunk in chunks:
                        out += chunk
        finally:
            os.kill(pid, signal.SIGCONT)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            answer = await http.get(
                EXPORT,
                params={"from": window["start"], "to": window["end"], "bucket": "raw"},
                headers={"Accept": "text/csv", "Authorization": f"Bearer {token}"},
            )
        assert answer.status_code == 200, answer.text
        whole = answer.content
    assert cuts, "the export was never cut"
    assert len(whole) > 5_000_000
    assert cuts[0].silent_s == 1.0 and 0 < cuts[0].received < len(whole)
    assert bytes(out) == whole
