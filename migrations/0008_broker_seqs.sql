-- Readings that came through the MQTT broker (pulse.mqtt), claimed once by their
-- device's seq.
--
-- The broker delivers at least once: a reading Pulse committed but had not yet
-- acknowledged when it crashed, or lost its connection, comes again. The claim
-- is made in the transaction that stores the reading, so a reading is stored if
-- and only if its claim commits; a second delivery finds the claim and stores
-- nothing. A separate table rather than a unique index on telemetry: the HTTP
-- path keeps its documented behaviour (no deduplication), and the telemetry
-- table's keys stay free for its own evolution (partitions). Claims older than
-- the broker's session expiry cannot meet a redelivery any more; retention
-- trims them.
CREATE TABLE broker_seqs (
    tenant_id  text NOT NULL,
    device_id  text NOT NULL,
    seq        bigint NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id, seq)
);
CREATE INDEX broker_seqs_claimed_at ON broker_seqs (claimed_at);
