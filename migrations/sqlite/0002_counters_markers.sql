-- Shared state for abuse limits and leases: additive fixed-window counters and
-- named markers with an expiry (quarantines, poller leases). One row per
-- counter window, so a window's total never mixes with the next one's.

CREATE TABLE counters (
    key             TEXT NOT NULL,
    window_seconds  INTEGER NOT NULL,
    slot            INTEGER NOT NULL,
    window_end      INTEGER NOT NULL,
    total           INTEGER NOT NULL,
    PRIMARY KEY (key, window_seconds, slot)
);

CREATE INDEX counters_by_end ON counters (window_end);

CREATE TABLE markers (
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
);

CREATE INDEX markers_by_expiry ON markers (expires_at);
