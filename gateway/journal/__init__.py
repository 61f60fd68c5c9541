"""The durable journal: payments, their attempts, and front-door idempotency records."""
