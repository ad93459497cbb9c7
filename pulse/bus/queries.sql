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
