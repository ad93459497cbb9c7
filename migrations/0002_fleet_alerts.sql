-- Pulse schema, part 2: device status changes, alert rules and alerts (CONTRACT section 4).

-- The one place that turns changed rows into notifications: one per tenant that
-- changed, and one on the '*' channel that operators' cross-tenant views listen
-- to. Like telemetry's, they are hints to read the tables again, never the data.
-- PostgreSQL folds identical notifications of one transaction into one, so a
-- transaction that changes many rows of a tenant tells it once.
CREATE FUNCTION pulse_notify_change(kind text, tenants text[]) RETURNS void
    LANGUAGE plpgsql
    AS $$
    DECLARE
        tenant text;
    BEGIN
        IF coalesce(cardinality(tenants), 0) = 0 THEN
            RETURN;
        END IF;
        FOREACH tenant IN ARRAY tenants LOOP
            PERFORM pg_notify(pulse_channel(tenant),
                              json_build_object('kind', kind, 'tenant', tenant)::text);
        END LOOP;
        PERFORM pg_notify(pulse_channel('*'), json_build_object('kind', kind, 'tenant', '*')::text);
    END
    $$;

-- Devices: a status change, a new device or a removed one changes the fleet
-- summary. Ingest updates every device it sees (last_seen_at), so the update
-- trigger compares old and new rows and stays silent unless a status moved.
-- PostgreSQL allows transition tables only on single-event triggers: one
-- trigger per event.
CREATE FUNCTION pulse_devices_updated() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pulse_notify_change('devices', ARRAY(
            SELECT DISTINCT n.tenant_id
              FROM new_rows n
              JOIN old_rows o ON o.tenant_id = n.tenant_id AND o.device_id = n.device_id
             WHERE n.status IS DISTINCT FROM o.status));
        RETURN NULL;
    END
    $$;

CREATE FUNCTION pulse_devices_inserted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pulse_notify_change('devices', ARRAY(SELECT DISTINCT tenant_id FROM new_rows));
        RETURN NULL;
    END
    $$;

CREATE FUNCTION pulse_devices_deleted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pulse_notify_change('devices', ARRAY(SELECT DISTINCT tenant_id FROM old_rows));
        RETURN NULL;
    END
    $$;

CREATE TRIGGER devices_notify_update
    AFTER UPDATE ON devices
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pulse_devices_updated();

CREATE TRIGGER devices_notify_insert
    AFTER INSERT ON devices
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pulse_devices_inserted();

CREATE TRIGGER devices_notify_delete
    AFTER DELETE ON devices
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pulse_devices_deleted();

-- A tenant's threshold rules, evaluated inside every ingest transaction.
CREATE TABLE alert_rules (
    rule_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text NOT NULL REFERENCES tenants ON DELETE CASCADE,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    metric     text NOT NULL CHECK (metric ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    operator   text NOT NULL CHECK (operator IN ('>', '>=', '<', '<=', '==', '!=')),
    threshold  double precision NOT NULL
               CHECK (threshold NOT IN ('NaN', 'Infinity', '-Infinity')),
    severity   smallint NOT NULL CHECK (severity BETWEEN 1 AND 5),
    -- NULL: every device of the tenant.
    device_id  text CHECK (device_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alert_rules_tenant ON alert_rules (tenant_id);

-- A reading's metric as a rule compares it: ingest admits only finite numbers
-- and booleans, and a boolean counts as 1 or 0. NULL when the metric is absent.
-- Plain SQL, so the planner inlines it.
CREATE FUNCTION pulse_metric_value(raw text) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE raw WHEN 'true' THEN 1.0 WHEN 'false' THEN 0.0 ELSE raw::float8 END $$;

CREATE TABLE alerts (
    alert_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         text NOT NULL REFERENCES tenants ON DELETE CASCADE,
    device_id         text NOT NULL,
    alert_type        text NOT NULL CHECK (alert_type IN ('THRESHOLD', 'NO_HEARTBEAT')),
    -- The rule of a THRESHOLD alert. No foreign key: an alert outlives its rule
    -- as history (deleting a rule closes its active alerts).
    rule_id           bigint,
    severity          smallint NOT NULL CHECK (severity BETWEEN 1 AND 5),
    status            text NOT NULL DEFAULT 'OPEN'
                      CHECK (status IN ('OPEN', 'ACKNOWLEDGED', 'CLOSED')),
    summary           text NOT NULL,
    -- What raised it (rule, values, event ids); the columns below are added
    -- to it when the alert is served.
    details           jsonb NOT NULL DEFAULT '{}',
    trigger_count     integer NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- The last status change (a new trigger of an active alert is not one).
    updated_at        timestamptz NOT NULL DEFAULT now(),
    last_triggered_at timestamptz NOT NULL DEFAULT now(),
    acknowledged_at   timestamptz,
    acknowledged_by   text,
    closed_at         timestamptz,
    -- The JWT subject of whoever closed it; NULL when Pulse closed it.
    closed_by         text,
    closed_reason     text CHECK (closed_reason IN
                          ('manual', 'recovered', 'device_online', 'rule_deleted',
                           'device_deleted')),
    CHECK ((alert_type = 'THRESHOLD') = (rule_id IS NOT NULL)),
    CHECK ((status = 'CLOSED') = (closed_reason IS NOT NULL))
);

-- At most one active alert per (tenant, type, device, rule), whatever the code
-- does: raising an alert is an INSERT ... ON CONFLICT on this index.
CREATE UNIQUE INDEX alerts_one_active
    ON alerts (tenant_id, alert_type, device_id, coalesce(rule_id, 0))
    WHERE status IN ('OPEN', 'ACKNOWLEDGED');
-- Lists, newest first: a tenant's alerts, and its active ones on their own.
CREATE INDEX alerts_tenant_newest ON alerts (tenant_id, alert_id DESC);
CREATE INDEX alerts_tenant_active_newest ON alerts (tenant_id, alert_id DESC)
    WHERE status IN ('OPEN', 'ACKNOWLEDGED');

-- Alerts: a new alert, or a status change. A new trigger of an active alert
-- changes no status and notifies nobody (it would at ingest rate).
CREATE FUNCTION pulse_alerts_inserted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pulse_notify_change('alerts', ARRAY(SELECT DISTINCT tenant_id FROM new_rows));
        RETURN NULL;
    END
    $$;

CREATE FUNCTION pulse_alerts_updated() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pulse_notify_change('alerts', ARRAY(
            SELECT DISTINCT n.tenant_id
              FROM new_rows n
              JOIN old_rows o ON o.alert_id = n.alert_id
             WHERE n.status IS DISTINCT FROM o.status));
        RETURN NULL;
    END
    $$;

CREATE TRIGGER alerts_notify_insert
    AFTER INSERT ON alerts
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pulse_alerts_inserted();

CREATE TRIGGER alerts_notify_update
    AFTER UPDATE ON alerts
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pulse_alerts_updated();
