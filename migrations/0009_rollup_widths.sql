-- The rollups in one table, at three widths: 1, 15 and 60 minutes (migration 0007
-- kept minutes and hours in two tables of the same shape, and had no 15 minutes).
--
-- A 7-day chart has 15-minute buckets (672 points): from the minutes it grouped
-- 10,080 rows a metric, most of its time; from the 15-minute rollups it reads 672.
-- The key leads with the bucket before the metric: a series of every metric is one
-- range of the index, whichever metrics the device has.
CREATE TABLE telemetry_rollups (
    tenant_id text NOT NULL,
    device_id text NOT NULL,
    width     smallint NOT NULL CHECK (width IN (1, 15, 60)),  -- minutes
    bucket    timestamptz NOT NULL,
    metric    text NOT NULL,
    count     bigint NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    sum       double precision NOT NULL,
    last      double precision NOT NULL,
    last_time timestamptz NOT NULL,
    last_id   bigint NOT NULL,
    PRIMARY KEY (tenant_id, device_id, width, bucket, metric)
);
-- Retention deletes by width and bucket; buckets grow with the rows' order of insertion.
CREATE INDEX telemetry_rollups_bucket_brin ON telemetry_rollups USING brin (bucket);

INSERT INTO telemetry_rollups
SELECT tenant_id, device_id, 1, bucket, metric, count, min, max, sum, last, last_time, last_id
  FROM telemetry_minutes;
INSERT INTO telemetry_rollups
SELECT tenant_id, device_id, 60, bucket, metric, count, min, max, sum, last, last_time, last_id
  FROM telemetry_hours;
-- The 15 minutes, from the minutes still kept (older ones have only their hours).
INSERT INTO telemetry_rollups
SELECT tenant_id, device_id, 15,
       date_bin('15 minutes', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), metric,
       sum(count), min(min), max(max), sum(sum),
       (array_agg(last ORDER BY last_time DESC, last_id DESC))[1],
       max(last_time),
       (array_agg(last_id ORDER BY last_time DESC, last_id DESC))[1]
  FROM telemetry_minutes
 GROUP BY 1, 2, 4, 5;

DROP TABLE telemetry_minutes, telemetry_hours;
