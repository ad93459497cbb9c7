"""What the fleet tests share: a notification listener, a writer with the rules hook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from pulse.fleet.rules import evaluate_alerts
from pulse.ingest.model import Submission
from pulse.ingest.validation import Reading
from pulse.ingest.writer import TelemetryWriter
from tests.support import provision_device, seam

MakeToken = Callable[..., str]
SENTINEL = {"kind": "sentinel"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Notifications:
    """Every notification on some tenants' channels, in the order they were sent."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._channels: list[str] = []
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def listen(self, *tenants: str) -> None:
        for tenant in tenants:
            channel = await self._conn.fetchval("SELECT pulse_channel($1)", tenant)
            await self._conn.add_listener(channel, self._received)
            self._channels.append(channel)

    def _received(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._queue.put_nowait(orjson.loads(payload))

    async def since_last(self) -> list[dict[str, Any]]:
        """Everything notified since the last call. Notifications of committed
        transactions arrive in commit order, so a sentinel sent now comes after
        all of them: no waiting for something that may not come."""
        await self._conn.execute(
            "SELECT pg_notify($1, $2)", self._channels[0], orjson.dumps(SENTINEL).decode()
        )
        received: list[dict[str, Any]] = []
        while (message := await asyncio.wait_for(self._queue.get(), 5)) != SENTINEL:
            received.append(message)
        return received


@pytest.fixture
async def notifications(database_url: str) -> AsyncIterator[Notifications]:
    conn = await asyncpg.connect(database_url)
    listener = Notifications(conn)
    await listener.listen("t1", "*")
    yield listener
    await conn.close()


def kinds(messages: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["kind"], m["tenant"]) for m in messages if m["kind"] != "telemetry"]


class Fleet:
    """Devices of tenant t1 (and others), written to through the real ingest writer."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.writer = TelemetryWriter(seam(pool), rules=evaluate_alerts)
        self.tokens: dict[tuple[str, str], str] = {}

    async def device(self, device_id: str, tenant_id: str = "t1") -> None:
        self.tokens[(tenant_id, device_id)] = await provision_device(
            self.pool, tenant_id, device_id
        )

    def submission(
        self, device_id: str, metrics: dict[str, Any] | None, tenant_id: str = "t1"
    ) -> Submission:
        reading = None if metrics is None else Reading(datetime.now(UTC), metrics, None)
        return Submission(tenant_id, device_id, self.tokens[(tenant_id, device_id)], reading)

    async def send(self, device_id: str, *readings: dict[str, Any], tenant_id: str = "t1") -> None:
        """All the readings in one write (one transaction)."""
        await self.writer.write([self.submission(device_id, m, tenant_id) for m in readings])

    async def heartbeat(self, device_id: str, tenant_id: str = "t1") -> None:
        await self.writer.write([self.submission(device_id, None, tenant_id)])

    async def rule(
        self,
        metric: str,
        operator: str,
        threshold: float,
        *,
        device_id: str | None = None,
        tenant_id: str = "t1",
        severity: int = 3,
        name: str = "rule",
    ) -> int:
        rule_id = await self.pool.fetchval(
            """INSERT INTO alert_rules (tenant_id, name, metric, operator, threshold, severity,
                                        device_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING rule_id""",
            tenant_id,
            name,
            metric,
            operator,
            threshold,
            severity,
            device_id,
        )
        return int(rule_id)

    async def alerts(self, **where: Any) -> list[asyncpg.Record]:
        conditions = " AND ".join(f"{column} = ${i}" for i, column in enumerate(where, start=1))
        return list(
            await self.pool.fetch(
                "SELECT * FROM alerts"
                + (f" WHERE {conditions}" if conditions else "")
                + " ORDER BY alert_id",
                *where.values(),
            )
        )


@pytest.fixture
async def fleet(pool: asyncpg.Pool) -> Fleet:
    fleet = Fleet(pool)
    await fleet.device("dev-1")
    return fleet
