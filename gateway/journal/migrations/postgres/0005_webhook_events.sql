-- Provider webhooks in (gateway/webhooks): one row per notification item, journalled before the
-- delivery is answered and applied from here by the processor (leased with FOR UPDATE SKIP
-- LOCKED, like the reconciler's rows). (provider, event_id) is the dedupe key: a repeated
-- delivery inserts nothing. `doc` is the parsed, redacted event, never the raw body.
CREATE TABLE webhook_events (
    provider TEXT NOT NULL,
    event_id TEXT NOT NULL,
    state TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    payment_id TEXT,
    processed_at DOUBLE PRECISION,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION,
    doc BYTEA NOT NULL,
    PRIMARY KEY (provider, event_id)
);
CREATE INDEX webhook_events_pending ON webhook_events (received_at) WHERE state = 'pending';
CREATE INDEX webhook_events_by_state ON webhook_events (state, received_at);
