-- name: channel_for_tenant
-- The channel name is derived in SQL (pulse_channel), the one place that knows it.
SELECT pulse_channel($1::text)

-- name: newest_event_id
-- The tenant's newest committed id: the counter is updated in the same
-- transaction as the rows, so its committed value is the newest committed row.
SELECT coalesce((SELECT last_event_id FROM tenants WHERE tenant_id = $1), 0)

-- name: earliest_event_id
SELECT min(id) FROM telemetry WHERE tenant_id = $1

-- name: events_after
-- Rows in (after, upto], oldest first, optionally for some devices only. The
-- time and metrics come back as text, ready to embed in the event JSON.
SELECT id,
       device_id,
       to_char(device_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS time,
       metrics::text AS metrics_json
  FROM telemetry
 WHERE tenant_id = $1
   AND id > $2
   AND id <= $3
   AND ($4::text[] IS NULL OR device_id = ANY($4::text[]))
 ORDER BY id
 LIMIT $5

-- name: bus_database_id
-- What names this database on the bus (migrations/0006_bus_channel.sql).
SELECT pulse_bus_database_id()

-- name: bus_channel
SELECT pulse_bus_channel()

-- name: newest_event_ids
-- The newest committed id of each of these tenants (the NATS source's audit).
SELECT tenant_id, last_event_id FROM tenants WHERE tenant_id = ANY($1::text[])

-- name: try_lead_relay
-- Exactly one relay per database: whoever holds this session lock on its
-- listening connection. Closing the connection (or its death) releases it.
SELECT pg_try_advisory_lock($1)
