"""The history API (issue #17): one device's telemetry over time, and one metric across
the fleet, as buckets, raw readings, or a streamed CSV / NDJSON export.

Tenant-isolated like every read: another tenant's device is an unknown device.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, RootModel
from quart import Blueprint, Response, request
from quart_schema import (
    document_querystring,
    document_response,
    security_scheme_blueprint,
    tag_blueprint,
)

from pulse.errors import (
    EXPORT_LIMIT,
    HISTORY_LIMIT,
    INVALID_PARAMETER,
    UNKNOWN_DEVICE,
    ApiError,
)
from pulse.history import reads
from pulse.history.params import (
    MAX_ANSWER_SERIES,
    RAW,
    HistoryQuery,
    parse_history,
    too_many_series,
)
from pulse.history.rollups import RollupSettings
from pulse.names import shown_name
from pulse.times import EARLIEST, format_time, window_start
from pulse.web import openapi, runtime
from pulse.web.auth import authorize, tenant

blueprint = Blueprint("history", __name__, url_prefix="/api/v1/customer")
blueprint.before_request(authorize)
tag_blueprint(blueprint, ["history"])
security_scheme_blueprint(blueprint, openapi.JWT)

JSON, CSV, NDJSON = "application/json", "text/csv", "application/x-ndjson"
CHUNK = 64 * 1024  # a JSON answer is sent this much at a time
AggregateName = Literal["avg", "min", "max", "last", "count"]


# -- documentation models -------------------------------------------------------


class HistoryParams(BaseModel):
    tenant_id: str | None = Field(default=None, description="Required for operators.")
    from_: str | None = Field(
        default=None, alias="from", description="ISO 8601 (UTC if no offset); default: an hour ago."
    )
    to: str | None = Field(
        default=None,
        description="ISO 8601 (UTC if no offset); default: every reading so far (10 minutes "
        "ahead: a device's clock may be 5 ahead).",
    )
    bucket: Literal["auto", "raw", "1m", "5m", "15m", "1h", "1d"] = Field(
        default="auto",
        description="auto: raw points when the device has at most 1000 readings in the "
        "range, of at most 100,000 points, and retention keeps them all, else the narrowest "
        "width that keeps a series within about 1000 points and the answer within 100,000.",
    )
    agg: str | None = Field(
        default=None, description="Comma-separated avg,min,max,last,count; default all."
    )


class DeviceParams(HistoryParams):
    metrics: str | None = Field(
        default=None,
        description="Comma-separated, at most 100; default every one (an answer of more "
        "than 100 series is refused: name them).",
    )
    limit: int = Field(
        default=1000,
        ge=1,
        le=10_000,
        description="bucket=raw: a page's most readings; a page also ends past 1 MiB.",
    )
    cursor: str | None = Field(default=None, description="bucket=raw: next of the last page.")


class FleetParams(HistoryParams):
    metric: str = Field(description="The one metric of every series.")
    device_id: str | None = Field(default=None, description="Comma-separated; default all.")


class Point(BaseModel):
    t: str = Field(description="The bucket's start (a raw point: the reading's time).")
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    last: float | None = None
    count: int | None = None


class DeviceSeries(BaseModel):
    device_id: str
    bucket: str = Field(description="The bucket used: auto says which it picked.")
    from_: str = Field(alias="from")
    to: str
    series: dict[str, list[Point]] = Field(description="Per metric; empty buckets are absent.")
    last_event_id: int = Field(
        description="The tenant's newest event id the series includes: resume a live "
        "stream from it for no gap and no duplicate."
    )


class Reading(BaseModel):
    id: int
    time: str
    metrics: dict[str, float | bool]


class ReadingPage(BaseModel):
    device_id: str
    readings: list[Reading]
    next: str | None = Field(description="Pass as cursor for the next page; null: last.")


class DeviceHistory(RootModel[DeviceSeries | ReadingPage]):
    """Buckets (bucket=auto or a width), or a page of readings (bucket=raw)."""


class FleetSeries(BaseModel):
    metric: str
    bucket: str
    from_: str = Field(alias="from")
    to: str
    series: dict[str, list[Point]] = Field(description="Per device.")
    last_event_id: int


EXPORT = (
    "With `Accept: text/csv` or `application/x-ndjson`: an export of the whole range, "
    "streamed (raw readings for bucket=raw or auto, else the buckets)."
)


# -- routes -----------------------------------------------------------------------


@blueprint.get("/devices/<device_id>/telemetry")
@document_querystring(DeviceParams)
@document_response(DeviceHistory)
@openapi.answers(
    200, EXPORT, CSV, "id,time,metric,value\r\n7,2026-12-01T10:00:00.000Z,temp,21.5\r\n"
)
@openapi.answers(
    200, "", NDJSON, '{"id":7,"time":"2026-12-01T10:00:00.000Z","metrics":{"temp":21.5}}\n'
)
@openapi.errors(
    *openapi.TENANT_READ, INVALID_PARAMETER, UNKNOWN_DEVICE, EXPORT_LIMIT, HISTORY_LIMIT
)
async def device_history(device_id: str) -> Response:
    """One device's telemetry over a time range: buckets, raw readings, or an export."""
    query = parse_history(request.args, now=datetime.now(UTC))
    db, tenant_id = runtime().db, tenant()
    if not await reads.device_exists(db, tenant_id, device_id):
        raise ApiError(
            UNKNOWN_DEVICE, f"There is no device {shown_name(device_id)} in this tenant."
        )
    kind, kept = _media_type(), _kept_since()
    if query.bucket == "auto" and not query.raw_kept(kept):
        # Older than retention: raw readings would be a part of the range's; the
        # rollups hold all of it.
        series = len(query.metrics or ()) or 1
        query = dataclasses.replace(query, bucket=query.width_for_span(kept, series=series))
    if kind != JSON:
        if query.bucket in ("raw", "auto"):
            return _stream(
                kind,
                tenant_id,
                _reading_lines(kind, reads.export_readings(db, tenant_id, device_id, query)),
            )
        batches = reads.export_series(db, tenant_id, [device_id], query, query.bucket)
        return _stream(kind, tenant_id, _series_lines(kind, batches, query))
    if query.bucket == "raw":
        return await _answer(tenant_id, _page(tenant_id, device_id, query))
    if query.bucket != "auto":
        query.check_size(query.bucket, len(query.metrics or ()) or 1)
    return await _answer(tenant_id, _device_series(tenant_id, device_id, query, kept))


