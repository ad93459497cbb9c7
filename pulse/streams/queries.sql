-- The cluster-wide connection count, run by pulse.streams.limits.ConnectionLimits.
-- Tables and the admission function: migrations/0003_streams.sql.

-- name: renew_process
-- Registers this process or extends its lease; `created` says whether the row
-- was new, `lapsed` whether the lease had expired before this renewal (the row
-- new, or still there but out of date): then this process's connections went
-- uncounted for a while and must be admitted again (ConnectionLimits.renew).
WITH before AS (SELECT expires_at FROM stream_processes WHERE process_id = $1)
INSERT INTO stream_processes (process_id, description, expires_at)
VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (process_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
RETURNING xmax = 0 AS created,
          coalesce((SELECT expires_at <= clock_timestamp() FROM before), true) AS lapsed;

-- name: admit_connections
-- Connections that arrived together, admitted in one round trip: tenant by
-- tenant, each tenant's in the arrays' order, as many as its limit leaves room
-- for (migrations/0013_stream_admission_sets.sql). The ids admitted; each
-- tenant's lock is held to the end of the statement.
SELECT pulse_admit_stream_connections($1, $2::bigint[], $3::text[], $4::text[], $5)
       AS connection_id;

-- name: release_connections
-- The connections of this process that closed together, in one statement.
DELETE FROM stream_connections WHERE process_id = $1 AND connection_id = ANY($2::bigint[]);

-- name: delete_strays
-- Rows of this process that are no longer open here: their release failed
-- (the database was away when the connection closed). Only ids up to $3, the
-- newest allocated when the caller listed its open ones, so a connection being
-- admitted meanwhile is left alone.
DELETE FROM stream_connections
 WHERE process_id = $1
   AND connection_id <= $3
   AND connection_id <> ALL($2::bigint[]);

-- name: delete_expired_processes
-- Processes that stopped renewing (crashed, or cut off from the database);
-- their connections go with them (ON DELETE CASCADE). They stopped counting
-- when the lease expired; this only clears the rows.
DELETE FROM stream_processes WHERE expires_at < clock_timestamp();

-- name: count_tenant_connections
-- One counter row per live process (migration 0005), not one row per connection.
SELECT coalesce(sum(t.connections), 0)
  FROM stream_tenant_counts t
  JOIN stream_processes p ON p.process_id = t.process_id
 WHERE t.tenant_id = $1
   AND p.expires_at > clock_timestamp();

-- name: forget_process
-- A clean shutdown: this process's connections stop counting at once.
DELETE FROM stream_processes WHERE process_id = $1;
