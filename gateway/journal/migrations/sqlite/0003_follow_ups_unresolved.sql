-- deferrable: true (the reconciler's query is right without this index, only slower: a replica
-- of this release may serve before it is applied; see gateway/journal/schema.py)
-- Follow-ups journalled before their call (capture_pending, void_pending, refund_pending) are
-- unresolved too: the reconciler lists them with the payments it owns, through this index.
DROP INDEX IF EXISTS payments_unresolved;
CREATE INDEX payments_unresolved ON payments (updated_at)
    WHERE status IN ('received', 'attempting', 'pending', 'capture_pending', 'void_pending', 'refund_pending');
