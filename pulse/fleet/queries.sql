-- name: ensure_tenant
-- A tenant exists from its first device on; no separate sign-up step.
INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING;

-- name: lock_tenant_quota
-- Taken by every creation of a device or an alert rule before it inserts, and
-- then counts, the tenant's (released at commit): two at once cannot both take
-- the last place under the quota. A statement of its own: the count after it
-- must read a snapshot taken once the lock is held.
SELECT pg_advisory_xact_lock(1886743668, hashtext($1));

-- name: count_devices
SELECT count(*) FROM devices WHERE tenant_id = $1;

-- name: count_rules
SELECT count(*) FROM alert_rules WHERE tenant_id = $1;

-- name: insert_device
-- Returns no row when the device already exists in the tenant, so a duplicate
-- is told apart without catching a unique violation.
INSERT INTO devices (tenant_id, device_id, site_id, name, token_hash)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant_id, device_id) DO NOTHING
RETURNING tenant_id, device_id, site_id, name, status, last_seen_at, created_at;

-- name: list_devices
-- A page by device_id: $2 is the device_id the previous page ended at ('' for the
-- first page: no device id is empty), $3 how many. Keyset pagination along the
-- primary key (tenant_id, device_id), one index range whatever the page and
-- whatever the plan (no "$2 IS NULL OR", which a generic plan could only filter
-- by, reading the tenant's devices from the first): devices added meanwhile
-- neither shift nor repeat the pages that follow.
SELECT tenant_id, device_id, site_id, name, status, last_seen_at, created_at
  FROM devices
 WHERE tenant_id = $1 AND device_id > $2::text
 ORDER BY device_id
 LIMIT $3;

-- name: get_device
SELECT tenant_id, device_id, site_id, name, status, last_seen_at, created_at
  FROM devices
 WHERE tenant_id = $1 AND device_id = $2;

-- name: delete_device
-- The device's telemetry stays: history outlives the device (see the schema).
-- Run after lock_tenant_writes, then close_device_alerts and delete_device_rules
-- in the same transaction.
DELETE FROM devices WHERE tenant_id = $1 AND device_id = $2 RETURNING device_id

-- name: forget_device_seqs
-- The seqs the broker's deliveries of a deleted device claimed (ingest's
-- claim_broker_seqs): a device made again with its id starts its seqs anew, and
-- would have its readings taken for second deliveries of the old one's.
DELETE FROM broker_seqs WHERE tenant_id = $1 AND device_id = $2

