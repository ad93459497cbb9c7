-- One database-wide channel for the relay (PULSE_BUS_URL, pulse.bus.relay).
--
-- With NATS between the processes, exactly one process of the cluster LISTENs
-- (the relay) and it needs the changes of every tenant, whichever process
-- serves them: PostgreSQL has no wildcard LISTEN, so every notification that
-- goes to a tenant's channel also goes, with the same payload, to this one.
-- The tenant channels stay as they were: they are how a process without NATS
-- (PULSE_BUS_URL unset, or NATS away) is woken. The cost is a second queue
-- entry in a transaction that notifies anyway; the commit-time lock, and the
-- signal to every listening backend, are taken once per transaction whatever
-- the number of notifications (measured: docs/scaling.md).

CREATE FUNCTION pulse_bus_channel() RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT 'pulse_v1_bus' $$;

-- What names this database on the bus (its NATS subjects): a random id made
-- once here, and the database's name, so that databases copied from one
-- template (tests, staging) never share subjects.
CREATE TABLE pulse_bus (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    bus_id    uuid NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO pulse_bus DEFAULT VALUES;

CREATE FUNCTION pulse_bus_database_id() RETURNS text
    LANGUAGE sql STABLE
    AS $$ SELECT left(md5(bus_id::text || '/' || current_database()), 16) FROM pulse_bus $$;

CREATE OR REPLACE FUNCTION pulse_notify_telemetry() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    DECLARE
        r record;
        payload text;
    BEGIN
        FOR r IN SELECT tenant_id, min(id) AS first_id, max(id) AS last_id
                   FROM new_rows GROUP BY tenant_id LOOP
            payload := json_build_object('kind', 'telemetry', 'tenant', r.tenant_id,
                                         'first', r.first_id, 'last', r.last_id)::text;
            PERFORM pg_notify(pulse_channel(r.tenant_id), payload);
            PERFORM pg_notify(pulse_bus_channel(), payload);
        END LOOP;
        RETURN NULL;
    END
    $$;

CREATE OR REPLACE FUNCTION pulse_notify_change(kind text, tenants text[]) RETURNS void
    LANGUAGE plpgsql
    AS $$
    DECLARE
        tenant text;
        payload text;
    BEGIN
        IF coalesce(cardinality(tenants), 0) = 0 THEN
            RETURN;
        END IF;
        FOREACH tenant IN ARRAY tenants || '*'::text LOOP
            payload := json_build_object('kind', kind, 'tenant', tenant)::text;
            PERFORM pg_notify(pulse_channel(tenant), payload);
            PERFORM pg_notify(pulse_bus_channel(), payload);
        END LOOP;
    END
    $$;
