-- Pulse schema, part 3: one-time stream tickets and the cluster-wide count of
-- stream connections. Both live here so that every server process sharing the
-- database sees the same tickets and the same per-tenant count.

-- One-time stream tickets (CONTRACT section 7). Only the sha256 of a ticket is
-- stored. Redeeming deletes the row, which is what makes a ticket single use
-- across the cluster. The ticket carries the identity and expiry of the token
-- it was issued for.
CREATE TABLE stream_tickets (
    ticket_hash      bytea PRIMARY KEY,
    subject          text NOT NULL,
    tenant_id        text,
    roles            text[] NOT NULL,
    token_expires_at timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL
);
CREATE INDEX stream_tickets_expiry ON stream_tickets (expires_at);

-- Every server process that holds stream connections, with a lease it renews
-- (pulse.streams.limits). A process that dies stops renewing: once its lease
-- has expired its connections no longer count, and the next renewal of any
-- other process deletes it with its connections.
CREATE TABLE stream_processes (
    process_id  uuid PRIMARY KEY,
    description text NOT NULL,  -- host and pid, for people reading the table
    started_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

CREATE TABLE stream_connections (
    process_id    uuid NOT NULL REFERENCES stream_processes ON DELETE CASCADE,
    connection_id bigint NOT NULL,
    tenant_id     text NOT NULL,
    kind          text NOT NULL,
    opened_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (process_id, connection_id)
);
CREATE INDEX stream_connections_tenant ON stream_connections (tenant_id);

-- Admits one connection of a tenant when fewer than max_per_tenant live ones
-- exist across the cluster, and records it; returns whether it was admitted.
-- The advisory lock (released at commit) queues the admissions of one tenant,
-- whichever process they come from, so two cannot both take the last slot.
-- Each statement of a plpgsql function reads a fresh snapshot, so the count
-- sees every admission committed before the lock was granted.
CREATE FUNCTION pulse_admit_stream_connection(
    p_process uuid, p_connection bigint, p_tenant text, p_kind text, p_max_per_tenant integer
) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(1886743667, hashtext(p_tenant));  -- 1886743667: "puls"
        IF (SELECT count(*)
              FROM stream_connections c
              JOIN stream_processes p ON p.process_id = c.process_id
             WHERE c.tenant_id = p_tenant
               AND p.expires_at > clock_timestamp()) >= p_max_per_tenant THEN
            RETURN false;
        END IF;
        INSERT INTO stream_connections (process_id, connection_id, tenant_id, kind)
        VALUES (p_process, p_connection, p_tenant, p_kind);
        RETURN true;
    END
    $$;
