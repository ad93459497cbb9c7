-- Where the status sweeper left off, so that a process taking over the sweeping
-- carries on from it (pulse.fleet.sweeper).
--
-- One row: counts_from, the time from which device silence counts (silence while
-- no server was running is not the device's), and swept_at, when a sweeper last
-- swept. A process that takes the lead moments after the last sweep (a deploy, a
-- crash: a handover, while the other processes went on taking readings) keeps
-- counts_from; after a longer gap (an outage), silence counts from its takeover.
CREATE TABLE status_sweeps (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    counts_from timestamptz NOT NULL,
    swept_at timestamptz NOT NULL
);
