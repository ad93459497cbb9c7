"""/openapi.json against the server's real answers, route by route.

A real server on loopback, its database behind a proxy the test can cut (for the
503s), a short body timeout (for the 408s) and small limits (for the 429s). For
every operation in the document a few calls are made; each answer must be one the
operation documents (its status, media type, body schema and headers), and every
status an operation documents must be reached by one of its calls or explained in
EXPLAINED. An operation the table below does not call fails the test too, so a new
route cannot go undocumented or unchecked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import jsonschema_rs
import pytest
from quart import Quart

from pulse.config import Settings
from tests.history.readings import many_readings
from tests.support import provision_device, running_server
from tests.web.db_proxy import DatabaseProxy, database_proxy

pytestmark = pytest.mark.timeout(120)

DEVICES = "/api/v1/customer/devices"
DEVICE = DEVICES + "/{device_id}"
ROTATE = DEVICE + "/rotate-token"
SUMMARY = "/api/v1/customer/fleet/summary"
ALERTS = "/api/v1/customer/alerts"
ACK = ALERTS + "/{alert_id}/acknowledge"
CLOSE = ALERTS + "/{alert_id}/close"
RULES = "/api/v1/customer/alert-rules"
RULE = RULES + "/{rule_id}"
SSE = "/api/v1/customer/telemetry/stream/sse"
HISTORY = DEVICE + "/telemetry"
FLEET_HISTORY = "/api/v1/customer/telemetry/history"
TICKET = "/api/v1/stream-ticket"
TELEMETRY = "/ingest/v1/tenant/{tenant_id}/device/{device_id}/telemetry"
HEARTBEAT = "/ingest/v1/tenant/{tenant_id}/device/{device_id}/heartbeat"
BATCH = "/ingest/v1/batch"
HEALTHZ, READYZ, STATUS, METRICS = (
    "/healthz",
    "/readyz",
    "/api/v1/telemetry/stream/status",
    "/metrics",
)

# Documented statuses that no call below reaches, with the reason, by operation
# (method, path). Empty today: every documented status is reached.
EXPLAINED: dict[tuple[str, str], dict[int, str]] = {}

RATE_BURST = 50
TOO_LARGE = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
RULE_BODY = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 30, "severity": 4}


@dataclasses.dataclass
class Call:
    method: str
    template: str
    expect: int
    path: str | None = None  # default: the template with the ids of Ids filled in
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    stall: bool = False  # send the head and half the body, then wait (a 408)
    stream: bool = False  # read only the start of the answer (SSE)


@dataclasses.dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes


class Tokens:
    def __init__(self, make: Callable[..., str]) -> None:
        self.admin = make("t1", roles=("tenant-admin",))
        self.customer = make("t1", roles=("customer",))
        self.operator = make(None, roles=("operator-admin",))
        self.roleless = make("t1", roles=())
        self.elsewhere = make("t-cut", roles=("customer",))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def foreign_page(token: str) -> dict[str, str]:
    """A change with the session cookie from another site's page: origin_not_allowed."""
    return {"Cookie": f"pulse_session={token}", "Origin": "https://elsewhere.example"}


def jwt_calls(
    method: str,
    template: str,
    tokens: Tokens,
    *,
    write: bool,
    cross_tenant: bool = False,
    body: Any = None,
) -> list[Call]:
    """The answers every JWT route shares: no token, a token that may not, no tenant."""
    calls = [Call(method, template, 401, json=body)]
    if write:  # a reader may not write; nor a page of another site with the cookie
        calls.append(Call(method, template, 403, headers=bearer(tokens.customer), json=body))
        calls.append(Call(method, template, 403, headers=foreign_page(tokens.admin), json=body))
    else:  # nobody reads another tenant's data
        calls.append(
            Call(method, template, 403, headers=bearer(tokens.customer), params={"tenant_id": "t2"})
        )
    if cross_tenant:  # operators may read every tenant, but not name a malformed one
        params = {"tenant_id": "not a tenant!"}
        calls.append(Call(method, template, 400, headers=bearer(tokens.operator), params=params))
    else:  # operators must name the tenant
        calls.append(Call(method, template, 400, headers=bearer(tokens.operator), json=body))
    return calls


