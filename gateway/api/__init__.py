"""The HTTP front door: auth, validation, idempotency, then the payment service."""
