-- The totals of a batch of counters (`Store::read_counters`, and a check's
-- guess budget), in order, NULL where a counter has no row yet.
--
-- Each counter is looked up on its own, through the primary key, whatever
-- the statistics say. As one join, the planner hashed the whole table when
-- its statistics called it small (a fresh database, or one analysed while
-- quiet), and a prepared statement keeps that plan as the table grows until
-- the next ANALYZE: on a new deployment's first minute of traffic, every
-- send read every counter row. A lookup per key, with sequential scans
-- off, has no such plan to choose.
CREATE FUNCTION otpd_read_counters(
    keys TEXT[],
    windows BIGINT[],
    slots BIGINT[]
) RETURNS BIGINT[] LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $$
BEGIN
    RETURN ARRAY(
        SELECT (SELECT c.total FROM counters c
                WHERE c.key = w.key AND c.window_seconds = w.window_seconds
                  AND c.slot = w.slot)
        FROM unnest(keys, windows, slots) WITH ORDINALITY AS w (key, window_seconds, slot, i)
        ORDER BY w.i);
END
$$;
