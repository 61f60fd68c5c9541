-- Merchant notifications out (gateway/notifications/): one row per event, inserted in the same
-- transaction as the state change it reports, leased by one sender at a time (FOR UPDATE SKIP
-- LOCKED), kept after delivery for `gateway webhooks list|replay`. A new table: no lock on any
-- table live payments use.
CREATE TABLE notifications (
    event_id TEXT COLLATE "C" PRIMARY KEY,
    payment_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    body BYTEA NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    retry_from DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION,
    delivered_at DOUBLE PRECISION,
    last_status INTEGER,
    last_error TEXT
);
-- What the senders ask for: pending rows that are due, soonest first.
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE state = 'pending';
CREATE INDEX notifications_created ON notifications (created_at);
