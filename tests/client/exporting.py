"""Waiting for a held export to be cut, as the tests of cut exports do."""

from __future__ import annotations

import asyncio

import httpx

EXPORT = "/api/v1/customer/devices/d1/telemetry"


async def until_cut(url: str, token: str) -> None:
    """Until the tenant's one export slot is free again: the held export was cut."""
    params = {"from": "2026-12-01T10:00:00Z", "to": "2026-12-01T10:00:00.001Z"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http, asyncio.timeout(30):
        while True:
            answer = await http.get(
                EXPORT,
                params=params,
                headers={"Accept": "text/csv", "Authorization": f"Bearer {token}"},
            )
            if answer.status_code == 200:
                return
            assert answer.status_code == 429, answer.text
            await asyncio.sleep(0.05)
