-- Devices whose broker client may not match them (pulse.mqtt.provision): a device
-- created or deleted while the MQTT broker could not be told. Its client on the
-- broker may still carry the password of an older device of the same id (deleted,
-- then made again, with the broker away both times), which the reconciliation at
-- the next connection could not tell from a good one by its name: it resets the
-- client of every device marked here (deleted, and made again without a password
-- if the device exists), then removes the mark it read.
CREATE TABLE broker_unsynced (
    tenant_id text NOT NULL,
    device_id text NOT NULL,
    marked_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, device_id)
);
