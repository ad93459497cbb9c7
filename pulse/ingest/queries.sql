-- The write path's queries, run in this order inside one transaction by
-- pulse.ingest.writer.TelemetryWriter.

-- name: device_token_hashes
-- The stored token hash of every distinct device a write names, in one round
-- trip however large the batch. The token is compared in Python, in constant
-- time, so that the database never sees it. The devices travel as one JSON
-- array, one object per tenant with its devices' index offset ("o", numbering
-- the devices from 0 across the write) and device ids ("d", read as a text
-- array): asyncpg encodes two text arrays element by element, at about twice
-- the client CPU of the whole check otherwise; and a row answers with the
-- device's index, not its ids. "fresh": ONLINE and marked seen less than $2
-- seconds before this statement began (not the transaction: the writer times the
-- judgement from when it sent this), so the write need not mark it again if it
-- gets to marking soon enough (touch_devices leaves such a device alone anyway;
-- this spares the write sending it there). Each device
-- is looked up by the primary key: the OFFSET 0 keeps the planner from joining
-- the whole devices table instead (it guesses 100 tenants of 10 devices, and
-- chose a sequential scan of 200,000 devices, ten times the CPU).
SELECT t.o + w.n - 1 AS i, d.token_hash,
       d.status = 'ONLINE' AND d.last_seen_at > statement_timestamp() - make_interval(secs => $2) AS fresh
  FROM jsonb_to_recordset($1::jsonb) AS t(t text, o int, d text[])
 CROSS JOIN LATERAL unnest(t.d) WITH ORDINALITY AS w(device_id, n)
 CROSS JOIN LATERAL (
        SELECT d.token_hash, d.status, d.last_seen_at
          FROM devices d
         WHERE d.tenant_id = t.t AND d.device_id = w.device_id
        OFFSET 0
     ) AS d;

-- name: claim_broker_seqs
-- Claims the (device, seq) of readings that came through the MQTT broker, which
-- may deliver one twice (migrations/0008_broker_seqs.sql); returns the claims
-- that are new. Rows go in key order, so two writes claiming overlapping keys
-- wait for each other instead of deadlocking; a key repeated within the write
-- is claimed once.
INSERT INTO broker_seqs (tenant_id, device_id, seq)
SELECT c.tenant_id, c.device_id, c.seq
  FROM unnest($1::text[], $2::text[], $3::bigint[]) AS c(tenant_id, device_id, seq)
 ORDER BY 1, 2, 3
    ON CONFLICT DO NOTHING
RETURNING tenant_id, device_id, seq;

-- name: reserve_event_ids
-- Reserves n ids for each tenant of a write. The caller sorts the tenants, and
-- the calls run in array order (the function is volatile, so PostgreSQL
-- evaluates it after the ORDER BY): two writes that span the same tenants lock
-- their rows in the same order and cannot deadlock. Each tenant row stays
-- locked until commit, which is what makes ids follow commit order. A NULL
-- base means the tenant no longer exists. "ruled": the tenant has alert rules
-- (pulse.fleet.rules), as of this statement, which begins after the write's
-- readings came: a rule created before a reading was sent applies to it. A
-- write of tenants without rules then spares a round trip between this
-- statement and its COMMIT, while it holds the tenants' rows.
SELECT r.tenant_id, pulse_reserve_event_ids(r.tenant_id, r.n) AS base,
       EXISTS (SELECT 1 FROM alert_rules a WHERE a.tenant_id = r.tenant_id) AS ruled
  FROM unnest($1::text[], $2::int[]) WITH ORDINALITY AS r(tenant_id, n, ord)
 ORDER BY r.ord;

-- name: insert_telemetry
-- Every row of a write in one statement, whatever the number of tenants: the
-- statement-level trigger then sends one NOTIFY per tenant with the id range,
-- and the round trips do not grow with the batch. The rows travel as one JSON
-- array, encoded by orjson in one call: one object per tenant, with its first
-- id and its rows in id order, each row [device_id, device_time, metrics, seq].
-- The same rows as six typed arrays cost the server about 3.5 times more Python
-- CPU (asyncpg encodes each element, and each metrics object through the jsonb
-- codec), for the same time in PostgreSQL; as one object per row, a dict of six
-- keys built and encoded per reading.
INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics, seq)
SELECT w.t, w.i + r.n - 1, r.e ->> 0, (r.e ->> 1)::timestamptz, r.e -> 2, (r.e ->> 3)::bigint
  FROM jsonb_to_recordset($1::jsonb) AS w(t text, i bigint, r jsonb)
 CROSS JOIN LATERAL jsonb_array_elements(w.r) WITH ORDINALITY AS r(e, n);

-- name: touch_devices
-- Marks the devices of a write as seen now and ONLINE, in one statement, and
-- returns each one's previous status so a caller can tell which came online.
-- A device ONLINE and seen less than $3 seconds ago is left as it is, unlocked
-- and unwritten: last_seen_at is that precise, and a fleet whose every batch
-- names each device does not rewrite every device's row with every batch. The
-- others are locked first in key order: a concurrent multi-row update of
-- devices (the status sweeper) then cannot deadlock with this one, and the
-- status read is the latest committed one (a row another write held is
-- judged again once it is free). greatest() keeps last_seen_at from going back
-- when an older transaction commits after a newer one. The time is the clock's
-- when the row is judged and marked, after any wait for a lock (the tenant's row,
-- taken earlier in the transaction, or the device's, in this statement): now()
-- and statement_timestamp() are from before such a wait, and would count it as
-- the device's silence (a device marked after waiting longer than the sweeper's
-- threshold was STALE the moment its write committed).
WITH seen AS (
    SELECT DISTINCT tenant_id, device_id
      FROM unnest($1::text[], $2::text[]) AS s(tenant_id, device_id)
), prior AS (
    SELECT d.tenant_id, d.device_id, d.status
      FROM devices d
      JOIN seen s ON d.tenant_id = s.tenant_id AND d.device_id = s.device_id
     WHERE d.status <> 'ONLINE' OR d.last_seen_at IS NULL
        OR d.last_seen_at <= clock_timestamp() - make_interval(secs => $3)
     ORDER BY d.tenant_id, d.device_id
       FOR UPDATE OF d
)
UPDATE devices d
   SET last_seen_at = greatest(d.last_seen_at, clock_timestamp()),
       status = 'ONLINE'
  FROM prior p
 WHERE d.tenant_id = p.tenant_id AND d.device_id = p.device_id
RETURNING d.tenant_id, d.device_id, p.status AS previous_status;
