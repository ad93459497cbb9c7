-- Retention: telemetry older than PULSE_RETENTION_HOURS is deleted in small
-- batches (pulse.db.retention). received_at only grows with inserts, so a BRIN
-- index finds the old rows at almost no cost to the write path (a few pages,
-- updated once per block range, unlike a B-tree entry per row).
CREATE INDEX telemetry_received_at_brin ON telemetry USING brin (received_at);
