-- Sums of metric values that never fail. PostgreSQL raises "value out of range:
-- overflow" when a float8 sum passes the double's range (about 1.8e308), and ingest
-- takes any finite value: two readings of 1.5e308 in one minute used to stop the
-- rollups' pass, and every chart of their bucket answered 500. A sum is now summed
-- in float8 where it cannot overflow, and in numeric past 1e300 (values that large
-- are rare, so the common case costs a filter, not a numeric per value), and a
-- total past the double's range is stored as +-Infinity: that bucket's average is
-- then null (docs/history.md), while its count, min, max and last stay exact.

-- A numeric total as float8: +-Infinity past the double's range, NaN for NaN
-- (Infinity and -Infinity summed). The bound is a little inside the range:
-- float8 values reach numeric with 15 digits, so the largest ones round past it.
CREATE FUNCTION pulse_saturated(total numeric) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE
        WHEN total = 'NaN' THEN 'NaN'::float8
        WHEN total > 1.7976931348623e308 THEN 'Infinity'::float8
        WHEN total < -1.7976931348623e308 THEN '-Infinity'::float8
        ELSE total::float8 END $$;

-- The sum of some values, given as the float8 sum of those under 1e300 in
-- magnitude (which cannot overflow short of 1e8 values in one bucket) and the
-- numeric sum of the others (NULL: none).
CREATE FUNCTION pulse_sum_of(small double precision, large numeric) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN large IS NULL THEN small
                      ELSE pulse_saturated(coalesce(small, 0)::numeric + large) END $$;

-- Two sums added, as the rollups' upsert adds a pass's sum to a bucket's.
CREATE FUNCTION pulse_add_sums(a double precision, b double precision) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN abs(a) < 1e300 AND abs(b) < 1e300 THEN a + b
                      ELSE pulse_saturated(a::numeric + b::numeric) END $$;
