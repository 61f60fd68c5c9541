-- The schema as the gateway created it before versioned migrations (every start ran this with
-- IF NOT EXISTS). Kept idempotent: applied over such a database it changes nothing, or adds
-- what an older release lacked, and the database is adopted as version 1.
CREATE TABLE IF NOT EXISTS payments (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_unresolved ON payments (updated_at)
    WHERE status IN ('received', 'attempting', 'pending');
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    body BLOB,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
CREATE INDEX IF NOT EXISTS idempotency_resource ON idempotency (resource_id);
CREATE TABLE IF NOT EXISTS outbox (
    log_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    claimed_until REAL,
    line BLOB NOT NULL
);
