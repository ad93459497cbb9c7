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