def live_calls(tokens: Tokens, device_tokens: dict[str, str], ids: dict[str, str]) -> list[Call]:
    admin = bearer(tokens.admin)
    dev1 = {"X-Provision-Token": device_tokens["dev-1"]}
    rate = {"X-Provision-Token": device_tokens["dev-rate"]}

    def message(device: str, **fields: Any) -> dict[str, Any]:
        token = device_tokens[device]
        return {"tenant_id": "t1", "device_id": device, "provision_token": token, **fields}

    return [
        # -- devices --
        Call("POST", DEVICES, 201, headers=admin, json={"device_id": "dev-new", "name": "n"}),
        Call("POST", DEVICES, 409, headers=admin, json={"device_id": "dev-new"}),
        Call("POST", DEVICES, 400, headers=admin, json={"device_id": "d", "colour": "red"}),
        Call("POST", DEVICES, 413, headers=admin, content=TOO_LARGE),
        Call("POST", DEVICES, 408, headers=admin, stall=True),
        *jwt_calls("POST", DEVICES, tokens, write=True, body={"device_id": "d"}),
        Call("GET", DEVICES, 200, headers=bearer(tokens.customer)),
        *jwt_calls("GET", DEVICES, tokens, write=False),
        Call("GET", DEVICE, 200, headers=bearer(tokens.customer)),
        Call("GET", DEVICE, 404, headers=admin, path=DEVICES + "/ghost"),
        *jwt_calls("GET", DEVICE, tokens, write=False),
        Call("POST", ROTATE, 200, headers=admin, path=DEVICES + "/dev-new/rotate-token"),
        Call("POST", ROTATE, 404, headers=admin, path=DEVICES + "/ghost/rotate-token"),
        *jwt_calls("POST", ROTATE, tokens, write=True),
        Call("DELETE", DEVICE, 204, headers=admin, path=DEVICES + "/dev-new"),
        Call("DELETE", DEVICE, 404, headers=admin, path=DEVICES + "/dev-new"),
        *jwt_calls("DELETE", DEVICE, tokens, write=True),
        # -- fleet and alerts --
        Call("GET", SUMMARY, 200, headers=bearer(tokens.customer)),
        *jwt_calls("GET", SUMMARY, tokens, write=False, cross_tenant=True),
        Call("GET", ALERTS, 200, headers=bearer(tokens.customer), params={"status": "active"}),
        Call("GET", ALERTS, 400, headers=admin, params={"status": "sleeping"}),
        *jwt_calls("GET", ALERTS, tokens, write=False, cross_tenant=True),
        Call("POST", ACK, 200, headers=admin),
        Call("POST", ACK, 404, headers=admin, path=ALERTS + "/999999/acknowledge"),
        Call("POST", ACK, 409, headers=admin, path=f"{ALERTS}/{ids['closed_alert']}/acknowledge"),
        *jwt_calls("POST", ACK, tokens, write=True),
        Call("POST", CLOSE, 200, headers=admin),
        Call("POST", CLOSE, 404, headers=admin, path=ALERTS + "/999999/close"),
        *jwt_calls("POST", CLOSE, tokens, write=True),
        # -- alert rules --
        Call("POST", RULES, 404, headers=admin, json={**RULE_BODY, "device_id": "ghost"}),
        Call("POST", RULES, 201, headers=admin, json=RULE_BODY),
        Call("POST", RULES, 409, headers=admin, json=RULE_BODY),  # its quota of 2 reached
        Call("POST", RULES, 400, headers=admin, json={**RULE_BODY, "severity": 9}),
        Call("POST", RULES, 413, headers=admin, content=TOO_LARGE),
        Call("POST", RULES, 408, headers=admin, stall=True),
        *jwt_calls("POST", RULES, tokens, write=True, body=RULE_BODY),
        Call("GET", RULES, 200, headers=bearer(tokens.customer)),
        *jwt_calls("GET", RULES, tokens, write=False),
        Call("DELETE", RULE, 204, headers=admin),
        Call("DELETE", RULE, 404, headers=admin),  # the same rule, now gone
        *jwt_calls("DELETE", RULE, tokens, write=True),
        # -- history --
        Call("GET", HISTORY, 200, headers=bearer(tokens.customer)),
        Call("GET", HISTORY, 200, headers=bearer(tokens.customer), params={"bucket": "raw"}),
        Call("GET", HISTORY, 200, headers={**bearer(tokens.customer), "Accept": "text/csv"}),
        Call(
            "GET",
            HISTORY,
            200,
            headers={**bearer(tokens.customer), "Accept": "application/x-ndjson"},
        ),
        Call("GET", HISTORY, 400, headers=bearer(tokens.customer), params={"bucket": "2m"}),
        Call("GET", HISTORY, 404, headers=admin, path=DEVICES + "/ghost/telemetry"),
        *jwt_calls("GET", HISTORY, tokens, write=False),
        Call("GET", FLEET_HISTORY, 200, headers=bearer(tokens.customer), params={"metric": "t"}),
        Call("GET", FLEET_HISTORY, 400, headers=bearer(tokens.customer)),
        *jwt_calls("GET", FLEET_HISTORY, tokens, write=False),
        # -- streams --
        Call("GET", SSE, 200, headers=bearer(tokens.customer), stream=True),
        Call("GET", SSE, 400, headers=bearer(tokens.customer), params={"last_event_id": "x"}),
        Call("GET", SSE, 401, params={"ticket": "not-a-ticket"}),
        *jwt_calls("GET", SSE, tokens, write=False),
        Call("POST", TICKET, 200, headers=bearer(tokens.customer)),
        Call("POST", TICKET, 401),
        Call("POST", TICKET, 403, headers=bearer(tokens.roleless)),
        Call("POST", TICKET, 403, headers=foreign_page(tokens.customer)),
        # -- ingest --
        Call("POST", TELEMETRY, 201, headers=dev1, json={"metrics": {"temp": 20}}),
        Call("POST", TELEMETRY, 400, headers=dev1, json={"metrics": {"temp": "warm"}}),
        Call("POST", TELEMETRY, 401, json={"metrics": {"temp": 20}}),
        Call(
            "POST",
            TELEMETRY,
            404,
            headers=dev1,
            path=_device_url(TELEMETRY, "ghost"),
            json={"metrics": {"temp": 20}},
        ),
        Call("POST", TELEMETRY, 408, headers=dev1, stall=True),
        Call("POST", TELEMETRY, 413, headers=dev1, content=TOO_LARGE),
        Call(
            "POST",
            BATCH,
            200,
            json={"messages": [message("dev-rate", metrics={"v": 1})] * RATE_BURST},
        ),
        Call(
            "POST",
            TELEMETRY,
            429,
            headers=rate,
            path=_device_url(TELEMETRY, "dev-rate"),
            json={"metrics": {"temp": 20}},
        ),
        Call("POST", HEARTBEAT, 204, headers=dev1),
        Call("POST", HEARTBEAT, 400, headers=dev1, path=_device_url(HEARTBEAT, "bad id!")),
        Call("POST", HEARTBEAT, 401),
        Call("POST", HEARTBEAT, 404, headers=dev1, path=_device_url(HEARTBEAT, "ghost")),
        Call("POST", HEARTBEAT, 408, headers=dev1, stall=True),
        Call("POST", HEARTBEAT, 413, headers=dev1, content=TOO_LARGE),
        Call("POST", HEARTBEAT, 429, headers=rate, path=_device_url(HEARTBEAT, "dev-rate")),
        Call("POST", BATCH, 200, json={"messages": [message("dev-1", metrics={"temp": 1})]}),
        # Two shapes of 400: every message rejected, or the envelope itself wrong.
        Call("POST", BATCH, 400, json={"messages": [message("dev-1", metrics={})]}),
        Call("POST", BATCH, 400, json={"messages": []}),
        Call("POST", BATCH, 408, stall=True),
        Call("POST", BATCH, 413, content=TOO_LARGE),
        # -- operations --
        Call("GET", HEALTHZ, 200),
        Call("GET", READYZ, 200),
        Call("GET", STATUS, 200),
        Call("GET", METRICS, 200),
    ]


