-- Stream admission in constant time. Admitting a connection counted the
-- tenant's connection rows, under the tenant's advisory lock: the cost grew
-- with every connection (17 ms per admission at 10,000), and all admissions
-- of a tenant queue on that lock, so a tenant's dashboards reconnecting after
-- a restart were admitted at a few dozen a second while PostgreSQL burned a
-- core. Each process now keeps one counter per tenant, maintained by triggers
-- on stream_connections; the count of a tenant sums one row per live process.
-- The meaning is unchanged: only connections of processes whose lease has not
-- expired count.

CREATE TABLE stream_tenant_counts (
    process_id  uuid NOT NULL REFERENCES stream_processes ON DELETE CASCADE,
    tenant_id   text NOT NULL,
    connections integer NOT NULL CHECK (connections >= 0),
    PRIMARY KEY (tenant_id, process_id)
);

INSERT INTO stream_tenant_counts (process_id, tenant_id, connections)
SELECT process_id, tenant_id, count(*)
  FROM stream_connections
 GROUP BY process_id, tenant_id;

CREATE FUNCTION pulse_count_stream_connection() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO stream_tenant_counts (process_id, tenant_id, connections)
            VALUES (NEW.process_id, NEW.tenant_id, 1)
            ON CONFLICT (tenant_id, process_id)
            DO UPDATE SET connections = stream_tenant_counts.connections + 1;
        ELSE
            -- When the process itself is deleted, its counters may be gone
            -- already (the same cascade): then there is nothing to update.
            UPDATE stream_tenant_counts
               SET connections = connections - 1
             WHERE tenant_id = OLD.tenant_id AND process_id = OLD.process_id;
        END IF;
        RETURN NULL;
    END
    $$;

CREATE TRIGGER stream_connections_count
    AFTER INSERT OR DELETE ON stream_connections
    FOR EACH ROW EXECUTE FUNCTION pulse_count_stream_connection();

CREATE OR REPLACE FUNCTION pulse_admit_stream_connection(
    p_process uuid, p_connection bigint, p_tenant text, p_kind text, p_max_per_tenant integer
) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(1886743667, hashtext(p_tenant));  -- 1886743667: "puls"
        IF (SELECT coalesce(sum(t.connections), 0)
              FROM stream_tenant_counts t
              JOIN stream_processes p ON p.process_id = t.process_id
             WHERE t.tenant_id = p_tenant
               AND p.expires_at > clock_timestamp()) >= p_max_per_tenant THEN
            RETURN false;
        END IF;
        INSERT INTO stream_connections (process_id, connection_id, tenant_id, kind)
        VALUES (p_process, p_connection, p_tenant, p_kind);
        RETURN true;
    END
    $$;
