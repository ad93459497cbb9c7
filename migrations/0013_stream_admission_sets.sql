-- Stream admission and release by the set. A burst of reconnects is admitted in
-- a few statements of many connections each (pulse.streams.limits), and so are
-- the releases when clients leave together. Each connection still went through
-- pulse_admit_stream_connection (a lock, a count and an insert) and a row trigger
-- that updated its tenant's counter row: within one statement that is the same
-- row updated once per connection, and every later look at it walks the versions
-- the statement made before, so the cost per connection grew with the batch
-- (43 us each in a batch of 500, 89 us in a batch of 4,000; releases 17 and
-- 41 us). Now a statement-level trigger counts each statement's rows per tenant
-- and process at once, and pulse_admit_stream_connections admits a batch tenant
-- by tenant: one lock, one count and one insert per tenant.

DROP TRIGGER stream_connections_count ON stream_connections;

CREATE FUNCTION pulse_count_stream_connections() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO stream_tenant_counts (process_id, tenant_id, connections)
            SELECT process_id, tenant_id, count(*) FROM inserted GROUP BY 1, 2
            ON CONFLICT (tenant_id, process_id)
            DO UPDATE SET connections = stream_tenant_counts.connections + excluded.connections;
        ELSE
            -- When the process itself is deleted, its counters may be gone
            -- already (the same cascade): then there is nothing to update.
            UPDATE stream_tenant_counts c
               SET connections = c.connections - d.n
              FROM (SELECT process_id, tenant_id, count(*) AS n FROM deleted GROUP BY 1, 2) d
             WHERE c.tenant_id = d.tenant_id AND c.process_id = d.process_id;
        END IF;
        RETURN NULL;
    END
    $$;

CREATE TRIGGER stream_connections_counted_in
    AFTER INSERT ON stream_connections REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION pulse_count_stream_connections();
CREATE TRIGGER stream_connections_counted_out
    AFTER DELETE ON stream_connections REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION pulse_count_stream_connections();

-- Admits, of the connections given (ids, tenants and kinds as parallel arrays),
-- as many of each tenant as its limit leaves room for, in the arrays' order, and
-- records them; returns the ids admitted. Tenants are taken in order, each under
-- its advisory lock (released at commit) as pulse_admit_stream_connection takes
-- it, so two processes cannot both take a tenant's last slot and two batches
-- cannot deadlock. Each statement of a plpgsql function reads a fresh snapshot,
-- so a tenant's count sees every admission committed before its lock was granted.
-- (pulse_admit_stream_connection, one connection at a time, stays for processes
-- of the version before during a rolling deploy.)
CREATE FUNCTION pulse_admit_stream_connections(
    p_process uuid, p_connections bigint[], p_tenants text[], p_kinds text[],
    p_max_per_tenant integer
) RETURNS SETOF bigint
    LANGUAGE plpgsql
    AS $$
    DECLARE
        tenant text;
        free bigint;
    BEGIN
        FOR tenant IN SELECT DISTINCT t FROM unnest(p_tenants) AS t ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock(1886743667, hashtext(tenant));  -- "puls"
            SELECT p_max_per_tenant - coalesce(sum(t.connections), 0) INTO free
              FROM stream_tenant_counts t
              JOIN stream_processes p ON p.process_id = t.process_id
             WHERE t.tenant_id = tenant
               AND p.expires_at > clock_timestamp();
            IF free > 0 THEN
                RETURN QUERY
                INSERT INTO stream_connections (process_id, connection_id, tenant_id, kind)
                SELECT p_process, c.connection_id, tenant, c.kind
                  FROM (SELECT c.connection_id, c.kind, row_number() OVER (ORDER BY c.n) AS nth
                          FROM unnest(p_connections, p_tenants, p_kinds) WITH ORDINALITY
                               AS c(connection_id, tenant_id, kind, n)
                         WHERE c.tenant_id = tenant) AS c
                 WHERE c.nth <= free
                RETURNING connection_id;
            END IF;
        END LOOP;
    END
    $$;
