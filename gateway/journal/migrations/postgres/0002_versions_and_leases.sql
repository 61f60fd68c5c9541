-- One writer per payment, one owner per background job (gateway/journal/store.py):
-- a version per payment row for conditional updates (rows written before this are version 1),
-- the reconciler's lease on an unresolved row, and a per-payment follow-up claim.
-- ADD COLUMN with a constant default is a catalogue change (no table rewrite): the table lock
-- it needs is held for milliseconds.
ALTER TABLE payments
    ADD COLUMN version INTEGER NOT NULL DEFAULT 1,
    ADD COLUMN lease_owner TEXT,
    ADD COLUMN lease_until DOUBLE PRECISION;
CREATE TABLE follow_up_claims (
    payment_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL
);
