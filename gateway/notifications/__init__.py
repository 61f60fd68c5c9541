"""Merchant notifications out: the checkout hears every outcome that arrives after its answer.

- `events.py` (pure): which state transition yields which event (`late_event`).
- `records.py`: the outbox row (`Notification`) and a delivery attempt's outcome.
- `outbox.py`: turns a settlement into the rows committed with it (`NotificationOutbox`).
- `signing.py`: the `Gateway-Signature` header.
- `sender.py`: the background task that delivers the rows, at least once, leased per process.

A settler (the reconciler, the provider-webhook processor) ends its transaction with
`PaymentService.commit(record, kind, settled_from=Settling.of(record_before))`: the events are
decided and stored in the same database transaction as the state change, so a crash can neither
lose one nor commit one without its state.
"""
