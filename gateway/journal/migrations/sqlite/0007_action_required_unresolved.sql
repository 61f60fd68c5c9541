-- deferrable: true (the reconciler's query is right without this index, only slower: a replica
-- of this release may serve before it is applied; see gateway/journal/schema.py)
-- A payment waiting for its shopper (3-D Secure: action_required) is unresolved too: the
-- reconciler expires an abandoned one, and lists it through this index.
DROP INDEX IF EXISTS payments_unresolved;
CREATE INDEX payments_unresolved ON payments (updated_at)
    WHERE status IN ('received', 'attempting', 'pending', 'capture_pending', 'void_pending', 'refund_pending',
                     'action_required');
