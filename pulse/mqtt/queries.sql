-- name: all_devices
-- Every device of every tenant: the broker should have a client for each one,
-- and no device client for anything else (pulse.mqtt.provision.Provisioner.reconcile).
SELECT tenant_id, device_id FROM devices;
