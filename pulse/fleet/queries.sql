-- name: ensure_tenant
-- A tenant exists from its first device on; no separate sign-up step.
INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING;

-- name: insert_device
-- Returns no row when the device already exists in the tenant, so a duplicate
-- is told apart without catching a unique violation.
INSERT INTO devices (tenant_id, device_id, site_id, name, token_hash)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant_id, device_id) DO NOTHING
RETURNING device_id;

-- name: list_devices
SELECT device_id, site_id, name, status, last_seen_at, created_at
  FROM devices
 WHERE tenant_id = $1
 ORDER BY device_id;

-- name: delete_device
-- The device's telemetry stays: history outlives the device (see the schema).
DELETE FROM devices
 WHERE tenant_id = $1 AND device_id = $2
RETURNING device_id;

-- name: replace_device_token
-- Replacing the hash is what revokes the old token: ingest compares against it.
UPDATE devices SET token_hash = $3
 WHERE tenant_id = $1 AND device_id = $2
RETURNING device_id;
