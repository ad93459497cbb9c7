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
 ORDER BY t.tenant_id

-- name: lock_watermark
-- The tenant's watermark, locked until this pass commits: even without the
-- advisory lock, two passes could not count the same rows.
INSERT INTO rollup_watermarks AS w (tenant_id) VALUES ($1)
ON CONFLICT (tenant_id) DO UPDATE SET last_id = w.last_id
RETURNING last_id

-- name: roll_up
-- Counts the tenant's rows in ($2, $3] into their minutes, and those minutes'
-- share into their 15 minutes and hours, in one statement; then the caller moves
-- the watermark to $3 in the same transaction. Each row is read once, by the
-- primary key's (tenant_id, id) prefix in each partition.
--
-- The minutes group by hashing, with no sort of the readings and no second look
-- at them: "last" is the value of the reading with the greatest (device time in
-- microseconds, id), found as the greatest [microseconds, id, value] array, which
-- carries the value along; its device time is the minute's greatest. The
-- microseconds are those within the UTC minute (under 60 million): exact in
-- float8 for any year, where microseconds since 1970 are not past 2^53 of them
-- (before 1685, after 2255); ids are exact below 2^53. Against joining the
-- greatest pair back to its reading, this costs
-- PostgreSQL 0.87x-0.93x; against ordered aggregates over sorted readings, less
-- again (docs/performance.md).
--
-- A reading's metrics are taken apart by a subquery of its own (OFFSET 0 keeps
-- it one): each value is parsed once there, where inlined into the aggregates
-- it was parsed by each of the four; and jsonb_object_keys with ->> builds no
-- tuplestore per reading, as jsonb_each_text does: 0.68x-0.76x of PostgreSQL's
-- time for the statement (docs/performance.md).
--
-- Sums go through pulse_sum_of and pulse_add_sums (migration 0015): a sum past the
-- double's range is +-Infinity, never an overflow error that would stop the pass.
WITH readings AS (
    SELECT t.id, t.device_id, t.device_time, m.metric, m.value
      FROM telemetry t
     CROSS JOIN LATERAL (
            SELECT k AS metric, pulse_metric_value(t.metrics ->> k) AS value
              FROM jsonb_object_keys(t.metrics) AS k
            OFFSET 0
         ) AS m
     WHERE t.tenant_id = $1 AND t.id > $2 AND t.id <= $3
), groups AS (
    SELECT device_id, metric,
           date_bin('1 minute', device_time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
           count(*) AS count, min(value) AS min, max(value) AS max,
           pulse_sum_of(sum(value) FILTER (WHERE abs(value) < 1e300),
                        sum(value::numeric) FILTER (WHERE NOT abs(value) < 1e300)) AS sum,
           max(ARRAY[date_part('microseconds', device_time AT TIME ZONE 'UTC'), id, value])
               AS newest,
           max(device_time) AS last_time
      FROM readings
     GROUP BY 1, 2, 3
), minutes AS (
    SELECT device_id, metric, bucket, count, min, max, sum,
           newest[3] AS last, last_time, newest[2]::bigint AS last_id
      FROM groups
), widths AS (
    SELECT 1 AS width, * FROM minutes
    UNION ALL
    SELECT w.width, device_id, metric,
           date_bin(make_interval(mins => w.width), bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
           sum(count), min(min), max(max),
           pulse_sum_of(sum(sum) FILTER (WHERE abs(sum) < 1e300),
                        sum(sum::numeric) FILTER (WHERE NOT abs(sum) < 1e300)),
           (array_agg(last ORDER BY last_time DESC, last_id DESC))[1],
           max(last_time),
           (array_agg(last_id ORDER BY last_time DESC, last_id DESC))[1]
      FROM minutes CROSS JOIN (VALUES (15), (60)) AS w (width)
     GROUP BY 1, 2, 3, 4
)
INSERT INTO telemetry_rollups AS r
       (tenant_id, width, device_id, metric, bucket, count, min, max, sum, last, last_time, last_id)
SELECT $1, width, device_id, metric, bucket, count, min, max, sum, last, last_time, last_id
  FROM widths
ON CONFLICT (tenant_id, device_id, width, bucket, metric) DO UPDATE SET
    count = r.count + excluded.count,
    min = least(r.min, excluded.min),
    max = greatest(r.max, excluded.max),
    sum = pulse_add_sums(r.sum, excluded.sum),
    last = CASE WHEN (excluded.last_time, excluded.last_id) > (r.last_time, r.last_id)
                THEN excluded.last ELSE r.last END,
    last_id = CASE WHEN (excluded.last_time, excluded.last_id) > (r.last_time, r.last_id)
                   THEN excluded.last_id ELSE r.last_id END,
    last_time = greatest(r.last_time, excluded.last_time)

-- name: move_watermark
UPDATE rollup_watermarks SET last_id = $2 WHERE tenant_id = $1

-- name: trim_rollups
-- One batch of the rollups of width $1 older than the cutoff $2.
DELETE FROM telemetry_rollups r
 USING (SELECT ctid FROM telemetry_rollups WHERE width = $1 AND bucket < $2 LIMIT $3) AS doomed
 WHERE r.ctid = doomed.ctid

-- name: device_exists
SELECT EXISTS (SELECT 1 FROM devices WHERE tenant_id = $1 AND device_id = $2)

-- name: tenant_devices
SELECT device_id FROM devices WHERE tenant_id = $1 ORDER BY device_id

-- name: count_readings
-- How many readings a device has in [$3, $4), counting no further than $5 (from
-- the index alone: whether they are few enough for raw points).
SELECT count(*) FROM (
    SELECT 1 FROM telemetry
     WHERE tenant_id = $1 AND device_id = $2 AND device_time >= $3 AND device_time < $4
     LIMIT $5) AS r

-- name: snapshot_marks
-- The tenant's newest committed id, and the newest one the rollups counted.
SELECT coalesce((SELECT last_event_id FROM tenants WHERE tenant_id = $1), 0) AS newest,
       coalesce((SELECT last_id FROM rollup_watermarks WHERE tenant_id = $1), 0) AS counted

-- name: series
-- Buckets of width $6 (aligned on UTC midnight) for some devices and metrics
-- ($3 NULL: every metric), from the rollups of width $7 (minutes) whose start is
-- in [$4, $5), merged with the rows the rollups have not counted
-- yet: ids after $8, the watermark read in the same snapshot (snapshot_marks), so
-- the series is exact up to the tenant's newest committed id. $4 is aligned to
-- the bucket already. The caller plans it with the watermark's value
-- (plan_cache_mode): the uncounted rows are few, and must be read by the primary
-- key, never through the device's index over its whole range.
WITH parts AS (
    SELECT device_id, metric, bucket, count, min, max, sum, last, last_time, last_id
      FROM telemetry_rollups
     WHERE tenant_id = $1 AND device_id = ANY($2::text[]) AND width = $7
       AND bucket >= $4 AND bucket < $5
       AND ($3::text[] IS NULL OR metric = ANY($3::text[]))
    UNION ALL
    SELECT t.device_id, m.key, t.device_time, 1, v.value, v.value, v.value, v.value,
           t.device_time, t.id
      FROM telemetry t
     CROSS JOIN LATERAL jsonb_each_text(t.metrics) AS m
     CROSS JOIN LATERAL (SELECT pulse_metric_value(m.value) AS value) AS v
     WHERE t.tenant_id = $1 AND t.id > $8
       AND t.device_id = ANY($2::text[])
       AND t.device_time >= $4 AND t.device_time < $5
       AND ($3::text[] IS NULL OR m.key = ANY($3::text[]))
)
-- "last" as the greatest (time, id, value) triple: a plain aggregate, so the
-- groups are hashed, not sorted (an ordered aggregate sorts every input row by
-- its text keys, which was most of a 7-day chart's time). The time is the
-- seconds since the bucket's start, under a day: in float8, times a microsecond
-- apart stay apart and in order for any year, where seconds since 1970 do not
-- before about 1685 (numeric would be exact: 0.2 us a row more, against 0.02).
-- The final order is by bytes: only the few output rows are sorted.
SELECT device_id, metric,
       date_bin($6::interval, bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS t,
       sum(count)::bigint AS count, min(min) AS min, max(max) AS max,
       pulse_sum_of(sum(sum) FILTER (WHERE abs(sum) < 1e300),
                    sum(sum::numeric) FILTER (WHERE NOT abs(sum) < 1e300)) AS sum,
       (max(ARRAY[date_part('epoch', last_time - date_bin($6::interval, bucket,
                                                            TIMESTAMPTZ '2000-01-01 00:00:00+00')),
                  last_id::float8, last]))[3] AS last,
       date_bin($6::interval, bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS ord
  FROM parts
 GROUP BY 1, 2, 3
 ORDER BY device_id COLLATE "C", metric COLLATE "C", t

-- name: raw_points
-- Each reading of one device in [$3, $4) as points, metric by metric: rows of the
-- series' shape (a raw point is a bucket of one), and their order as `ord`.
SELECT t.device_id, m.key AS metric, t.device_time AS t, 1 AS count,
       v.value AS min, v.value AS max, v.value AS sum, v.value AS last,
       row_number() OVER (ORDER BY m.key, t.device_time, t.id) AS ord
  FROM telemetry t
 CROSS JOIN LATERAL jsonb_each_text(t.metrics) AS m
 CROSS JOIN LATERAL (SELECT pulse_metric_value(m.value) AS value) AS v
 WHERE t.tenant_id = $1 AND t.device_id = $2 AND t.device_time >= $3 AND t.device_time < $4
   AND ($5::text[] IS NULL OR m.key = ANY($5::text[]))
 ORDER BY ord

-- name: answer_json
-- A JSON answer's "series" object, built here rather than point by point on the
-- server's event loop (100,000 points built in Python were 1.6 s of its time, and
-- every other request waited: audit H2): the rows of {rows} (`series` or
-- `raw_points`), at most {limit} of them (the answer's most points and one more,
-- which says it has too many), as the members of the object, a series per {key}
-- (metric or device_id), each point as {point} makes it (pulse.history.reads, from
-- the aggregates asked for). With how many series and points they are: past
-- {limit} - 1 points or {max_series} series the answer is refused, and none of it
-- is built.
WITH r AS MATERIALIZED ({rows}
     LIMIT {limit}),
sized AS (
    SELECT count(DISTINCT {key}) AS series, count(*) AS points FROM r
),
s AS (
    SELECT {key} AS key, string_agg({point}, ',' ORDER BY ord) AS body
      FROM r
     WHERE (SELECT points < {limit} AND series <= {max_series} FROM sized)
     GROUP BY 1
)
SELECT series, points,
       coalesce((SELECT string_agg(to_json(key)::text || ':[' || body || ']', ','
                                   ORDER BY key COLLATE "C")
                   FROM s), '') AS json
  FROM sized

-- name: readings
-- One device's readings in [$3, $4), in (device time, id) order, after the
-- cursor ($5, $6) when there is one, at most $8; with metrics named ($7), only
-- those, and readings with none of them are left out. Time and metrics come
-- out as text, ready to embed.
SELECT id, device_time,
       to_char(device_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS time,
       CASE WHEN $7::text[] IS NULL THEN metrics::text
            ELSE (SELECT jsonb_object_agg(e.key, e.value)
                    FROM jsonb_each(metrics) AS e WHERE e.key = ANY($7::text[]))::text
       END AS metrics_json
  FROM telemetry
 WHERE tenant_id = $1 AND device_id = $2
   AND device_time >= greatest($3::timestamptz, $5::timestamptz) AND device_time < $4
   AND ($5::timestamptz IS NULL OR (device_time, id) > ($5::timestamptz, $6::bigint))
   AND ($7::text[] IS NULL OR metrics ?| $7::text[])
 ORDER BY device_time, id
 LIMIT $8

-- name: readings_page
-- A page of `readings` (in place of {readings}, with $1 to $8) cut by size too: the
-- readings while those before them come to less than $9 bytes, then one more, which
-- says that a next page exists. A reading counts its metrics' text and 64 bytes for
-- the rest of its JSON (id, time, keys). Without the cut, 10,000 readings of 200
-- metrics were a 16.5 MB answer held in memory until its client took it.
SELECT id, device_time, time, metrics_json, coalesce(before, 0) AS before
  FROM (SELECT r.*,
               sum(octet_length(r.metrics_json) + 64) OVER (
                   ORDER BY r.device_time, r.id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
               ) AS before,
               sum(octet_length(r.metrics_json) + 64) OVER (
                   ORDER BY r.device_time, r.id ROWS BETWEEN UNBOUNDED PRECEDING AND 2 PRECEDING
               ) AS before_previous
          FROM ({readings}) AS r) AS sized
 WHERE coalesce(before_previous, 0) < $9
 ORDER BY device_time, id
