-- The stripe column PostgreSQL's usage rows have (see its migration 0007);
-- SQLite's one writer always writes the default, 0. A primary key cannot
-- be altered, so the table is rebuilt.
CREATE TABLE usage_daily_striped (
    tenant                  TEXT NOT NULL,
    day                     TEXT NOT NULL,      -- YYYY-MM-DD, UTC
    route_id                INTEGER NOT NULL,
    country                 TEXT NOT NULL,      -- '' when unknown
    currency                TEXT NOT NULL,      -- '' on rows without cost
    sent                    INTEGER NOT NULL DEFAULT 0,
    delivered               INTEGER NOT NULL DEFAULT 0,
    failed                  INTEGER NOT NULL DEFAULT 0,
    verifications_started   INTEGER NOT NULL DEFAULT 0,
    verifications_approved  INTEGER NOT NULL DEFAULT 0,
    cost_micros             INTEGER NOT NULL DEFAULT 0,
    stripe                  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, day, route_id, country, currency, stripe)
);
INSERT INTO usage_daily_striped (tenant, day, route_id, country, currency, sent, delivered,
    failed, verifications_started, verifications_approved, cost_micros)
SELECT tenant, day, route_id, country, currency, sent, delivered, failed,
    verifications_started, verifications_approved, cost_micros
FROM usage_daily;
DROP TABLE usage_daily;
ALTER TABLE usage_daily_striped RENAME TO usage_daily;
