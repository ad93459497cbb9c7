-- name: try_retention_turn
-- A transaction-level advisory lock: whichever process takes it does this
-- batch; the others skip their turn. Released at commit.
SELECT pg_try_advisory_xact_lock($1)

-- name: trim_telemetry
-- One batch of rows received before the cutoff. Small batches keep each
-- transaction short: row locks only, nothing that blocks ingest or readers.
DELETE FROM telemetry t
 USING (SELECT ctid FROM telemetry WHERE received_at < $1 LIMIT $2) AS doomed
 WHERE t.ctid = doomed.ctid
