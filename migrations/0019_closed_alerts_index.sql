-- Closed alerts are deleted once they have been closed for PULSE_ALERT_RETENTION_DAYS
-- (pulse.db.retention): without it the table grew for ever, a flapping sensor raising
-- an alert at each breach (the soak audit: 15,000 closed alerts an hour, about 20
-- active). The pass finds the oldest closed ones by this index, a few thousand at a
-- time, without reading the active ones or the rest of the table.
CREATE INDEX alerts_closed_at ON alerts (closed_at) WHERE status = 'CLOSED';
