-- Telemetry partitioned by receive time, one partition per UTC day (issue #17).
--
-- Retention used to delete old rows in batches: at 50k readings/s, 50k deletes/s
-- forever, with the bloat and vacuum that follow. Now it detaches and drops
-- whole days (pulse.db.partitions), and Pulse creates the days ahead itself.
--
-- The partition key must be part of every unique constraint, so the primary key
-- becomes (tenant_id, id, received_at). ids stay unique per tenant because
-- pulse_reserve_event_ids hands each out once; the key's prefix (tenant_id, id)
-- is what the resume path (events_after) and the alert rules read by.
--
-- An existing table is not copied: it becomes the partition of everything up to
-- the end of today, named telemetry_upto_YYYYMMDD, and retention drops it whole
-- once its last day is past the window. Writers wait for this migration's one
-- transaction: it rebuilds the primary key of that table (its index gains
-- received_at) and reads it once to check the partition bound; measured on 1M
-- rows in docs/history.md. An empty table is simply replaced.

ALTER TABLE telemetry RENAME TO telemetry_before_0007;
ALTER TABLE telemetry_before_0007 RENAME CONSTRAINT telemetry_pkey TO telemetry_before_0007_pkey;
ALTER INDEX telemetry_device_latest RENAME TO telemetry_before_0007_device_latest;
DROP TRIGGER telemetry_notify ON telemetry_before_0007;
-- It found the rows to delete in batches; nothing needs it now.
DROP INDEX telemetry_received_at_brin;

CREATE TABLE telemetry (
    tenant_id   text NOT NULL,
    id          bigint NOT NULL,
    device_id   text NOT NULL,
    device_time timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    metrics     jsonb NOT NULL,
    seq         bigint,
    PRIMARY KEY (tenant_id, id, received_at)
) PARTITION BY RANGE (received_at);
CREATE INDEX telemetry_device_latest ON telemetry (tenant_id, device_id, device_time DESC);

-- The same trigger as before, now on the partitioned table: a statement-level
-- trigger of the parent sees every row the statement routed to any partition.
CREATE TRIGGER telemetry_notify
    AFTER INSERT ON telemetry
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pulse_notify_telemetry();

-- Whether a row received on this UTC day has a partition: its own
-- (telemetry_pYYYYMMDD), or the table of before this migration
-- (telemetry_upto_YYYYMMDD, everything up to the end of that day).
CREATE FUNCTION pulse_telemetry_day_covered(day date) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
        SELECT EXISTS (
            SELECT 1
              FROM pg_inherits i
              JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'telemetry'::regclass
               AND (c.relname = 'telemetry_p' || to_char(day, 'YYYYMMDD')
                    OR (c.relname LIKE 'telemetry\_upto\_%'
                        AND to_date(substr(c.relname, 16), 'YYYYMMDD') >= day)))
    $$;

-- Creates the missing daily partitions from first_day to last_day (UTC days),
-- returns how many it created. Each is made as a table of its own, then
-- attached: ATTACH takes only a SHARE UPDATE EXCLUSIVE lock on telemetry, which
-- neither ingest nor readers wait for (CREATE TABLE ... PARTITION OF would take
-- an ACCESS EXCLUSIVE one). The table is empty, so the bound check reads nothing.
CREATE FUNCTION pulse_create_telemetry_partitions(first_day date, last_day date)
    RETURNS integer
    LANGUAGE plpgsql
    AS $$
    DECLARE
        day date;
        name text;
        created integer := 0;
    BEGIN
        -- Processes starting together would both create the same day: one at a time
        -- (each statement below then sees what the one before committed).
        PERFORM pg_advisory_xact_lock(x'70756C73657074'::bigint);  -- "pulse" "pt"
        FOR day IN SELECT d::date FROM generate_series(first_day, last_day, interval '1 day') AS d LOOP
            CONTINUE WHEN pulse_telemetry_day_covered(day);
            name := 'telemetry_p' || to_char(day, 'YYYYMMDD');
            EXECUTE format('CREATE TABLE %I (LIKE telemetry INCLUDING DEFAULTS)', name);
            EXECUTE format('ALTER TABLE telemetry ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           name, day::timestamp AT TIME ZONE 'UTC',
                           (day + 1)::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END LOOP;
        RETURN created;
    END
    $$;

-- The partitions that hold only rows received before the cutoff, oldest first,
-- with whether a DETACH ... CONCURRENTLY of it was interrupted (it then needs
-- FINALIZE before it can be dropped).
CREATE FUNCTION pulse_expired_telemetry_partitions(cutoff timestamptz)
    RETURNS TABLE (name text, detach_pending boolean)
    LANGUAGE sql STABLE
    AS $$
        SELECT c.relname::text, i.inhdetachpending
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
         CROSS JOIN LATERAL (
            SELECT to_date(right(c.relname::text, 8), 'YYYYMMDD') AS day) d
         WHERE i.inhparent = 'telemetry'::regclass
           AND c.relname ~ '^telemetry_(p|upto_)[0-9]{8}$'
           AND (d.day + 1)::timestamp AT TIME ZONE 'UTC' <= cutoff
         ORDER BY d.day
    $$;

DO $$
DECLARE
    upto date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    IF EXISTS (SELECT 1 FROM telemetry_before_0007) THEN
        -- The new primary key is built on the old rows by the ATTACH; the old one
        -- would only cost every insert of the rest of today.
        ALTER TABLE telemetry_before_0007 DROP CONSTRAINT telemetry_before_0007_pkey;
        EXECUTE format('ALTER TABLE telemetry_before_0007 RENAME TO %I',
                       'telemetry_upto_' || to_char(upto, 'YYYYMMDD'));
        EXECUTE format('ALTER TABLE telemetry ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
                       'telemetry_upto_' || to_char(upto, 'YYYYMMDD'),
                       (upto + 1)::timestamp AT TIME ZONE 'UTC');
    ELSE
        DROP TABLE telemetry_before_0007;
    END IF;
    PERFORM pulse_create_telemetry_partitions(upto, upto + 3);
END
$$;

-- Rollups: per device, metric and minute, and per hour from the minutes, kept
-- longer than the readings (pulse.history.rollups). A bucket starts at its UTC
-- minute or hour of device time. Booleans count as 1 and 0, like the alert rules
-- (pulse_metric_value). "last" is the value of the reading with the latest device
-- time in the bucket (the higher id on a tie), so merging a later batch into a
-- bucket keeps it whichever order the readings came in.
CREATE TABLE telemetry_minutes (
    tenant_id text NOT NULL,
    device_id text NOT NULL,
    metric    text NOT NULL,
    bucket    timestamptz NOT NULL,
    count     bigint NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    sum       double precision NOT NULL,
    last      double precision NOT NULL,
    last_time timestamptz NOT NULL,
    last_id   bigint NOT NULL,
    PRIMARY KEY (tenant_id, device_id, metric, bucket)
);
CREATE TABLE telemetry_hours (LIKE telemetry_minutes INCLUDING ALL);
-- Their retention deletes by bucket; buckets grow with the rows' order of insertion.
CREATE INDEX telemetry_minutes_bucket_brin ON telemetry_minutes USING brin (bucket);
CREATE INDEX telemetry_hours_bucket_brin ON telemetry_hours USING brin (bucket);

-- Per tenant, the newest event id counted in the rollups. A tenant's committed
-- rows up to its last_event_id are all there (ids follow commit order), so the
-- rows in (watermark, last_event_id] are exactly the ones not yet counted; the
-- watermark moves in the same transaction as the counts.
CREATE TABLE rollup_watermarks (
    tenant_id text PRIMARY KEY REFERENCES tenants ON DELETE CASCADE,
    last_id   bigint NOT NULL DEFAULT 0
);
