-- The reservation of a write that foresaw its ids (pulse/ingest/ids.py) and has
-- nothing left to do after it but COMMIT: no device to mark seen, no tenant with
-- alert rules. The writer sends it and its COMMIT in one string, so a tenant's row
-- is held for one round trip to the server instead of two.
--
-- It reserves as the writer's reserve_event_ids does (the tenants in the caller's
-- order, which is sorted, so two writes cannot deadlock), and raises, which skips the
-- COMMIT that follows and leaves the transaction to be rolled back, when a tenant's
-- ids are not the ones foreseen (SQLSTATE PU001: a write ahead rolled back, the
-- tenant was deleted, or another process took them) or when a tenant has alert rules
-- (PU002: a rule created since this process last saw the tenant). Either way the
-- write is made again, reserving first, with its rules. The rules are looked at in
-- the same statement as the reservation, after the write's readings came, as
-- reserve_event_ids does.
CREATE FUNCTION pulse_take_foreseen_ids(tenants text[], counts integer[], bases bigint[])
RETURNS void
    LANGUAGE plpgsql
    AS $$
    BEGIN
        FOR i IN 1 .. cardinality(tenants) LOOP
            IF pulse_reserve_event_ids(tenants[i], counts[i]) IS DISTINCT FROM bases[i] THEN
                RAISE EXCEPTION 'the ids foreseen for tenant % were not free', tenants[i]
                    USING ERRCODE = 'PU001';
            END IF;
            IF EXISTS (SELECT 1 FROM alert_rules a WHERE a.tenant_id = tenants[i]) THEN
                RAISE EXCEPTION 'tenant % has alert rules', tenants[i]
                    USING ERRCODE = 'PU002';
            END IF;
        END LOOP;
    END
    $$;
