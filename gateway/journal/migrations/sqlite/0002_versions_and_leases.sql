-- One writer per payment, one owner per background job (gateway/journal/store.py):
-- a version per payment row for conditional updates (rows written before this are version 1),
-- and the reconciler's lease on an unresolved row. (A follow-up's claim is its payment row's own
-- conditional move to `<op>_pending`, written with the caller's key: no table of its own.)
ALTER TABLE payments ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE payments ADD COLUMN lease_owner TEXT;
ALTER TABLE payments ADD COLUMN lease_until REAL;
