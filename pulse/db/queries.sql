-- name: try_retention_lock
-- A session advisory lock: whichever process takes it does this pass; the
-- others skip their turn. Released by retention_unlock (or the session's end).
SELECT pg_try_advisory_lock($1)

-- name: retention_unlock
SELECT pg_advisory_unlock($1)

-- name: create_telemetry_partitions
-- Daily partitions of telemetry for the UTC days in [$1, $2] that lack one
-- (migrations/0007_telemetry_partitions.sql).
SELECT pulse_create_telemetry_partitions($1::date, $2::date)

-- name: expired_telemetry_partitions
-- The partitions whose every row was received before the cutoff, oldest first, with
-- their owner and whether this role may drop them (the owner or a member of it).
SELECT e.name, e.detach_pending, pg_get_userbyid(c.relowner) AS owner,
       pg_has_role(current_user, c.relowner, 'USAGE') AS droppable
  FROM pulse_expired_telemetry_partitions($1) e
  JOIN pg_class c ON c.oid = e.name::regclass

-- name: expired_detached_days
-- Expired days left out of telemetry: detached by a retention pass that then could not
-- drop them (a day another role owned, before migration 0021), never listed again.
SELECT c.relname AS name, pg_get_userbyid(c.relowner) AS owner,
       pg_has_role(current_user, c.relowner, 'USAGE') AS droppable
  FROM pg_class c
 WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'telemetry'::regclass)
   AND c.relkind = 'r' AND NOT c.relispartition
   AND c.relname ~ '^telemetry_p[0-9]{8}$'
   AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC' <= $1
 ORDER BY c.relname

-- name: telemetry_owner
SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'telemetry'::regclass

-- name: lock_is_free
-- Whether no session holds the advisory lock $1: taken and let go in the same
-- statement, so the pooled connection that asks keeps nothing of it.
SELECT CASE WHEN pg_try_advisory_lock($1) THEN pg_advisory_unlock($1) ELSE false END

-- name: delete_closed_alerts
-- Up to $2 alerts closed before $1, the oldest first (alerts_closed_at).
WITH gone AS (
    SELECT alert_id FROM alerts
     WHERE status = 'CLOSED' AND closed_at < $1
     ORDER BY closed_at
     LIMIT $2
)
DELETE FROM alerts a USING gone WHERE a.alert_id = gone.alert_id

-- name: partitions_not_manageable
-- When the current role may not make or drop telemetry's daily partitions (PostgreSQL
-- lets only the owner and its members, who also need CREATE on the schema): the
-- owner, whether this role is it or a member of it, and the schema; no row when it may.
SELECT pg_get_userbyid(c.relowner) AS owner,
       pg_has_role(current_user, c.relowner, 'USAGE') AS member,
       c.relnamespace::regnamespace::text AS schema
  FROM pg_class c
 WHERE c.oid = 'telemetry'::regclass
   AND NOT (pg_has_role(current_user, c.relowner, 'USAGE')
            AND has_schema_privilege(current_user, c.relnamespace, 'CREATE'))
