-- Delivery tracking and usage accounting: per-status timestamps and the link
-- from an automatic re-send to the message it rescues; an index of messages
-- still awaiting a final status (what the delivery-report poller walks); an
-- index by age (what retention deletes); and daily usage aggregates.

ALTER TABLE messages ADD COLUMN resend_of TEXT;
ALTER TABLE messages ADD COLUMN sent_at INTEGER;
ALTER TABLE messages ADD COLUMN delivered_at INTEGER;
ALTER TABLE messages ADD COLUMN failed_at INTEGER;

-- Rows written before this migration: their last change is the best estimate
-- of when they reached their status.
UPDATE messages SET sent_at = updated_at WHERE status = 'sent';
UPDATE messages SET delivered_at = updated_at WHERE status = 'delivered';
UPDATE messages SET failed_at = updated_at WHERE status IN ('failed', 'undelivered');

CREATE INDEX messages_unfinished ON messages (provider, created_at)
    WHERE status IN ('queued', 'sent', 'unknown') AND provider_message_id IS NOT NULL;
CREATE INDEX messages_by_created ON messages (created_at);

CREATE TABLE usage_daily (
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
    PRIMARY KEY (tenant, day, route_id, country, currency)
);
