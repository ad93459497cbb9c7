"""Settings.from_env: the only reader of the environment."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import _MAXIMA, _WINDOWS, ConfigError, Settings
from tests.support import provision_device, running_server, sse_events


def test_an_empty_environment_gives_the_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings(data_dir=settings.data_dir)
    assert settings.database_url is None and settings.port == 8000
    assert settings.direct_writes is True


def test_each_setting_is_read_from_its_variable_with_its_type() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://db/pulse",
            "PORT": "9000",
            "PULSE_DATA_DIR": "~/pulse-data",
            "PULSE_MAX_CONNECTIONS": "5",
            "PULSE_STALE_AFTER_S": "2.5",
            "PULSE_GROUP_COMMIT": "off",
            "PULSE_DIRECT_WRITES": "0",
            "PULSE_ALLOWED_ORIGINS": " https://a.example , ,https://b.example ",
            "PULSE_LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.database_url == "postgresql://db/pulse"
    assert settings.port == 9000
    assert settings.data_dir == Path("~/pulse-data").expanduser()
    assert settings.max_connections == 5
    assert settings.stale_after_s == 2.5
    assert settings.group_commit is False and settings.direct_writes is False
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.log_level == "DEBUG"


def test_an_empty_variable_counts_as_unset() -> None:
    assert Settings.from_env({"PORT": "", "PULSE_QUEUE_SIZE": ""}).port == 8000


@pytest.mark.parametrize(
    ("key", "raw"),
    [("PORT", "eighty"), ("PULSE_STALE_AFTER_S", "soon"), ("PULSE_ACCESS_LOG", "maybe")],
)
def test_a_value_of_the_wrong_type_is_a_config_error_naming_the_variable(
    key: str, raw: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        Settings.from_env({key: raw})


def test_unknown_variables_are_ignored() -> None:
    assert Settings.from_env({"PULSE_NO_SUCH_THING": "1", "HOME": "/root"}).port == 8000


@pytest.mark.parametrize("secret", ["dev-secret", "x" * 31, "\u00e9" * 15])
def test_a_jwt_secret_under_32_bytes_is_refused(secret: str) -> None:
    with pytest.raises(ConfigError, match="PULSE_JWT_SECRET must be at least 32 bytes"):
        Settings.from_env({"PULSE_JWT_SECRET": secret})


@pytest.mark.parametrize("secret", ["x" * 32, "\u00e9" * 16])
def test_a_jwt_secret_of_32_bytes_is_accepted(secret: str) -> None:
    assert Settings.from_env({"PULSE_JWT_SECRET": secret}).jwt_secret == secret


def test_an_mqtt_client_id_of_a_device_s_form_is_refused() -> None:
    """<tenant_id>/<device_id> is the client id the broker lets that device use: as
    Pulse's own, the device could take Pulse's session (tests/mqtt/test_client_ids.py)."""
    with pytest.raises(ConfigError, match="PULSE_MQTT_CLIENT_ID"):
        Settings.from_env({"PULSE_MQTT_CLIENT_ID": "acme/dev-1"})
    assert Settings.from_env({"PULSE_MQTT_CLIENT_ID": "pulse-a"}).mqtt_client_id == "pulse-a"


def test_create_app_checks_settings_built_in_code() -> None:
    from pulse.app import create_app

    with pytest.raises(ConfigError, match="PULSE_JWT_SECRET"):
        create_app(Settings(jwt_secret="dev-secret"))


def test_the_bus_is_unset_by_default_and_read_when_set() -> None:
    assert Settings.from_env({}).bus_url is None  # every process LISTENs, as before
    settings = Settings.from_env(
        {"PULSE_BUS_URL": "nats://a:4222,nats://b:4222", "PULSE_BUS_RELAY": "0"}
    )
    assert settings.bus_url == "nats://a:4222,nats://b:4222"
    assert settings.bus_relay is False


@pytest.mark.parametrize(
    "key", ["PULSE_MAX_EXPORTS", "PULSE_MAX_EXPORTS_PER_TENANT", "PULSE_EXPORT_MAX_S"]
)
def test_export_limits_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Settings.from_env({key: "0"})


@pytest.mark.parametrize("url", ["notaurl", "localhost:5432/pulse", "mysql://u:secret@h/db"])
def test_a_database_url_that_is_not_postgresql_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"DATABASE_URL": url})
    assert str(refused.value) == (
        "DATABASE_URL must be a postgresql://USER:PASSWORD@HOST:PORT/DATABASE URL"
    )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@h:5432/db",
        "postgres://h/db",
        "postgres://alice:p%40ss%23w0rd@h/db",
        "postgresql://alice@[::1]:5432/db",
        "postgresql://h1:5432,h2:5433/db?sslmode=require",
        # A Unix socket's folder as the host.
        "postgresql:///db?host=/var/run/postgresql",
        "postgresql://alice@/db?host=/run/postgresql&port=5433",
        "postgresql://h?dbname=db",
        "postgresql://?service=pulse",
    ],
)
def test_a_postgresql_url_is_taken(url: str) -> None:
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url


# With the variables of postgres://$U:$P@$H/$DB unset, asyncpg fell back to a local
# socket and a database named after the OS user: `pulse migrate` migrated `root`.
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgres://", "names no database"),
        ("postgres://h/", "names no database"),  # nor a user: the OS user's would be
        ("postgres://:@/", "names no host"),
        ("postgres://alice:s3cr3t@/db", "names no host"),  # a password: TCP meant
        ("postgres://alice:s3cr3t@:5432/db", "names an empty host"),
        # asyncpg takes "/" as the database "" before it looks at ?dbname=.
        ("postgres://alice:s3cr3t@h/?dbname=db", "names no database"),
    ],
)
def test_a_database_url_without_host_or_database_is_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"DATABASE_URL": url})
    assert str(refused.value).startswith(f"DATABASE_URL {says}")
    assert "alice" not in str(refused.value) and "s3cr3t" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "env"),
    [
        ("postgresql:///db", {"PGHOST": "/run/postgresql"}),
        ("postgresql://h", {"PGDATABASE": "db"}),
        ("postgresql://h", {"PGUSER": "alice"}),
        ("postgres://", {"PGSERVICE": "pulse"}),
        # What libpq users write on purpose (the review of the check): the local socket,
        # the user's name as the database, an '@' in a query value, a fragment.
        ("postgresql:///db", {}),
        ("postgresql://pulse@/pulse", {}),
        ("postgres://alice:s3cr3t@h/", {}),
        ("postgres://alice:s3cr3t@h", {}),
        ("postgres://alice:s3cr3t@h/db?application_name=pulse@web1", {}),
        ("postgres://h/db?user=alice@contoso.example", {}),
        ("postgres://alice:s3cr3t@h/db#notes", {}),
        # The embedded server's address, as serve --workers hands it to each worker,
        # with PULSE_DATA_DIR under a folder whose name holds an '@'.
        ("postgresql://postgres:@/postgres?host=/home/alice@corp.example/pulse/pgdata", {}),
        ("postgresql://postgres@h1:5432,h2:5433/db", {}),
    ],
)
def test_libpq_s_variables_may_name_the_host_or_the_database(url: str, env: dict[str, str]) -> None:
    assert Settings.from_env({"DATABASE_URL": url, **env}).database_url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # Each was a traceback (asyncpg's ValueError, or hypercorn's "Port out of range"
        # read as if PORT were wrong).
        ("postgres://alice:s3cr3t@127.0.0.1:port/db", "a port must be a number"),
        ("postgres://alice:s3cr3t@127.0.0.1:99999/db", "a port must be a number"),
        ("postgres://alice:s3cr3t@127.0.0.1:0/db", "a port must be a number"),
        ("postgres://alice:s3cr3t@h/db?port=x", "a port must be a number"),
        ("postgres://alice:s3cr3t@[::1/db", "an IPv6 host must be in brackets"),
        ("postgres://alice:s3cr3t@h/db?sslmode", "its query"),
        # A password's special characters not percent-encoded: what followed them was
        # taken for the host and said in the error ("cannot use the database ss/").
        ("postgres://alice:s3cr3t@pw#XYZ@127.0.0.1/db", "has a '#' or an '@'"),
        ("postgres://alice:s3cr3t@pw@127.0.0.1/db", "has a '#' or an '@'"),
        ("postgres://alice:12/XYZ@127.0.0.1/db", "has a '#' or an '@'"),
        ("postgres://alice:s3cr3t?XYZ@127.0.0.1/db", "its query"),
        ("postgres://alice:s3cr3t[XYZ@127.0.0.1/db", "an IPv6 host must be in brackets"),
    ],
)
def test_a_malformed_database_url_is_one_line_quoting_none_of_it(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"DATABASE_URL": url})
    message = str(refused.value)
    assert message.startswith("DATABASE_URL") and says in message
    assert "\n" not in message
    assert not any(part in message for part in ("alice", "s3cr3t", "XYZ", "pw", "127.0"))


@pytest.mark.parametrize(
    "env",
    [
        {"PULSE_STALE_AFTER_S": "0"},
        {"PULSE_STALE_AFTER_S": "-1"},
        {"PULSE_STALE_AFTER_S": "5", "PULSE_OFFLINE_AFTER_S": "2"},
        {"PULSE_QUEUE_SIZE": "0"},
        {"PULSE_WORKERS": "0"},
        {"PULSE_INGEST_RATE_PER_DEVICE": "-5"},
        {"PORT": "70000"},
        {"PULSE_SHUTDOWN_TIMEOUT_S": "nan"},  # started, then failed at SIGTERM
        {"PULSE_DB_POOL_SIZE": "0"},
        # An export would hold the only connection: ingest and streams would wait for it.
        {"PULSE_DB_POOL_SIZE": "1"},
        # Started, then answered every token 401 (the keys "unavailable").
        {"PULSE_JWKS_URL": "notaurl"},
        {"PULSE_JWKS_URL": "file:///etc/keys.json"},
        # Started, then fell back to LISTEN for good ("Name or service not known").
        {"PULSE_BUS_URL": "garbage"},
        {"PULSE_BUS_URL": "nats://a:4222,http://b:4222"},
        # Started, then crashed with a traceback naming no variable.
        {"PULSE_INGEST_BUFFER_MB": "1e-9"},
        {"PULSE_INGEST_BUFFER_MB": "0.5"},
    ],
)
def test_values_that_cannot_work_are_refused_naming_the_variable(env: dict[str, str]) -> None:
    """Found by an audit: the status thresholds reversed or below zero were taken, and
    the sweeper would have kept devices ONLINE past offline, or STALE at once."""
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "env",
    [
        {"PULSE_JWKS_URL": "https://idp.example/.well-known/jwks.json"},
        {"PULSE_BUS_URL": "nats://u:p@a:4222, tls://b:4222"},
        {"PULSE_INGEST_BUFFER_MB": "1"},
    ],
)
def test_values_that_work_are_taken(env: dict[str, str]) -> None:
    Settings.from_env(env)


def test_the_defaults_pass_their_own_checks() -> None:
    Settings.from_env({}).check()


def test_the_database_connect_timeout_is_a_setting() -> None:
    assert Settings.from_env({}).db_connect_timeout_s == 5.0
    assert Settings.from_env({"PULSE_DB_CONNECT_TIMEOUT_S": "12.5"}).db_connect_timeout_s == 12.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "26", "soon"])
def test_a_database_connect_timeout_that_cannot_work_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="PULSE_DB_CONNECT_TIMEOUT_S"):
        Settings.from_env({"PULSE_DB_CONNECT_TIMEOUT_S": value})


def test_an_alert_retention_of_zero_keeps_closed_alerts_for_ever() -> None:
    """Found by an audit: the documented 0 (README) was refused at start by the check
    that every number be positive."""
    assert Settings.from_env({"PULSE_ALERT_RETENTION_DAYS": "0"}).alert_retention_days == 0
    assert Settings.from_env({"PULSE_ALERT_RETENTION_DAYS": "0.5"}).alert_retention_days == 0.5


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_an_alert_retention_below_zero_or_not_finite_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="PULSE_ALERT_RETENTION_DAYS"):
        Settings.from_env({"PULSE_ALERT_RETENTION_DAYS": value})


def test_a_port_of_zero_asks_for_any_free_port() -> None:
    assert Settings.from_env({"PORT": "0"}).port == 0


def _numbers() -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(Settings)
        if f.type in ("int", "float") and f.name not in ("port", "db_connect_timeout_s")
    ]


def at_their_maxima(settings: Settings) -> Settings:
    """``settings`` with every number at its largest value (PULSE_STALE_AFTER_S below
    PULSE_OFFLINE_AFTER_S, as it must be), and every retention window for ever (1e300)."""
    most = {name: type(getattr(settings, name))(m) for name, (m, _) in _MAXIMA.items()}
    most["stale_after_s"] = most["offline_after_s"] / 2
    most.update(dict.fromkeys(_WINDOWS, 1e300))
    return dataclasses.replace(settings, **most)  # type: ignore[arg-type]


def test_every_number_but_the_windows_has_a_largest_value() -> None:
    assert sorted(_MAXIMA) == sorted(set(_numbers()) - _WINDOWS)


@pytest.mark.parametrize("window", sorted(_WINDOWS))
@pytest.mark.parametrize("value", ["999999", "99999999", "1e300"])
def test_a_window_meant_as_for_ever_is_taken(window: str, value: str) -> None:
    """The review of the maxima: PULSE_RETENTION_HOURS=999999 (114 years) worked, then
    was refused at start by a maximum of 100 years."""
    assert getattr(Settings.from_env({f"PULSE_{window.upper()}": value}), window) == float(value)


@pytest.mark.parametrize("name", sorted(set(_numbers()) - _WINDOWS))
def test_a_number_beyond_its_largest_value_is_one_line_naming_the_variable(name: str) -> None:
    """From the operations audit (huge.sh): only lower bounds were checked.
    PULSE_CONNECTION_LEASE_TTL_S=1e300 was a startup traceback
    (DatetimeFieldOverflowError), PULSE_RETENTION_HOURS=99999999 a retention pass
    failing for ever."""
    key = "PULSE_" + name.upper()
    huge = str(10**30) if name in _INTS else "1e300"
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({key: huge})
    message = str(refused.value)
    assert message.startswith(f"{key}=") and "must be at most" in message, message
    assert "\n" not in message
    largest = _MAXIMA[name][0]
    over = str(int(largest) + 1) if name in _INTS else repr(largest * 1.01)
    with pytest.raises(ConfigError, match=key):
        Settings.from_env({key: over})


def test_every_number_at_its_largest_value_is_taken() -> None:
    at_their_maxima(Settings()).check()


_INTS = {f.name for f in dataclasses.fields(Settings) if f.type == "int"}


async def test_a_server_with_every_number_at_its_largest_value_works(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str], caplog: Any
) -> None:
    """The largest values are values that work: the server starts, is ready, takes a
    reading, streams it and stops, with no error logged (the audit's huge.sh)."""
    device = await provision_device(pool, "t1", "d1")
    async with (
        running_server(at_their_maxima(settings)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        assert (await http.get("/readyz")).status_code == 200
        async with http.stream(
            "GET",
            "/api/v1/customer/telemetry/stream/sse",
            headers={"Authorization": f"Bearer {make_token('t1')}"},
        ) as stream:
            assert stream.status_code == 200
            sent = await http.post(
                "/ingest/v1/tenant/t1/device/d1/telemetry",
                json={"metrics": {"v": 1}},
                headers={"X-Provision-Token": device},
            )
            assert sent.status_code == 201, sent.text
            async with asyncio.timeout(10):
                async for event in sse_events(stream):
                    if event.id == "1":
                        break
        # A history chart (bucket=auto weighs the windows) with every window for ever.
        history = await http.get(
            "/api/v1/customer/devices/d1/telemetry",
            headers={"Authorization": f"Bearer {make_token('t1')}"},
        )
        assert history.status_code == 200, history.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "key", ["PULSE_RETENTION_HOURS", "PULSE_ROLLUP_MINUTES_DAYS", "PULSE_ROLLUP_HOURS_DAYS"]
)
def test_an_infinite_window_is_refused_saying_how_to_keep_everything(key: str) -> None:
    """From the operations review of 8 December: "inf", the obvious way to write for
    ever, was refused as "must be positive", which it is."""
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({key: "inf"})
    assert str(refused.value) == (
        f"{key}=inf must be a positive finite number (a large one, 1e300, keeps everything)"
    )
    assert Settings.from_env({key: "1e300"})  # as said
