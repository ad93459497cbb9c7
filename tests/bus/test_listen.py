"""The LISTEN source's retries while the database is away."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from pulse.bus.listen import ListenSource
from pulse.db.database import Database
from tests.support import free_port, until


class Wakeups:
    def __init__(self) -> None:
        self.resyncs = 0

    def events_after(self, tenant_id: str, last_id: int | None) -> None:
        pass

    def signal(self, tenant_id: str, kind: str) -> None:
        pass

    def resync(self) -> None:
        self.resyncs += 1


async def test_retries_while_the_database_is_away_say_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the operations audit: every retry was logged (31 of the 64 lines of a 60 s
    outage). One line per 10 s now, as for every other kind."""
    away = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # nothing listens there
    attempts = 0
    connect = Database.dedicated

    def counted(self: Database, *args: object, **kwargs: object) -> object:
        nonlocal attempts
        attempts += 1
        return connect(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Database, "dedicated", counted)
    source = ListenSource(Database(None, away), backoff_max_s=0.05)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="pulse.bus.listen"):
        task = asyncio.create_task(source.run(Wakeups()))  # type: ignore[arg-type]
        try:
            await until(lambda: attempts >= 10)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    lines = [r.getMessage() for r in caplog.records if r.name == "pulse.bus.listen"]
    assert len(lines) == 1 and "database unavailable" in lines[0], lines