def cut_calls(tokens: Tokens, device_tokens: dict[str, str]) -> list[Call]:
    """With the database unreachable: a 503 wherever the database is needed."""
    admin = bearer(tokens.admin)
    batch = {
        "messages": [
            {
                "tenant_id": "t1",
                "device_id": "dev-1",
                "provision_token": device_tokens["dev-1"],
                "metrics": {"temp": 1},
            }
        ]
    }
    return [
        Call("POST", DEVICES, 503, headers=admin, json={"device_id": "dev-late"}),
        Call("GET", DEVICES, 503, headers=admin),
        Call("GET", DEVICE, 503, headers=admin),
        Call("DELETE", DEVICE, 503, headers=admin),
        Call("POST", ROTATE, 503, headers=admin),
        Call("GET", SUMMARY, 503, headers=admin),
        Call("GET", ALERTS, 503, headers=admin),
        Call("POST", ACK, 503, headers=admin),
        Call("POST", CLOSE, 503, headers=admin),
        Call("POST", RULES, 503, headers=admin, json=RULE_BODY),
        Call("GET", RULES, 503, headers=admin),
        Call("DELETE", RULE, 503, headers=admin),
        Call("GET", HISTORY, 503, headers=admin),
        Call("GET", FLEET_HISTORY, 503, headers=admin, params={"metric": "temp"}),
        # Another tenant: t1's earlier stream may still hold its only slot.
        Call("GET", SSE, 503, headers=bearer(tokens.elsewhere)),
        Call("POST", TICKET, 503, headers=admin),
        Call(
            "POST",
            TELEMETRY,
            503,
            headers={"X-Provision-Token": device_tokens["dev-1"]},
            json={"metrics": {"temp": 20}},
        ),
        Call("POST", HEARTBEAT, 503, headers={"X-Provision-Token": device_tokens["dev-1"]}),
        Call("POST", BATCH, 503, json=batch),
        Call("GET", READYZ, 503),
    ]


