-- A batch of counter adds in one round trip (`Store::add_counters`): each add
-- in order, as one `INSERT … ON CONFLICT` would make it, stopping after the
-- first whose new total exceeds its ceiling (NULL: none). Returns the totals
-- of the adds made, in order. A send makes half a dozen adds; one statement
-- each was a round trip each.
CREATE FUNCTION otpd_add_counters(
    keys TEXT[],
    windows BIGINT[],
    slots BIGINT[],
    keeps BIGINT[],
    amounts BIGINT[],
    ceilings BIGINT[]
) RETURNS BIGINT[] LANGUAGE plpgsql AS $$
DECLARE
    totals BIGINT[] := '{}';
    added BIGINT;
BEGIN
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        INSERT INTO counters (key, window_seconds, slot, keep_until, total)
        VALUES (keys[i], windows[i], slots[i], keeps[i], amounts[i])
        ON CONFLICT (key, window_seconds, slot) DO UPDATE SET
            total = counters.total + excluded.total
        RETURNING counters.total INTO added;
        totals := totals || added;
        EXIT WHEN ceilings[i] IS NOT NULL AND added > ceilings[i];
    END LOOP;
    RETURN totals;
END
$$;
