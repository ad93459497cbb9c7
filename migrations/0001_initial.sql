-- Pulse schema, part 1: tenants, devices, telemetry and the commit-ordered event ids.

CREATE TABLE tenants (
    tenant_id     text PRIMARY KEY CHECK (tenant_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    -- The newest event id handed out for this tenant. The row is locked by every
    -- writer of the tenant until it commits (see pulse_reserve_event_ids), which
    -- makes ids dense and increasing in commit order.
    last_event_id bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    tenant_id    text NOT NULL REFERENCES tenants ON DELETE CASCADE,
    device_id    text NOT NULL CHECK (device_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    site_id      text,
    name         text,
    -- sha256 of the provision token; the token itself is never stored.
    token_hash   bytea NOT NULL,
    status       text NOT NULL DEFAULT 'OFFLINE' CHECK (status IN ('ONLINE', 'STALE', 'OFFLINE')),
    last_seen_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id)
);

-- No foreign key to devices: ingest checks the device itself, a deleted device
-- keeps its history, and a per-row key check would tax the hot path.
CREATE TABLE telemetry (
    tenant_id   text NOT NULL,
    id          bigint NOT NULL,
    device_id   text NOT NULL,
    device_time timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    metrics     jsonb NOT NULL,
    seq         bigint,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX telemetry_device_latest ON telemetry (tenant_id, device_id, device_time DESC);

-- The one place that names a tenant's NOTIFY channel. md5 keeps any valid
-- tenant id within the 63-byte identifier limit; v1 is the payload version.
CREATE FUNCTION pulse_channel(tenant text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT 'pulse_v1_' || md5(tenant) $$;

-- Hands out n consecutive event ids for a tenant and returns the one before
-- the first. The UPDATE keeps the tenant row locked until the caller commits,
-- so the tenant's writers commit one after another, in id order, while other
-- tenants' rows stay free.
CREATE FUNCTION pulse_reserve_event_ids(tenant text, n integer) RETURNS bigint
    LANGUAGE sql
    AS $$
        UPDATE tenants SET last_event_id = last_event_id + n
         WHERE tenant_id = tenant
        RETURNING last_event_id - n
    $$;

-- One NOTIFY per statement and tenant, carrying the id range: a hint to read
-- the table, never the data itself.
CREATE FUNCTION pulse_notify_telemetry() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    DECLARE
        r record;
    BEGIN
        FOR r IN SELECT tenant_id, min(id) AS first_id, max(id) AS last_id
                   FROM new_rows GROUP BY tenant_id LOOP
            PERFORM pg_notify(
                pulse_channel(r.tenant_id),
                json_build_object('kind', 'telemetry', 'tenant', r.tenant_id,
                                  'first', r.first_id, 'last', r.last_id)::text);
        END LOOP;
        RETURN NULL;
    END
    $$;

CREATE TRIGGER telemetry_notify
    AFTER INSERT ON telemetry
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pulse_notify_telemetry();