-- name: delete_device_rules
-- A deleted device's own alert rules (alert_rules.device_id has no foreign key):
-- left, they would be listed, count against the tenant's quota, and judge a new
-- device made with the same id. Run after close_device_alerts, which closed their
-- active alerts (every one is the device's) as device_deleted. A rule being made
-- for the device holds its row (insert_rule), so the deletion waited for it, and
-- this statement's snapshot, taken after the wait, holds that rule.
DELETE FROM alert_rules WHERE tenant_id = $1 AND device_id = $2

-- name: close_device_alerts
-- A deleted device's active alerts close: nothing would ever close them. A
-- statement of its own, after delete_device: its snapshot then holds the alerts
-- of the writes the deletion waited for (the tenant's ingest, for the tenant's
-- lock; the status sweeper, for the device's row), which a part of the DELETE's
-- own statement, with the snapshot from before the wait, did not see.
UPDATE alerts
   SET status = 'CLOSED', updated_at = now(), closed_at = now(), closed_reason = 'device_deleted'
 WHERE tenant_id = $1 AND device_id = $2 AND status IN ('OPEN', 'ACKNOWLEDGED')

-- name: replace_device_token
-- Replacing the hash is what revokes the old token: ingest compares against it.
UPDATE devices SET token_hash = $3
 WHERE tenant_id = $1 AND device_id = $2
RETURNING tenant_id, device_id, site_id, name, status, last_seen_at, created_at;

-- Fleet status (pulse.fleet.sweeper) -----------------------------------------

-- name: try_lead_sweeper
-- Session-level: held for as long as the sweeper's dedicated connection lives,
-- so a process that dies hands the lead over by itself. Advisory locks are per
-- database: one sweeper per cluster sharing a database.
SELECT pg_try_advisory_lock($1::bigint)

-- name: take_over_sweeping
-- From when device silence counts for a sweeper taking the lead ($1: now, NULL
-- for the database's clock): the mark of the one before, when it swept within the
-- last $2 seconds (a handover: the other processes went on taking readings), else
-- now (the servers were away, and devices could not report). Recorded, with this
-- first sweep's time, for whoever leads next.
INSERT INTO status_sweeps AS s (counts_from, swept_at)
VALUES (coalesce($1::timestamptz, now()), coalesce($1::timestamptz, now()))
ON CONFLICT (one) DO UPDATE SET
    counts_from = CASE WHEN s.swept_at >= excluded.swept_at - make_interval(secs => $2::float8)
                       THEN s.counts_from ELSE excluded.counts_from END,
    swept_at = excluded.swept_at
RETURNING counts_from

-- name: sweep_statuses
-- Moves devices whose last reading or heartbeat is too old one or two steps
-- towards OFFLINE, in one statement, and opens a NO_HEARTBEAT alert for each
-- device that was ONLINE until now. $1 is the time to judge by (NULL: the
-- database's clock, the one ingest stamps last_seen_at with). Rows that ingest
-- has locked are skipped: that device is being seen right now. The rows are
-- locked in key order like ingest's touch_devices, so the two cannot deadlock.
-- A device nobody ever saw is OFFLINE from the start and never moves here.
-- $5, when given, is when sweeping began again after the servers were away
-- (take_over_sweeping): silence before it is not the device's (devices could not
-- report), so a device's silence is counted from then at the earliest (greatest
-- ignores NULL). The pass is recorded as the last sweep, for a takeover to see.
-- At most $6 devices move per statement (the first in key order): a site's
-- thousands going silent together are moved in several short statements, each
-- holding its rows' locks (which ingest of those devices waits for) briefly.
-- Held: a session of Pulse's pool ($9, its application_name; NULL when DATABASE_URL
-- names its own, and then any session of the database's user) has waited over $7
-- seconds for a lock on a row, a transaction or a table (a long transaction holding a
-- tenant's row, a schema change in the way; not an advisory lock, nor DETACH
-- CONCURRENTLY's wait for other transactions): the devices' readings are waiting to be
-- written, so their silence is not theirs. Unless $8 is false (the sweeper has held
-- long enough), nothing moves then, and silence counts from now on (held_at, which the
-- sweeper keeps as $5 from then on; and counts_from, for whoever leads next).
-- ``waiter`` says which session, whether held or not. pg_locks (which takes the lock
-- manager's locks) is read only when pg_stat_activity shows such a wait.
WITH clock AS (
    SELECT coalesce($1::timestamptz, now()) AS now,
           make_interval(secs => $2::float8) AS stale_after,
           make_interval(secs => $3::float8) AS offline_after,
           $5::timestamptz AS since
), waiting AS (
    SELECT a.pid, a.application_name
      FROM pg_stat_activity a
     WHERE a.wait_event_type = 'Lock' AND a.wait_event IN ('relation', 'tuple', 'transactionid')
       AND a.datname = current_database() AND a.usename = current_user
       AND a.pid <> pg_backend_pid()
       AND ($9::text IS NULL OR a.application_name = $9::text)
), stall AS (
    SELECT w.waiter, w.waiter IS NOT NULL AND $8::boolean AS held
      FROM (SELECT CASE WHEN EXISTS (SELECT 1 FROM waiting) THEN (
                SELECT format('pid %s (%s) has waited %s s for a %s lock', a.pid,
                              coalesce(nullif(a.application_name, ''), 'no application_name'),
                              round(extract(epoch FROM clock_timestamp() - l.waitstart)::numeric, 1),
                              l.locktype)
                  FROM pg_locks l
                  JOIN waiting a ON a.pid = l.pid
                 WHERE NOT l.granted
                   AND l.locktype IN ('relation', 'tuple', 'transactionid')
                   AND l.waitstart < clock_timestamp() - make_interval(secs => $7::float8)
                 ORDER BY l.waitstart
                 LIMIT 1) END AS waiter) w
), due AS (
    SELECT d.tenant_id, d.device_id, d.status AS previous, d.last_seen_at,
           CASE WHEN d.last_seen_at IS NULL
                  OR greatest(d.last_seen_at, c.since) < c.now - c.offline_after
                THEN 'OFFLINE' ELSE 'STALE' END AS status
      FROM devices d, clock c, stall
     WHERE NOT stall.held
       AND ((d.status = 'ONLINE'
             AND (d.last_seen_at IS NULL
                  OR greatest(d.last_seen_at, c.since) < c.now - c.stale_after))
         OR (d.status = 'STALE'
             AND (d.last_seen_at IS NULL
                  OR greatest(d.last_seen_at, c.since) < c.now - c.offline_after)))
     ORDER BY d.tenant_id, d.device_id
     LIMIT $6
       FOR UPDATE OF d SKIP LOCKED
), moved AS (
    UPDATE devices d
       SET status = due.status
      FROM due
     WHERE d.tenant_id = due.tenant_id AND d.device_id = due.device_id
    RETURNING d.tenant_id, d.device_id, due.previous, d.status, d.last_seen_at
), swept AS (
    UPDATE status_sweeps s
       SET swept_at = c.now,
           counts_from = CASE WHEN stall.held THEN c.now ELSE s.counts_from END
      FROM clock c, stall
), silent AS (
    INSERT INTO alerts (tenant_id, device_id, alert_type, severity, summary, details)
    SELECT m.tenant_id, m.device_id, 'NO_HEARTBEAT', $4::smallint,
           format('No heartbeat from %s for over %s s', m.device_id, $2::float8),
           jsonb_build_object(
               'last_seen_at',
               to_char(m.last_seen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
               'stale_after_s', $2::float8)
      FROM moved m
     WHERE m.previous = 'ONLINE'
    ON CONFLICT (tenant_id, alert_type, device_id, coalesce(rule_id, 0))
       WHERE status IN ('OPEN', 'ACKNOWLEDGED')
       DO NOTHING
    RETURNING alert_id
)
SELECT (SELECT count(*) FROM moved WHERE status = 'STALE') AS stale,
       (SELECT count(*) FROM moved WHERE status = 'OFFLINE') AS offline,
       (SELECT count(*) FROM silent) AS alerts_opened,
       (SELECT c.now FROM clock c, stall WHERE stall.held) AS held_at,
       (SELECT waiter FROM stall) AS waiter

-- Alert rules at ingest (pulse.fleet.rules) ----------------------------------

-- name: evaluate_rules
-- Every reading a write committed, against every rule of its tenant, in one
-- read-only statement. Only the (rule, device) pairs with something to do come
-- back: those with readings that broke the rule (how many, the first and the
-- last), and those with an active alert; each with the newest reading that
-- carries the metric, which decides (broken: the alert is raised; within
-- bounds: it closes). The common write -- nothing broken, nothing open -- ends
-- here, having written nothing and fired no trigger. $1 gives each tenant's
-- id range in the write (one tenant's ids in one write are consecutive), so
-- the readings are read back by primary key, not sent again. It is JSON rather
-- than arrays so that every plan of the statement looks alike to PostgreSQL,
-- which then plans it once per connection instead of once per write (planning
-- it costs several times what running it does).
-- A reading without the metric does not count; booleans count as 1 and 0.
-- The cost is readings x rules in one cheap filter (the tenant's rules read
-- once), plus what the pairs that broke need: each device's newest reading per
-- metric is found once for all of them, and each pair takes it from a map. The
-- security audit's 100 readings against 1000 rules (half of them broken by each
-- reading: 55,000 pairs) took 24 s when each pair looked through the whole write
-- for its newest reading; a join of the pairs with the newest readings was
-- planned as a nested loop (the pairs are unknown to the planner): 6 s. Taking
-- each reading's metrics apart to look the rules up by metric instead costs
-- 2.5x this statement's time for the common write (500 readings, 10 rules)
-- (docs/performance.md, "Alert rules per reading").
WITH batch AS MATERIALIZED (
    -- Each tenant's range read through the primary key, whatever the plan: the
    -- planner cannot know how few rows $1 names, and must never scan a
    -- tenant's whole history (OFFSET 0 keeps the range a parameterized index
    -- scan, MATERIALIZED keeps it apart from the rules). A tenant without rules
    -- is not read at all: it has nothing to break, and no active alert either
    -- (deleting a rule closes its alerts).
    SELECT t.tenant_id, t.id, t.device_id, t.metrics
      FROM jsonb_to_recordset($1::jsonb) AS w(tenant_id text, first_id bigint, last_id bigint)
     CROSS JOIN LATERAL (
        SELECT t.tenant_id, t.id, t.device_id, t.metrics
          FROM telemetry t
         WHERE t.tenant_id = w.tenant_id AND t.id BETWEEN w.first_id AND w.last_id
        OFFSET 0) t
     -- OFFSET 0: a probe of the tenant's first rule, not a join with every rule.
     WHERE EXISTS (SELECT 1 FROM alert_rules r WHERE r.tenant_id = w.tenant_id OFFSET 0)
), broken AS MATERIALIZED (
    -- The one pass over every (reading, rule) pair: a filter, nothing kept
    -- but the few pairs that break their rule.
    SELECT r.rule_id, r.metric, b.tenant_id, b.device_id, b.id
      FROM batch b
      JOIN alert_rules r
        ON r.tenant_id = b.tenant_id AND (r.device_id IS NULL OR r.device_id = b.device_id)
     WHERE CASE r.operator
               WHEN '>' THEN pulse_metric_value(b.metrics ->> r.metric) > r.threshold
               WHEN '>=' THEN pulse_metric_value(b.metrics ->> r.metric) >= r.threshold
               WHEN '<' THEN pulse_metric_value(b.metrics ->> r.metric) < r.threshold
               WHEN '<=' THEN pulse_metric_value(b.metrics ->> r.metric) <= r.threshold
               WHEN '==' THEN pulse_metric_value(b.metrics ->> r.metric) = r.threshold
               ELSE pulse_metric_value(b.metrics ->> r.metric) <> r.threshold
           END
), candidates AS MATERIALIZED (
    SELECT rule_id, metric, tenant_id, device_id, count(*) AS triggers,
           min(id) AS first_event_id, max(id) AS last_event_id
      FROM broken
     GROUP BY rule_id, metric, tenant_id, device_id
    UNION ALL
    SELECT a.rule_id, r.metric, a.tenant_id, a.device_id, 0, NULL, NULL
      FROM (SELECT DISTINCT tenant_id, device_id FROM batch) d
     CROSS JOIN LATERAL (
        -- OFFSET 0: one index probe per device written to, never a scan of
        -- every tenant's active alerts.
        SELECT a.rule_id, a.tenant_id, a.device_id
          FROM alerts a
         WHERE a.tenant_id = d.tenant_id AND a.alert_type = 'THRESHOLD'
           AND a.device_id = d.device_id AND a.status IN ('OPEN', 'ACKNOWLEDGED')
        OFFSET 0) a
     CROSS JOIN LATERAL (
        -- The alert's rule, by its primary key.
        SELECT r.metric FROM alert_rules r WHERE r.rule_id = a.rule_id OFFSET 0) r
     WHERE NOT EXISTS (SELECT 1 FROM broken k
                        WHERE k.rule_id = a.rule_id AND k.device_id = a.device_id)
), newest AS MATERIALIZED (
    -- Each device's newest reading carrying each metric the pairs need, once, as
    -- one map: [tenant, device, metric] as JSON text -> id. Looked up by each
    -- pair below: no join whose plan could go pair by pair through the others.
    SELECT jsonb_object_agg(jsonb_build_array(n.tenant_id, n.device_id, n.metric)::text, n.id)
               AS ids
      FROM (SELECT b.tenant_id, b.device_id, m.metric, max(b.id) AS id
              FROM (SELECT DISTINCT tenant_id, device_id, metric FROM candidates) m
              JOIN batch b
                ON b.tenant_id = m.tenant_id AND b.device_id = m.device_id
               AND b.metrics ? m.metric
             GROUP BY b.tenant_id, b.device_id, m.metric) n
)
SELECT c.rule_id, c.tenant_id, c.device_id, c.triggers, c.first_event_id, c.last_event_id,
       c.metric, v.id AS newest_event_id
  FROM candidates c, newest n
 CROSS JOIN LATERAL (
    SELECT (n.ids ->> jsonb_build_array(c.tenant_id, c.device_id, c.metric)::text)::bigint
               AS id) v
 WHERE v.id IS NOT NULL

-- name: apply_verdicts
-- What evaluate_rules found, in one statement: a pair whose newest reading
-- broke its rule raises the alert (inserted, or its trigger count bumped when
-- one is already active: the partial unique index arbitrates, so no two
-- writers can both insert); a pair back within bounds closes its active alert,
-- or, when the violation came and went within this write, is kept as an alert
-- that is already closed. $1: one object per pair, values as the device sent
-- them.
WITH verdict AS (
    SELECT v.*, r.name, r.metric, r.operator, r.threshold, r.severity
      FROM jsonb_to_recordset($1::jsonb) AS v(
               tenant_id text, rule_id bigint, device_id text, violating boolean,
               triggers integer, first_value jsonb, first_event_id bigint,
               last_value jsonb, last_event_id bigint, newest_value jsonb,
               newest_event_id bigint)
     CROSS JOIN LATERAL (
        -- Each verdict's rule by its primary key, whatever the planner guesses
        -- (OFFSET 0): joined by tenant, a plan read the tenant's every rule for
        -- each verdict, 499,500 rows for one reading against 1000 rules.
        SELECT r.name, r.metric, r.operator, r.threshold, r.severity
          FROM alert_rules r
         WHERE r.rule_id = v.rule_id AND r.tenant_id = v.tenant_id
        OFFSET 0) r
      -- A device deleted since the write authenticated it (the deletion committed
      -- before this statement began) gets no alert: nothing would close it.
      JOIN devices d ON d.tenant_id = v.tenant_id AND d.device_id = v.device_id
), raised AS (
    INSERT INTO alerts (tenant_id, device_id, alert_type, rule_id, severity, summary, details,
                        trigger_count, status, closed_at, closed_reason)
    SELECT v.tenant_id, v.device_id, 'THRESHOLD', v.rule_id, v.severity,
           format('%s: %s %s %s on %s', v.name, v.metric, v.operator, v.threshold, v.device_id),
           jsonb_build_object(
               'rule_id', v.rule_id, 'rule_name', v.name, 'metric', v.metric,
               'operator', v.operator, 'threshold', v.threshold,
               'first_value', v.first_value, 'first_event_id', v.first_event_id,
               'last_value', v.last_value, 'last_event_id', v.last_event_id)
           || CASE WHEN v.violating THEN '{}'::jsonb
                   ELSE jsonb_build_object('recovered_value', v.newest_value,
                                           'recovered_event_id', v.newest_event_id) END,
           v.triggers,
           CASE WHEN v.violating THEN 'OPEN' ELSE 'CLOSED' END,
           CASE WHEN v.violating THEN NULL ELSE now() END,
           CASE WHEN v.violating THEN NULL ELSE 'recovered' END
      FROM verdict v
     WHERE v.violating
        OR (v.triggers > 0 AND NOT EXISTS (
                SELECT 1 FROM alerts a
                 WHERE a.tenant_id = v.tenant_id AND a.alert_type = 'THRESHOLD'
                   AND a.device_id = v.device_id AND coalesce(a.rule_id, 0) = v.rule_id
                   AND a.status IN ('OPEN', 'ACKNOWLEDGED')))
    ON CONFLICT (tenant_id, alert_type, device_id, coalesce(rule_id, 0))
       WHERE status IN ('OPEN', 'ACKNOWLEDGED')
       DO UPDATE SET trigger_count = alerts.trigger_count + excluded.trigger_count,
                     last_triggered_at = excluded.last_triggered_at,
                     details = alerts.details || jsonb_build_object(
                         'last_value', excluded.details -> 'last_value',
                         'last_event_id', excluded.details -> 'last_event_id')
    RETURNING alert_id
), recovered AS (
    UPDATE alerts a
       SET status = 'CLOSED', updated_at = now(), closed_at = now(),
           closed_reason = 'recovered',
           trigger_count = a.trigger_count + v.triggers,
           last_triggered_at = CASE WHEN v.triggers > 0 THEN now() ELSE a.last_triggered_at END,
           details = a.details
               || CASE WHEN v.triggers > 0
                       THEN jsonb_build_object('last_value', v.last_value,
                                               'last_event_id', v.last_event_id)
                       ELSE '{}'::jsonb END
               || jsonb_build_object('recovered_value', v.newest_value,
                                     'recovered_event_id', v.newest_event_id)
      FROM verdict v
     WHERE NOT v.violating
       AND a.tenant_id = v.tenant_id AND a.alert_type = 'THRESHOLD'
       AND a.device_id = v.device_id AND coalesce(a.rule_id, 0) = v.rule_id
       AND a.status IN ('OPEN', 'ACKNOWLEDGED')
    RETURNING a.alert_id
)
SELECT (SELECT count(*) FROM raised) AS raised, (SELECT count(*) FROM recovered) AS recovered

-- name: close_no_heartbeat
-- Devices that a write brought back ONLINE: their NO_HEARTBEAT alerts are over.
-- Closed by the clock, as touch_devices marks them: the sweeper may have opened
-- the alert while the write waited for its tenant's row, after it began.
UPDATE alerts a
   SET status = 'CLOSED', updated_at = clock_timestamp(), closed_at = clock_timestamp(),
       closed_reason = 'device_online'
  FROM unnest($1::text[], $2::text[]) AS d(tenant_id, device_id)
 WHERE a.tenant_id = d.tenant_id AND a.alert_type = 'NO_HEARTBEAT'
   AND a.device_id = d.device_id AND coalesce(a.rule_id, 0) = 0
   AND a.status IN ('OPEN', 'ACKNOWLEDGED')

-- Fleet summary (pulse.fleet.summary) ----------------------------------------

-- name: fleet_summary
-- Stored statuses, which the sweeper keeps current; $1 NULL: every tenant.
SELECT count(*) FILTER (WHERE d.status = 'ONLINE') AS online,
       count(*) FILTER (WHERE d.status = 'STALE') AS stale,
       count(*) FILTER (WHERE d.status = 'OFFLINE') AS offline,
       count(*) AS total,
       (SELECT count(*) FROM alerts a
         WHERE ($1::text IS NULL OR a.tenant_id = $1::text)
           AND a.status IN ('OPEN', 'ACKNOWLEDGED')) AS active_alerts
  FROM devices d
 WHERE $1::text IS NULL OR d.tenant_id = $1::text

-- Alerts (pulse.fleet.alerts) ------------------------------------------------

-- name: list_alerts
-- Newest first, a page at a time: $3 is the alert_id the previous page ended
-- at (keyset pagination: alerts raised meanwhile do not shift the pages).
-- $1 NULL: every tenant.
SELECT *
  FROM alerts
 WHERE ($1::text IS NULL OR tenant_id = $1::text)
   AND status = ANY($2::text[])
   AND ($3::bigint IS NULL OR alert_id < $3::bigint)
 ORDER BY alert_id DESC
 LIMIT $4

-- name: lock_alert
-- Another tenant's alert is not found, exactly like one that does not exist.
SELECT * FROM alerts WHERE tenant_id = $1 AND alert_id = $2 FOR UPDATE

-- name: acknowledge_alert
UPDATE alerts
   SET status = 'ACKNOWLEDGED', updated_at = now(), acknowledged_at = now(),
       acknowledged_by = $2
 WHERE alert_id = $1
RETURNING *

-- name: close_alert
UPDATE alerts
   SET status = 'CLOSED', updated_at = now(), closed_at = now(), closed_by = $2,
       closed_reason = 'manual'
 WHERE alert_id = $1
RETURNING *

-- Alert rules (pulse.fleet.rules) --------------------------------------------

-- name: insert_rule
-- No row when the rule names a device the tenant does not have: a typo would
-- otherwise be a rule that never fires. The device's row is held (FOR KEY SHARE,
-- to commit) as a foreign key would hold it: a deletion of the device waits for
-- this rule, and deletes it (delete_device_rules); a deletion not yet committed
-- makes this wait, then find no device.
INSERT INTO alert_rules (tenant_id, name, metric, operator, threshold, severity, device_id)
SELECT $1::text, $2::text, $3::text, $4::text, $5::float8, $6::smallint, $7::text
 WHERE $7::text IS NULL
    OR EXISTS (SELECT 1 FROM devices WHERE tenant_id = $1::text AND device_id = $7::text
                  FOR KEY SHARE)
RETURNING *

-- name: list_rules
-- A page, oldest first: $2 is the rule_id the previous page ended at (0 for the
-- first page), $3 how many. Keyset pagination along alert_rules_tenant_rule
-- (tenant_id, rule_id), as list_devices along its key. The row comparison is a
-- bound only that index can take: with "rule_id > $2" the primary key could serve
-- the order too, and a generic plan took it, reading every tenant's rules after
-- the cursor to find this tenant's.
SELECT *
  FROM alert_rules
 WHERE tenant_id = $1 AND (tenant_id, rule_id) > ($1, $2::bigint)
 ORDER BY tenant_id, rule_id
 LIMIT $3

-- name: lock_tenant_writes
-- Takes the lock every ingest transaction of the tenant holds until it commits
-- (see pulse_reserve_event_ids): a rule's or a device's deletion then falls
-- between two ingest transactions instead of in the middle of one, so no write
-- raises an alert for a rule or device whose deletion has just closed its alerts.
SELECT 1 FROM tenants WHERE tenant_id = $1 FOR NO KEY UPDATE

-- name: delete_rule
-- The rule's active alerts close with it: nothing would ever close them.
WITH gone AS (
    DELETE FROM alert_rules
     WHERE tenant_id = $1 AND rule_id = $2
    RETURNING tenant_id, rule_id
), closed AS (
    UPDATE alerts a
       SET status = 'CLOSED', updated_at = now(), closed_at = now(), closed_by = $3,
           closed_reason = 'rule_deleted'
      FROM gone g
     WHERE a.tenant_id = g.tenant_id AND a.alert_type = 'THRESHOLD' AND a.rule_id = g.rule_id
       AND a.status IN ('OPEN', 'ACKNOWLEDGED')
)
SELECT rule_id FROM gone