async def _page(tenant_id: str, device_id: str, query: HistoryQuery) -> bytes:
    rows, following = await reads.readings_page(runtime().db, tenant_id, device_id, query)
    readings = b",".join(_reading_json(row) for row in rows)
    head = orjson.dumps({"device_id": device_id})[:-1]
    return head + b',"readings":[' + readings + b'],"next":' + orjson.dumps(following) + b"}"


async def _device_series(
    tenant_id: str, device_id: str, query: HistoryQuery, kept: dict[int, datetime]
) -> bytes:
    db = runtime().db
    found = await reads.series_json(
        db, tenant_id, [device_id], query, kept, key="metric", max_series=MAX_ANSWER_SERIES
    )
    if found.series > MAX_ANSWER_SERIES:
        raise too_many_series()
    return _series_answer({"device_id": device_id}, found, query)


@blueprint.get("/telemetry/history")
@document_querystring(FleetParams)
@document_response(FleetSeries)
@openapi.answers(
    200, EXPORT, CSV, "device_id,metric,t,avg\r\nd1,temp,2026-12-01T10:00:00.000Z,21.5\r\n"
)
@openapi.answers(
    200,
    "",
    NDJSON,
    '{"device_id":"d1","metric":"temp","t":"2026-12-01T10:00:00.000Z","avg":21.5}\n',
)
@openapi.errors(*openapi.TENANT_READ, INVALID_PARAMETER, EXPORT_LIMIT, HISTORY_LIMIT)
async def fleet_history() -> Response:
    """One metric across the tenant's devices, one series per device."""
    query = parse_history(request.args, now=datetime.now(UTC), fleet=True)
    db, tenant_id = runtime().db, tenant()
    devices = list(query.devices) if query.devices else await reads.tenant_devices(db, tenant_id)
    if query.bucket == "auto":  # by the range, the series and what is kept: never raw
        query = dataclasses.replace(
            query, bucket=query.width_for_span(_kept_since(), series=len(devices))
        )
    kind = _media_type()
    if kind != JSON:
        batches = reads.export_series(db, tenant_id, devices, query, query.bucket)
        return _stream(kind, tenant_id, _series_lines(kind, batches, query))
    query.check_size(query.bucket, len(devices))
    return await _answer(tenant_id, _fleet_series(tenant_id, devices, query))


