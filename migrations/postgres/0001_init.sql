-- otpd schema for PostgreSQL. Ids are UUID text, times are unix milliseconds
-- (the same encoding as the SQLite store, so both share row decoding), hashes
-- and sealed (encrypted) values are bytea. No phone number or code is ever
-- stored in clear.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    key_hash    BYTEA NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE verifications (
    id            TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    subject       BYTEA NOT NULL,
    purpose       TEXT NOT NULL,
    uid           TEXT,
    phone         BYTEA NOT NULL,
    masked_to     TEXT NOT NULL,
    country       TEXT,
    code_hash     BYTEA,
    status        TEXT NOT NULL,
    attempts      BIGINT NOT NULL,
    max_attempts  BIGINT NOT NULL,
    send_count    BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    last_sent_at  BIGINT NOT NULL
);

-- Only pending rows can expire, so the purge and the pending gauge read this
-- small index instead of scanning every verification ever made.
CREATE INDEX verifications_pending_expiry ON verifications (expires_at)
    WHERE status = 'pending';

-- One row per (tenant, subject): the current verification plus the cooldown
-- and send-window counters. start_send locks this row, which serialises sends
-- for one subject across every otpd instance.
CREATE TABLE subjects (
    tenant        TEXT NOT NULL,
    subject       BYTEA NOT NULL,
    current_id    TEXT,
    last_sent_at  BIGINT,
    window_start  BIGINT,
    window_count  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, subject)
);

CREATE INDEX subjects_last_sent ON subjects (last_sent_at);

CREATE TABLE messages (
    -- Insertion order, to list a verification's attempts oldest first.
    seq                  BIGINT GENERATED ALWAYS AS IDENTITY,
    id                   TEXT PRIMARY KEY,
    verification_id      TEXT NOT NULL REFERENCES verifications (id) ON DELETE CASCADE,
    tenant               TEXT NOT NULL,
    route_id             BIGINT NOT NULL,
    provider             TEXT NOT NULL,
    provider_message_id  TEXT,
    masked_to            TEXT NOT NULL,
    country              TEXT,
    status               TEXT NOT NULL,
    error                TEXT,
    cost                 DOUBLE PRECISION,
    currency             TEXT,
    latency_ms           BIGINT NOT NULL,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL
);

CREATE INDEX messages_by_provider_id ON messages (provider, provider_message_id);
CREATE INDEX messages_by_verification ON messages (verification_id, created_at);

-- The sandbox inbox. Bodies hold codes, so they are sealed and purged at expiry.
CREATE TABLE inbox (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY,
    id           TEXT PRIMARY KEY,
    tenant       TEXT NOT NULL,
    phone_index  BYTEA NOT NULL,
    masked_to    TEXT NOT NULL,
    sealed_body  BYTEA NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);

CREATE INDEX inbox_by_tenant ON inbox (tenant, created_at);
CREATE INDEX inbox_by_expiry ON inbox (expires_at);

-- Fixed-window counters: `slot` numbers the window, `window_end` lets the
-- purge drop finished windows.
CREATE TABLE rate_limits (
    key         TEXT PRIMARY KEY,
    slot        BIGINT NOT NULL,
    window_end  BIGINT NOT NULL,
    count       BIGINT NOT NULL
);

CREATE INDEX rate_limits_by_end ON rate_limits (window_end);
