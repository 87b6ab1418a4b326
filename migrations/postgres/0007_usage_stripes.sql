-- A day's usage of one route and country is kept in up to 16 rows, one per
-- stripe, which reads add up. Every send and approval adds to that row, and
-- a row lock is held until the writer's commit reaches the disk: with one
-- row, all of them, on every instance, queued for it one flush at a time.
-- Each connection writes the stripe its backend's process id picks (the
-- column's default: the writes name no stripe); rows from before are in 0.
ALTER TABLE usage_daily ADD COLUMN stripe SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ALTER COLUMN stripe SET DEFAULT pg_backend_pid() % 16;
ALTER TABLE usage_daily DROP CONSTRAINT usage_daily_pkey;
ALTER TABLE usage_daily ADD PRIMARY KEY (tenant, day, route_id, country, currency, stripe);