async def _fleet_series(tenant_id: str, devices: list[str], query: HistoryQuery) -> bytes:
    found = await reads.series_json(
        runtime().db, tenant_id, devices, query, key="device_id", max_series=len(devices)
    )
    assert query.metrics is not None
    return _series_answer({"metric": query.metrics[0]}, found, query)


# -- encoding -----------------------------------------------------------------------


def _media_type() -> str:
    best = request.accept_mimetypes.best_match([JSON, CSV, NDJSON])
    return best or JSON


def _kept_since() -> dict[int, datetime]:
    """Per stored width, the oldest time the rollups are kept from, and the raw
    readings' (RAW: a time of receipt), by retention (bucket=auto)."""
    settings, now = runtime().settings, datetime.now(UTC)
    kept = RollupSettings.of(settings).kept_since(now)
    kept[RAW] = window_start(now, hours=settings.retention_hours) or EARLIEST
    return kept


def _range(query: HistoryQuery) -> dict[str, str]:
    return {"from": format_time(query.start), "to": format_time(query.end)}


def _series_answer(head: dict[str, str], found: reads.SeriesJson, query: HistoryQuery) -> bytes:
    """The answer around the series PostgreSQL built: only its head is encoded here."""
    start = orjson.dumps({**head, "bucket": found.bucket, **_range(query)})[:-1]
    series = found.json.encode()
    return b'%s,"series":{%s},"last_event_id":%d}' % (start, series, found.newest_id)


async def _answer(tenant_id: str, build: Coroutine[Any, Any, bytes]) -> Response:
    """A JSON answer, read and built holding one of the process's history read slots
    (or refused with history_limit), which it keeps until the body is sent: a client
    that does not read cannot make the process hold answers without bound."""
    try:
        slot = runtime().history_reads.take(tenant_id)
    except ApiError:
        build.close()  # never awaited
        raise
    try:
        body = await build
    except BaseException:
        slot.release()
        raise
    response = Response(slot.hold(_chunks(body)), content_type=JSON)
    response.headers["Content-Length"] = str(len(body))
    return response


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(body), CHUNK):
        yield bytes(view[start : start + CHUNK])


def _reading_json(row: Any) -> bytes:
    return b'{"id":%d,"time":"%s","metrics":%s}' % (
        row["id"],
        row["time"].encode(),
        row["metrics_json"].encode(),
    )


def _stream(kind: str, tenant_id: str, lines: AsyncIterator[bytes]) -> Response:
    """An export's response: it holds one of the process's export slots (or is refused
    with export_limit) and is cut after PULSE_EXPORT_MAX_S, so that slow clients cannot
    hold the pool's connections, or a snapshot, without end."""
    rt = runtime()
    body = rt.exports.stream(tenant_id, lines)
    content_type = kind if kind == NDJSON else "text/csv; charset=utf-8"
    response = Response(body, content_type=content_type)
    response.timeout = rt.settings.export_max_s
    return response


async def _reading_lines(kind: str, batches: AsyncIterator[list[Any]]) -> AsyncIterator[bytes]:
    if kind == CSV:
        yield b"id,time,metric,value\r\n"
    async for batch in batches:
        if kind == NDJSON:
            yield b"".join(_reading_json(row) + b"\n" for row in batch)
            continue
        out = io.StringIO()
        writer = csv.writer(out)
        for row in batch:
            for metric, value in orjson.loads(row["metrics_json"]).items():
                writer.writerow((row["id"], row["time"], metric, _csv_value(value)))
        yield out.getvalue().encode()


async def _series_lines(
    kind: str, batches: AsyncIterator[list[Any]], query: HistoryQuery
) -> AsyncIterator[bytes]:
    if kind == CSV:
        yield ",".join(("device_id", "metric", "t", *query.aggregates)).encode() + b"\r\n"
    async for batch in batches:
        if kind == NDJSON:
            yield b"".join(
                orjson.dumps(
                    {"device_id": row[0], "metric": row[1], **reads.point(row, query.aggregates)}
                )
                + b"\n"
                for row in batch
            )
            continue
        out = io.StringIO()
        writer = csv.writer(out)
        for row in batch:
            writer.writerow((row[0], row[1], *reads.point(row, query.aggregates).values()))
        yield out.getvalue().encode()


def _csv_value(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value
