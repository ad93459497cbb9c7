"""Settings: the only place that reads the environment."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from pulse.logs import FORMATS, LEVELS


class ConfigError(ValueError):
    pass


MIN_JWT_SECRET_BYTES = 32


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pulse"


# PULSE_DB_CONNECT_TIMEOUT_S at most (see Settings.check).
MAX_DB_CONNECT_TIMEOUT_S = 25.0


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    port: int = 8000
    data_dir: Path = dataclasses.field(default_factory=_default_data_dir)

    jwt_secret: str | None = None
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None

    max_connections: int = 10_000
    max_connections_per_tenant: int = 100
    max_device_filters: int = 1000
    # What one tenant may create: every reading is judged against each of its tenant's
    # alert rules (3,000 made one tenant's batches 27 times slower and kept a database
    # core busy), and a device list is read whole.
    max_rules_per_tenant: int = 1000
    max_devices_per_tenant: int = 100_000
    # History exports streaming at once (pulse.history.exports): each holds a pooled
    # connection and a snapshot for as long as its client reads, at most export_max_s.
    # Never more than db_pool_size - 1 at once, whatever max_exports says.
    max_exports: int = 2
    max_exports_per_tenant: int = 1
    export_max_s: float = 3600.0
    # History JSON answers read, built and sent at once (pulse.history.exports): each
    # is held in memory until its client has taken it.
    max_history_reads: int = 12
    max_history_reads_per_tenant: int = 6
    queue_size: int = 1000
    # A crashed process's stream connections stop counting toward the
    # per-tenant limit within this many seconds (pulse.streams.limits).
    connection_lease_ttl_s: float = 15.0

    stale_after_s: float = 30.0
    offline_after_s: float = 300.0
    ws_keepalive_s: float = 10.0
    ws_ping_s: float = 30.0
    sse_keepalive_s: float = 15.0
    allowed_origins: tuple[str, ...] = ()

    retention_hours: float = 168.0
    retention_interval_s: float = 60.0
    # Closed alerts are deleted this long after they closed (0: kept for ever).
    alert_retention_days: float = 90.0
    # Rollups per minute, 15 minutes and hour (pulse.history.rollups): how often the
    # process keeping them looks for new rows, and how long each is kept.
    rollup_interval_s: float = 0.5
    rollup_minutes_days: float = 30.0
    rollup_quarters_days: float = 90.0
    rollup_hours_days: float = 730.0
    shutdown_timeout_s: float = 10.0
    # How long a connection may wait for its next request, and for its first: a
    # process busy with a reconnect storm may read a request seconds after accepting
    # it (hypercorn's 5 s closed those unanswered). A load balancer in front should
    # close idle connections sooner than this.
    http_idle_timeout_s: float = 30.0
    # A connection that has sent no byte this long after it was accepted is closed (one
    # that has sent something has the idle timeout above): clients that connect and
    # never speak would otherwise hold a file each for the whole idle timeout.
    http_first_request_timeout_s: float = 10.0
    ingest_rate_per_device: float = 100.0
    # One full batch (pulse.ingest.intake.MAX_BATCH) from one device: a device
    # uploading its backlog after a night offline gets it accepted whole.
    ingest_burst_per_device: int = 1000
    ingest_rate_per_tenant: float = 10_000.0
    ingest_burst_per_tenant: int = 20_000
    # Stream tickets per principal (tenant and subject): each is a row in PostgreSQL.
    # A dashboard takes two per (re)connect, so a burst of 30 lets 15 tabs of one
    # user reconnect at once.
    ticket_rate_per_s: float = 1.0
    ticket_burst: int = 30
    # Bytes of ingest request bodies held at once, before their senders are known
    # (pulse.ingest.buffer).
    ingest_buffer_mb: float = 64.0
    # Concurrent single-reading requests of one tenant share one transaction.
    group_commit: bool = True
    # Streams write their bytes straight to the connection when the server
    # offers it (pulse.web.direct); 0: always the plain ASGI way.
    direct_writes: bool = True
    db_pool_size: int = 10
    # How long a connection to the database may take (TCP, TLS, startup, password:
    # about six round trips), and its set-up as long again; at the start and at each
    # reconnect of the pool while serving (pulse.db.pool). Raise it for a database far
    # away or one that wakes from scale-to-zero.
    db_connect_timeout_s: float = 5.0
    listener_backoff_max_s: float = 5.0
    # NATS between processes (pulse.bus.nats_source, pulse.bus.relay): unset, every
    # process LISTENs to PostgreSQL itself (no NATS anywhere).
    bus_url: str | None = None
    # With NATS: whether this process competes to be the database's relay. 0 on the
    # stream processes, 1 on one or two small ones, keeps the relay's work off the
    # processes that serve streams.
    bus_relay: bool = True
    # Devices over MQTT (pulse.mqtt): mqtt://<dynamic-security admin>:<password>@host:port.
    # Unset, no MQTT anywhere (the client is not even imported).
    mqtt_url: str | None = None
    # With mqtts://: the CA certificates (PEM) to trust for the broker's certificate;
    # unset, the system's.
    mqtt_ca_file: str | None = None
    # The MQTT session of this process: stable across its restarts, so that the
    # broker hands it back what it had not acknowledged; unique per process.
    mqtt_client_id: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one JSON object per line (pulse.logs)
    access_log: bool = False  # one line per request, query strings never included
    workers: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for name, field in fields.items():
            key = _env_key(name)
            raw = env.get(key)
            if raw is None or raw == "":
                continue
            values[name] = _parse(key, raw, str(field.type))
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check(env)
        return settings

    def check(self, env: Mapping[str, str] | None = None) -> None:
        """Refuse values that cannot work or are unsafe (ConfigError), before anything starts.

        ``env``: where the database driver will look for PGHOST, PGDATABASE and
        PGSERVICE (``os.environ`` unless given)."""
        # Any token it signed lets a short secret be guessed offline, and with it
        # operator-admin tokens forged. `pulse demo` makes a random one of its own.
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(
                f"PULSE_JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes: a shorter one "
                "can be guessed offline from any token it signed. Make one with: "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if self.database_url is not None:
            problem = _database_url_problem(self.database_url, os.environ if env is None else env)
            if problem:
                raise ConfigError(problem)
        if self.max_exports < 1 or self.max_exports_per_tenant < 1 or self.export_max_s <= 0:
            raise ConfigError(
                "PULSE_MAX_EXPORTS, PULSE_MAX_EXPORTS_PER_TENANT and PULSE_EXPORT_MAX_S "
                "must be positive"
            )
        # Every count, rate, size and duration: none means anything at zero or below (a
        # zero PULSE_STALE_AFTER_S made every reading a device's last before STALE),
        # except those whose 0 is documented to mean something (checked below).
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            number = type(value) in (int, float) and field.name not in _ZERO_MEANS_SOMETHING
            if number and not (math.isfinite(value) and value > 0):
                # "inf" is how "for ever" is often written: say how to write it here.
                forever = (
                    " (a large one, 1e300, keeps everything)" if field.name in _WINDOWS else ""
                )
                raise ConfigError(
                    f"{_env_key(field.name)}={value!r} must be a positive finite number{forever}"
                )
        # And none beyond what works: PULSE_CONNECTION_LEASE_TTL_S=1e300 was a startup
        # traceback (an interval out of PostgreSQL's range), PULSE_RETENTION_HOURS=99999999
        # a retention pass that failed every time.
        for name, (most, unit) in _MAXIMA.items():
            value = getattr(self, name)
            if value > most:
                raise ConfigError(
                    f"{_env_key(name)}={value:.15g} must be at most {most:,.15g} ({unit})"
                )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"PORT={self.port} is not a TCP port (0 to 65535)")
        if self.stale_after_s >= self.offline_after_s:
            raise ConfigError(
                f"PULSE_STALE_AFTER_S ({self.stale_after_s:g}) must be less than "
                f"PULSE_OFFLINE_AFTER_S ({self.offline_after_s:g}): a device is STALE "
                "between the two"
            )
        if self.jwks_url is not None:
            parts = urlsplit(self.jwks_url)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                # Not echoed: the URL may hold credentials.
                raise ConfigError(
                    "PULSE_JWKS_URL must be an https:// URL (your identity provider's jwks_uri)"
                )
        # Never echoed either: a NATS URL may hold credentials.
        if self.bus_url is not None:
            servers = [url.strip() for url in self.bus_url.split(",") if url.strip()]
            if not servers or any(not _bus_server(url) for url in servers):
                raise ConfigError(
                    "PULSE_BUS_URL must be nats://HOST:PORT (or tls://, ws://, wss://), several "
                    "servers of one cluster comma separated"
                )
        # An export holds a pooled connection while its client reads: with one, ingest
        # and streams would wait for it.
        if self.db_pool_size < 2:
            raise ConfigError(
                f"PULSE_DB_POOL_SIZE={self.db_pool_size} must be at least 2: a history export "
                "holds a connection for as long as its client reads"
            )
        # Connect and set-up (twice this), then the look at a silent server's address,
        # must end within hypercorn's 60 s for the app's start, or the start fails
        # as a timeout of the app, not of the database.
        if self.db_connect_timeout_s > MAX_DB_CONNECT_TIMEOUT_S:
            raise ConfigError(
                f"PULSE_DB_CONNECT_TIMEOUT_S={self.db_connect_timeout_s:g} must be at most "
                f"{MAX_DB_CONNECT_TIMEOUT_S:g} (seconds)"
            )
        # A body of the largest size (1 MiB) must fit, or such a request is never taken.
        if self.ingest_buffer_mb < 1:
            raise ConfigError(
                f"PULSE_INGEST_BUFFER_MB={self.ingest_buffer_mb:g} must be at least 1: one "
                "request's body can be 1 MiB"
            )
        # A device's broker client may connect under its own client id, <tenant>/<device>,
        # only: Pulse's must never have that form, or that device could take its session.
        if self.mqtt_client_id is not None and "/" in self.mqtt_client_id:
            raise ConfigError(
                f"PULSE_MQTT_CLIENT_ID={self.mqtt_client_id!r} must not contain '/': "
                "<tenant_id>/<device_id> is the client id of a device"
            )
        if not (math.isfinite(self.alert_retention_days) and self.alert_retention_days >= 0):
            raise ConfigError(
                f"PULSE_ALERT_RETENTION_DAYS={self.alert_retention_days:g} must be 0 (closed "
                "alerts kept for ever) or a positive finite number"
            )
        # Either case: `pulse`'s own last line (cli.fail) is JSON for PULSE_LOG_FORMAT=JSON.
        if self.log_level.strip().upper() not in LEVELS:
            raise ConfigError(
                f"PULSE_LOG_LEVEL={self.log_level!r} is not one of {', '.join(LEVELS)}"
            )
        if self.log_format.strip().lower() not in FORMATS:
            raise ConfigError(
                f"PULSE_LOG_FORMAT={self.log_format!r} is not one of {', '.join(FORMATS)}"
            )


# Numbers the loop in Settings.check does not require to be positive: PORT 0 asks for
# any free port, PULSE_ALERT_RETENTION_DAYS 0 keeps closed alerts for ever; each is
# checked on its own there.
_ZERO_MEANS_SOMETHING = frozenset({"port", "alert_retention_days"})

_DAY_S = 86_400.0
MAX_WORKERS = 1024  # PULSE_WORKERS and `pulse serve --workers`
# Every number's largest value (Settings.check; PORT and PULSE_DB_CONNECT_TIMEOUT_S
# have their own checks there), generous, each one known to work
# (tests/test_config.py runs a server with all of them at once): a value beyond is
# almost surely a typo, and was a traceback or a task failing for ever. The retention
# windows (_WINDOWS) have none: any value works, one reaching back before year 1 keeps
# everything (pulse.times.window_start), and large ones are how "for ever" is said.
_WINDOWS = frozenset(
    {
        "retention_hours",
        "alert_retention_days",
        "rollup_minutes_days",
        "rollup_quarters_days",
        "rollup_hours_days",
    }
)
_MAXIMA: dict[str, tuple[float, str]] = {
    "max_connections": (10_000_000, "streams per process"),
    "max_connections_per_tenant": (1_000_000, "streams per tenant"),
    "max_device_filters": (1_000_000, "device ids in one filter"),
    "max_rules_per_tenant": (1_000_000, "alert rules per tenant"),
    "max_devices_per_tenant": (100_000_000, "devices per tenant"),
    "max_exports": (1000, "exports at once"),
    "max_exports_per_tenant": (1000, "exports at once"),
    "export_max_s": (7 * _DAY_S, "seconds: 7 days"),
    "max_history_reads": (10_000, "reads at once"),
    "max_history_reads_per_tenant": (10_000, "reads at once"),
    "queue_size": (1_000_000, "events per client"),
    "connection_lease_ttl_s": (_DAY_S, "seconds: a day"),
    "stale_after_s": (365 * _DAY_S, "seconds: a year"),
    "offline_after_s": (365 * _DAY_S, "seconds: a year"),
    "ws_keepalive_s": (_DAY_S, "seconds: a day"),
    "ws_ping_s": (_DAY_S, "seconds: a day"),
    "sse_keepalive_s": (_DAY_S, "seconds: a day"),
    "retention_interval_s": (_DAY_S, "seconds: a day"),
    "rollup_interval_s": (3600, "seconds: an hour"),
    "shutdown_timeout_s": (3600, "seconds: an hour"),
    "http_idle_timeout_s": (_DAY_S, "seconds: a day"),
    "http_first_request_timeout_s": (_DAY_S, "seconds: a day"),
    "ingest_rate_per_device": (1_000_000_000, "readings a second"),
    "ingest_burst_per_device": (1_000_000_000, "readings"),
    "ingest_rate_per_tenant": (1_000_000_000, "readings a second"),
    "ingest_burst_per_tenant": (1_000_000_000, "readings"),
    "ticket_rate_per_s": (1_000_000, "tickets a second"),
    "ticket_burst": (1_000_000, "tickets"),
    "ingest_buffer_mb": (65_536, "MB: 64 GiB"),
    "db_pool_size": (1000, "connections per process"),
    "listener_backoff_max_s": (3600, "seconds: an hour"),
    "workers": (MAX_WORKERS, "processes"),
}


_DATABASE_URL_FORM = "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
_PERCENT_ENCODE = (
    "special characters in the user or password must be percent-encoded "
    "(@ as %40, # as %23, / as %2F, ? as %3F, [ as %5B)"
)
_UNCLOSED_BRACKET = f"DATABASE_URL: an IPv6 host must be in brackets, [::1]; {_PERCENT_ENCODE}"
_PORT = re.compile(r"[0-9]{1,5}")
_IPV6_HOST = re.compile(r"\[[^\]]+\](?::(.*))?")


def _database_url_problem(url: str, env: Mapping[str, str]) -> str | None:
    """Why asyncpg could not use ``url`` as meant, in words that quote no part of it (it
    may hold a password); None when it can. Read as asyncpg reads it (netloc split at
    its first '@', hosts at ',', each host's port after its first ':'), whose own
    errors here were tracebacks, and which falls back silently to a local socket and a
    database named after the OS user for what a URL leaves out: ``postgres://$U:$P@$H/$DB``
    with the variables unset migrated the machine's own database. What libpq users
    write on purpose stays accepted: ``postgresql:///db`` (the local socket), no
    database (the user's name), an '@' in a query value (``application_name=a@b``, the
    embedded server's socket folder under a path with one)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # Python's words would name the URL part
        return _UNCLOSED_BRACKET
    if parts.scheme not in ("postgres", "postgresql"):
        return f"DATABASE_URL must be a {_DATABASE_URL_FORM} URL"
    # A password with one of these not percent-encoded is cut short, and what is left
    # of it would be taken for the host, the port or the database, and said in the
    # error that follows: a second '@' before the path, an '@' in the path, or a '#'
    # (the rest a fragment, which asyncpg ignores) with an '@' or a '/' after it.
    if parts.netloc.count("@") > 1 or "@" in parts.path or any(c in parts.fragment for c in "@/"):
        return f"DATABASE_URL has a '#' or an '@' where none can be: {_PERCENT_ENCODE}"
    try:
        query = {k: v[-1] for k, v in parse_qs(parts.query, strict_parsing=True).items()}
    except ValueError:
        return f"DATABASE_URL: its query (after '?') must be NAME=VALUE pairs; {_PERCENT_ENCODE}"
    userinfo, at, hostspec = parts.netloc.rpartition("@")
    ports = [p for p in query.get("port", "").split(",") if p]
    for host in hostspec.split(",") if hostspec else []:
        if host.startswith("/"):  # a Unix socket's folder
            continue
        ipv6 = _IPV6_HOST.fullmatch(host)
        if host.startswith("[") and not ipv6:
            return _UNCLOSED_BRACKET
        name, port = (host, ipv6.group(1) or "") if ipv6 else host.partition(":")[::2]
        if not name:
            return f"DATABASE_URL names an empty host: {_DATABASE_URL_FORM}"
        ports += [unquote(port)] if port else []
    if any(not (_PORT.fullmatch(port) and 1 <= int(port) <= 65535) for port in ports):
        return f"DATABASE_URL: a port must be a number from 1 to 65535; {_PERCENT_ENCODE}"
    if query.get("service") or env.get("PGSERVICE"):
        return None  # the pg_service.conf section names the rest
    # No host is libpq's local socket (postgresql:///db); but a password and no host is
    # a TCP URL whose host variable was empty (postgres://$U:$P@$H/$DB).
    if not (hostspec or query.get("host") or env.get("PGHOST")) and ":" in userinfo:
        return (
            f"DATABASE_URL names no host: {_DATABASE_URL_FORM} (a Unix socket's folder: "
            "postgresql://USER@/DATABASE?host=/run/postgresql)"
        )
    # asyncpg takes "/" as the database "" and reads ?dbname= and PGDATABASE only when
    # the URL has no path at all; without a database the server takes the user's name,
    # and without a user asyncpg takes the OS user's.
    named = query.get("dbname") or query.get("database")
    if parts.path:
        if parts.path == "/" and named:
            return f"DATABASE_URL names no database (a '/' with ?dbname=): {_DATABASE_URL_FORM}"
        database = unquote(parts.path[1:])
    else:
        database = named or env.get("PGDATABASE", "")
    user = unquote(userinfo.partition(":")[0]) if at else ""
    if not (database or user or query.get("user") or env.get("PGUSER")):
        return f"DATABASE_URL names no database: {_DATABASE_URL_FORM}"
    return None


def _bus_server(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("nats", "tls", "ws", "wss") and bool(parts.hostname)


_PLAIN_KEYS = {"database_url": "DATABASE_URL", "port": "PORT"}


def _env_key(name: str) -> str:
    return _PLAIN_KEYS.get(name) or "PULSE_" + name.upper()


def _parse(key: str, raw: str, type_name: str) -> object:
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "bool":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if type_name == "Path":
            return Path(raw).expanduser()
        if type_name.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{key}={raw!r} is not a valid {type_name}") from exc
    return raw
