-- name: all_devices
-- Every device of every tenant: the broker should have a client for each one,
-- and no device client for anything else (pulse.mqtt.provision.Provisioner.reconcile).
SELECT tenant_id, device_id FROM devices;

-- name: trim_broker_seqs
-- Claims older than any redelivery can be (the broker keeps Pulse's session for
-- pulse.mqtt.link.SESSION_EXPIRY_S), in small batches. Any process with MQTT
-- may run it; two at once only delete the same rows.
DELETE FROM broker_seqs b
 USING (SELECT tenant_id, device_id, seq FROM broker_seqs
         WHERE claimed_at < $1 LIMIT $2) AS old
 WHERE b.tenant_id = old.tenant_id AND b.device_id = old.device_id AND b.seq = old.seq;

-- name: mark_broker_unsynced
-- The broker could not be told of a device's creation or deletion: its client is
-- reset at the next connection (migrations/0017_broker_unsynced.sql).
INSERT INTO broker_unsynced (tenant_id, device_id) VALUES ($1, $2)
ON CONFLICT (tenant_id, device_id) DO UPDATE SET marked_at = clock_timestamp();

-- name: broker_unsynced
SELECT tenant_id, device_id, marked_at FROM broker_unsynced ORDER BY tenant_id, device_id;

-- name: clear_broker_unsynced
-- The mark read, unless it was made again since (another failure meanwhile).
DELETE FROM broker_unsynced WHERE tenant_id = $1 AND device_id = $2 AND marked_at = $3;
