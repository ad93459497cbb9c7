-- A day's partition belongs to telemetry's owner, whichever role made it. The role
-- that serves may be a member of that owner (docs/operations.md) and made each day
-- as itself: the partition was then that role's, and another member (a credential
-- rotated, a dynamic role per lease) or the owner could detach it but not drop it
-- when it expired (a review, 8 December). Same function as 0007's but for the owner.
CREATE OR REPLACE FUNCTION pulse_create_telemetry_partitions(first_day date, last_day date)
    RETURNS integer
    LANGUAGE plpgsql
    AS $$
    DECLARE
        day date;
        name text;
        created integer := 0;
        owner_role text := (SELECT pg_get_userbyid(relowner) FROM pg_class
                             WHERE oid = 'telemetry'::regclass);
        home oid := (SELECT relnamespace FROM pg_class WHERE oid = 'telemetry'::regclass);
    BEGIN
        -- Processes starting together would both create the same day: one at a time
        -- (each statement below then sees what the one before committed).
        PERFORM pg_advisory_xact_lock(x'70756C73657074'::bigint);  -- "pulse" "pt"
        FOR day IN SELECT d::date FROM generate_series(first_day, last_day, interval '1 day') AS d LOOP
            CONTINUE WHEN pulse_telemetry_day_covered(day);
            name := 'telemetry_p' || to_char(day, 'YYYYMMDD');
            EXECUTE format('CREATE TABLE %I (LIKE telemetry INCLUDING DEFAULTS)', name);
            -- PostgreSQL gives a table only to a role with CREATE on its schema: an
            -- owner without it leaves the day its maker's, as before.
            IF owner_role <> current_user AND has_schema_privilege(owner_role, home, 'CREATE') THEN
                EXECUTE format('ALTER TABLE %I OWNER TO %I', name, owner_role);
            END IF;
            EXECUTE format('ALTER TABLE telemetry ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           name, day::timestamp AT TIME ZONE 'UTC',
                           (day + 1)::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END LOOP;
        RETURN created;
    END
    $$;
