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

-- name: join_members
-- This process's subscription is made: it counts as a member of the shared group
-- (migrations/0020_mqtt_members.sql), and no longer as leaving if its client id
-- was. The rows of processes gone (no lease left) are forgotten.
WITH gone AS (
    DELETE FROM mqtt_members m
     WHERE m.client_id <> $1
       AND NOT EXISTS (SELECT 1 FROM stream_processes p WHERE p.process_id = m.process_id)
)
INSERT INTO mqtt_members (client_id, process_id) VALUES ($1, $2)
ON CONFLICT (client_id) DO UPDATE SET process_id = EXCLUDED.process_id, leaving = false;

-- name: lock_members
-- Held to the end of the transaction: the processes that stop decide one at a time.
SELECT pg_advisory_xact_lock($1);

-- name: may_leave
-- Marks this member leaving, and says so, if another member stays subscribed: one
-- not leaving, its process's lease valid. Under lock_members, in the same
-- transaction: of two processes stopping together, the second sees the first leaving.
UPDATE mqtt_members SET leaving = true
 WHERE client_id = $1 AND process_id = $2
   AND EXISTS (SELECT 1
                 FROM mqtt_members m
                 JOIN stream_processes p ON p.process_id = m.process_id
                WHERE m.client_id <> $1
                  AND NOT m.leaving
                  AND p.expires_at > clock_timestamp())
RETURNING true;
