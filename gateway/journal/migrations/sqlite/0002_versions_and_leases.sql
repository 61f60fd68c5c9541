-- One writer per payment, one owner per background job (gateway/journal/store.py):
-- a version per payment row for conditional updates (rows written before this are version 1),
-- the reconciler's lease on an unresolved row, and a per-payment follow-up claim.
ALTER TABLE payments ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE payments ADD COLUMN lease_owner TEXT;
ALTER TABLE payments ADD COLUMN lease_until REAL;
CREATE TABLE follow_up_claims (
    payment_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    lease_until REAL NOT NULL
) WITHOUT ROWID;
