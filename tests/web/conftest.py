from collections.abc import Iterator

import pytest
from quart import Quart, request_started

from tests.ingest.conftest import token

__all__ = ["token"]  # a fixture: device dev-1 of tenant t1, for the ingest routes


@pytest.fixture
def quart_requests() -> Iterator[list[str]]:
    """The paths of the requests Quart itself handled while the test ran (the fast
    paths answer the others before it)."""
    seen: list[str] = []

    async def started(sender: Quart, **_: object) -> None:
        from quart import request

        seen.append(request.path)

    request_started.connect(started)
    try:
        yield seen
    finally:
        request_started.disconnect(started)
