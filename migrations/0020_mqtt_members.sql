-- The Pulse processes in the broker's shared subscription (pulse.mqtt.service): one
-- row per MQTT client id, written once its subscription is made. A process that
-- stops (SIGTERM) leaves the group, ending its broker session, only if another
-- member stays: one not leaving, whose process's lease in stream_processes
-- (migrations/0003_streams.sql) is valid. The last one keeps its session instead,
-- so that what devices publish meanwhile waits in the broker for its client id
-- (with no subscriber left the broker would drop it). A member that crashed stops
-- counting when its lease expires; its row stays until its client id joins again
-- or another member joins. No foreign key: a lapsed lease's row is deleted and
-- made again under the same process id (pulse.streams.limits).
CREATE TABLE mqtt_members (
    client_id  text PRIMARY KEY,
    process_id uuid NOT NULL,
    leaving    boolean NOT NULL DEFAULT false
);