def _device_url(template: str, device: str) -> str:
    return template.format(tenant_id="t1", device_id=device)


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[DatabaseProxy]:
    async with database_proxy(database_url) as proxy:
        yield proxy


async def test_every_route_answers_as_documented(
    settings: Settings,
    proxy: DatabaseProxy,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A body that stops coming is answered after 1 s instead of 60.
    monkeypatch.setattr(Quart, "default_config", {**Quart.default_config, "BODY_TIMEOUT": 1})
    served = dataclasses.replace(
        settings,
        database_url=proxy.dsn,
        # Every device may send 50 readings, and no more for the rest of the test:
        # a batch of 50 uses up dev-rate's, then it is answered 429.
        ingest_rate_per_device=0.001,
        ingest_burst_per_device=RATE_BURST,
        max_connections_per_tenant=1,
        max_rules_per_tenant=2,  # the rule of the setup, and one made here
        listener_backoff_max_s=0.2,
        # A principal's tickets: a burst of 3, then next to none while the test runs.
        ticket_rate_per_s=0.001,
        ticket_burst=3,
    )
    tokens = Tokens(make_token)
    reached: dict[tuple[str, str], set[int]] = {}

    async with (
        running_server(served) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        spec = (await http.get("/openapi.json")).json()
        device_tokens, ids = await seed(http, tokens)

        async def check(calls: list[Call]) -> None:
            stalls = [call for call in calls if call.stall]
            answers = await asyncio.gather(*(_stalled(url, call, ids) for call in stalls))
            for call, answer in zip(stalls, answers, strict=True):
                _verify(spec, call, answer, reached)
            for call in calls:
                if not call.stall:
                    _verify(spec, call, await _send(http, call, ids), reached)

        await check(live_calls(tokens, device_tokens, ids))
        # 429 on SSE: the tenant's only connection is taken.
        async with http.stream("GET", SSE, headers=bearer(make_token("t-full"))) as held:
            assert held.status_code == 200
            # Kept in a name: an iterator no one refers to is finalized, which closes
            # the stream and frees the slot.
            chunks = held.aiter_bytes()
            await anext(chunks)
            await check([Call("GET", SSE, 429, headers=bearer(make_token("t-full")), stream=True)])
            await chunks.aclose()
        # 429 on stream tickets: one principal asks for more than its burst.
        flood = bearer(make_token("t-tickets"))
        await check(
            [Call("POST", TICKET, 200, headers=flood)] * served.ticket_burst
            + [Call("POST", TICKET, 429, headers=flood)]
        )
        # 429 on exports: the tenant's one export is held by a client that stops
        # reading an answer too large for the sockets' buffers.
        await provision_device(pool, "t-export", "big")
        await many_readings(pool, "t-export", "big", 100_000, datetime(2026, 12, 1, tzinfo=UTC))
        exporter = {**bearer(make_token("t-export")), "Accept": "text/csv"}
        window = {"from": "2026-12-01T00:00:00Z", "to": "2026-12-03T00:00:00Z"}
        big = DEVICES + "/big/telemetry"
        async with http.stream("GET", big, headers=exporter, params=window) as held:
            assert held.status_code == 200
            await check(
                [
                    Call("GET", HISTORY, 429, headers=exporter, path=big, params=window),
                    Call("GET", FLEET_HISTORY, 429, headers=exporter, params={"metric": "a"}),
                ]
            )
        proxy.cut()
        try:
            await check(cut_calls(tokens, device_tokens))
        finally:
            proxy.mend()

    operations = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert operations == set(reached), "operations the table does not call, or calls it lost"
    unreached = {
        operation: missing
        for operation in operations
        if (
            missing := {int(status) for status in _operation(spec, *operation)["responses"]}
            - reached[operation]
            - set(EXPLAINED.get(operation, {}))
        )
    }
    assert not unreached, f"documented but never answered: {unreached}"


async def seed(http: httpx.AsyncClient, tokens: Tokens) -> tuple[dict[str, str], dict[str, str]]:
    """Devices, a rule and two alerts (one open, one closed) through the API."""
    admin = bearer(tokens.admin)
    device_tokens = {}
    for device in ("dev-1", "dev-rate", "dev-hot"):
        created = await http.post(DEVICES, json={"device_id": device}, headers=admin)
        assert created.status_code == 201, created.text
        device_tokens[device] = created.json()["provision_token"]
    rule = (await http.post(RULES, json=RULE_BODY, headers=admin)).json()
    hot = {"X-Provision-Token": device_tokens["dev-hot"]}
    alert_ids = []
    for temp in (40, 20, 41):  # raise, recover (closed), raise again (open)
        url = _device_url(TELEMETRY, "dev-hot")
        assert (await http.post(url, json={"metrics": {"temp": temp}}, headers=hot)).is_success
    # /readyz is documented 200 or 503; the 200 call below needs the listener up.
    for _ in range(600):  # 30 s
        if (await http.get(READYZ)).status_code == 200:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the server never became ready")
    listed = (await http.get(ALERTS, headers=admin)).json()["alerts"]
    alert_ids = [(a["alert_id"], a["status"]) for a in listed]
    [open_alert] = [alert for alert, status in alert_ids if status == "OPEN"]
    [closed_alert] = [alert for alert, status in alert_ids if status == "CLOSED"]
    ids = {
        "tenant_id": "t1",
        "device_id": "dev-1",
        "alert_id": str(open_alert),
        "closed_alert": str(closed_alert),
        "rule_id": str(rule["rule_id"]),
    }
    return device_tokens, ids


async def _send(http: httpx.AsyncClient, call: Call, ids: dict[str, str]) -> Answer:
    headers = dict(call.headers)
    if call.content is not None:
        headers["Content-Type"] = "application/json"
    request = http.build_request(
        call.method,
        call.path or call.template.format(**ids),
        headers=headers,
        params=call.params,
        json=call.json,
        content=call.content,
    )
    response = await http.send(request, stream=call.stream)
    try:
        if call.stream:  # the start of an endless stream is enough
            chunks = response.aiter_bytes()
            body = await anext(chunks)
            await chunks.aclose()
        else:
            body = response.content
    finally:
        await response.aclose()
    return Answer(response.status_code, response.headers, body)


async def _stalled(url: str, call: Call, ids: dict[str, str]) -> Answer:
    """Send the head and part of the body, then nothing: the server must give up."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"metrics": {"temp": 1}}'
    head = [
        f"{call.method} {call.path or call.template.format(**ids)} HTTP/1.1",
        "Host: pulse",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in call.headers.items()),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body[:5])
    try:
        status_line, *lines = (
            (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode().split("\r\n")
        )
        headers = httpx.Headers([tuple(line.split(": ", 1)) for line in lines if line])
        length = int(headers.get("content-length", "0"))
        content = await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
    return Answer(int(status_line.split()[1]), headers, content)


def _operation(spec: dict[str, Any], method: str, template: str) -> dict[str, Any]:
    return spec["paths"][template][method.lower()]  # type: ignore[no-any-return]


def _verify(
    spec: dict[str, Any], call: Call, answer: Answer, reached: dict[tuple[str, str], set[int]]
) -> None:
    where = f"{call.method} {call.path or call.template} -> {answer.status}"
    detail = f"{where}: {answer.body[:300]!r}"
    assert answer.status == call.expect, f"expected {call.expect}: {detail}"
    responses = _operation(spec, call.method, call.template)["responses"]
    documented = responses.get(str(answer.status))
    assert documented is not None, f"undocumented answer {detail}"
    content = documented.get("content")
    if content is None:
        assert answer.body == b"", f"documented without a body: {detail}"
    else:
        media_type = answer.headers.get("content-type", "").split(";")[0].strip()
        assert media_type in content, f"{media_type} is not documented: {detail}"
        if media_type == "application/json":
            schema = {**content[media_type]["schema"], "components": spec["components"]}
            errors = [
                e.message
                for e in jsonschema_rs.validator_for(schema).iter_errors(json.loads(answer.body))
            ]
            assert not errors, f"{detail} does not match its schema: {errors}"
    for header in documented.get("headers", {}):
        assert header in answer.headers, f"{header} is documented but missing: {detail}"
    reached.setdefault((call.method, call.template), set()).add(answer.status)
