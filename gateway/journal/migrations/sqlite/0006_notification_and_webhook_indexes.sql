-- deferrable: true (the senders' and the webhook processor's queries are right without these
-- indexes, only slower: a replica of this release may serve before they are applied; see
-- gateway/journal/schema.py)
-- What the notification senders ask for: pending rows that are due, soonest first; and
-- `gateway webhooks list --since`.
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (next_attempt_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS notifications_created ON notifications (created_at);
-- What the webhook processor leases (pending events, oldest first) and `gateway webhooks-in list --state`.
CREATE INDEX IF NOT EXISTS webhook_events_pending ON webhook_events (received_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_events_by_state ON webhook_events (state, received_at);
