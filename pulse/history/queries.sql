-- Rollups (pulse.history.rollups) and the reads of the history API
-- (pulse.history.reads).

-- name: try_lead_rollups
-- One process of the cluster rolls up at a time: whoever holds this session
-- lock on its connection. Closing the connection (or its death) releases it.
SELECT pg_try_advisory_lock($1)

-- name: tenants_behind
-- The tenants with committed rows not yet counted in the rollups.
SELECT t.tenant_id, coalesce(w.last_id, 0) AS counted, t.last_event_id AS newest
  FROM tenants t
  LEFT JOIN rollup_watermarks w ON w.tenant_id = t.tenant_id
 WHERE t.last_event_id > coalesce(w.last_id, 0)

-- name: lock_watermark
-- The tenant's watermark, locked until this pass commits: even without the
-- advisory lock, two passes could not count the same rows.
INSERT INTO rollup_watermarks AS w (tenant_id) VALUES ($1)
ON CONFLICT (tenant_id) DO UPDATE SET last_id = w.last_id
RETURNING last_id

-- name: roll_up
-- Counts the tenant's rows in ($2, $3] into their minutes, and those minutes'
-- share into their hours, in one statement; then the caller moves the
-- watermark to $3 in the same transaction. Each row is read once, by the primary
-- key's (tenant_id, id) prefix in each partition.
WITH readings AS (
    SELECT t.id, t.device_id, t.device_time, m.key AS metric,
           pulse_metric_value(m.value) AS value
      FROM telemetry t
     CROSS JOIN LATERAL jsonb_each_text(t.metrics) AS m
     WHERE t.tenant_id = $1 AND t.id > $2 AND t.id <= $3
), minutes AS (
    SELECT device_id, metric, date_trunc('minute', device_time, 'UTC') AS bucket,
           count(*) AS count, min(value) AS min, max(value) AS max, sum(value) AS sum,
           (array_agg(value ORDER BY device_time DESC, id DESC))[1] AS last,
           max(device_time) AS last_time,
           (array_agg(id ORDER BY device_time DESC, id DESC))[1] AS last_id
      FROM readings
     GROUP BY 1, 2, 3
), into_minutes AS (
    INSERT INTO telemetry_minutes AS r
           (tenant_id, device_id, metric, bucket, count, min, max, sum, last, last_time, last_id)
    SELECT $1, device_id, metric, bucket, count, min, max, sum, last, last_time, last_id
      FROM minutes
    ON CONFLICT (tenant_id, device_id, metric, bucket) DO UPDATE SET
        count = r.count + excluded.count,
        min = least(r.min, excluded.min),
        max = greatest(r.max, excluded.max),
        sum = r.sum + excluded.sum,
        last = CASE WHEN (excluded.last_time, excluded.last_id) > (r.last_time, r.last_id)
                    THEN excluded.last ELSE r.last END,
        last_id = CASE WHEN (excluded.last_time, excluded.last_id) > (r.last_time, r.last_id)
                       THEN excluded.last_id ELSE r.last_id END,
        last_time = greatest(r.last_time, excluded.last_time)
), hours AS (
    SELECT device_id, metric, date_trunc('hour', bucket, 'UTC') AS bucket,
           sum(count) AS count, min(min) AS min, max(max) AS max, sum(sum) AS sum,
           (array_agg(last ORDER BY last_time DESC, last_id DESC))[1] AS last,
           max(last_time) AS last_time,
           (array_agg(last_id ORDER BY last_time DESC, last_id DESC))[1] AS last_id
      FROM minutes
     GROUP BY 1, 2, 3
)
INSERT INTO telemetry_hours AS r
       (tenant_id, device_id, metric, bucket, count, min, max, sum, last, last_time, last_id)
SELECT $1, device_id, metric, bucket, count, min, max, sum, last, last_time, last_id
  FROM hours
ON CONFLICT (tenant_id, device_id, metric, bucket) DO UPDATE SET
    count = r.count + excluded.count,
    min = least(r.min, excluded.min),
    max = greatest(r.max, excluded.max),
    sum = r.sum + excluded.sum,
    last = CASE WHEN (excluded.last_time, excluded.last_id) > (r.last_time, r.last_id)
                THEN excluded.last ELSE r.last END,
    last_id = CASE WHEN (excluded.last_time, excluded.last_id) > (r.last_time, r.last_id)
                   THEN excluded.last_id ELSE r.last_id END,
    last_time = greatest(r.last_time, excluded.last_time)

-- name: move_watermark
UPDATE rollup_watermarks SET last_id = $2 WHERE tenant_id = $1

-- name: trim_minutes
-- One batch of minute rollups older than the cutoff.
DELETE FROM telemetry_minutes r
 USING (SELECT ctid FROM telemetry_minutes WHERE bucket < $1 LIMIT $2) AS doomed
 WHERE r.ctid = doomed.ctid

-- name: trim_hours
DELETE FROM telemetry_hours r
 USING (SELECT ctid FROM telemetry_hours WHERE bucket < $1 LIMIT $2) AS doomed
 WHERE r.ctid = doomed.ctid
