-- otpd schema for SQLite. Ids are UUID text, times are unix milliseconds,
-- hashes and sealed (encrypted) values are blobs. No phone number or code is
-- ever stored in clear.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    key_hash    BLOB NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

CREATE TABLE verifications (
    id            TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    subject       BLOB NOT NULL,
    purpose       TEXT NOT NULL,
    uid           TEXT,
    phone         BLOB NOT NULL,
    masked_to     TEXT NOT NULL,
    country       TEXT,
    code_hash     BLOB,
    status        TEXT NOT NULL,
    attempts      INTEGER NOT NULL,
    max_attempts  INTEGER NOT NULL,
    send_count    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    last_sent_at  INTEGER NOT NULL
);

-- Only pending rows can expire, so the purge and the pending gauge read this
-- small index instead of scanning every verification ever made.
CREATE INDEX verifications_pending_expiry ON verifications (expires_at)
    WHERE status = 'pending';

-- One row per (tenant, subject): the current verification plus the cooldown
-- and send-window counters that start_send decides on.
CREATE TABLE subjects (
    tenant        TEXT NOT NULL,
    subject       BLOB NOT NULL,
    current_id    TEXT,
    last_sent_at  INTEGER,
    window_start  INTEGER,
    window_count  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, subject)
);

CREATE INDEX subjects_last_sent ON subjects (last_sent_at);

CREATE TABLE messages (
    id                   TEXT PRIMARY KEY,
    verification_id      TEXT NOT NULL REFERENCES verifications (id) ON DELETE CASCADE,
    tenant               TEXT NOT NULL,
    route_id             INTEGER NOT NULL,
    provider             TEXT NOT NULL,
    provider_message_id  TEXT,
    masked_to            TEXT NOT NULL,
    country              TEXT,
    status               TEXT NOT NULL,
    error                TEXT,
    cost                 REAL,
    currency             TEXT,
    latency_ms           INTEGER NOT NULL,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);

CREATE INDEX messages_by_provider_id ON messages (provider, provider_message_id);
CREATE INDEX messages_by_verification ON messages (verification_id, created_at);

-- The sandbox inbox. Bodies hold codes, so they are sealed and purged at expiry.
CREATE TABLE inbox (
    id           TEXT PRIMARY KEY,
    tenant       TEXT NOT NULL,
    phone_index  BLOB NOT NULL,
    masked_to    TEXT NOT NULL,
    sealed_body  BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);

CREATE INDEX inbox_by_tenant ON inbox (tenant, created_at);
CREATE INDEX inbox_by_expiry ON inbox (expires_at);

-- Fixed-window counters: `slot` numbers the window, `window_end` lets the
-- purge drop finished windows.
CREATE TABLE rate_limits (
    key         TEXT PRIMARY KEY,
    slot        INTEGER NOT NULL,
    window_end  INTEGER NOT NULL,
    count       INTEGER NOT NULL
);

CREATE INDEX rate_limits_by_end ON rate_limits (window_end);
