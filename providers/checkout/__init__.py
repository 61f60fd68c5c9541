"""Checkout.com-shaped provider: the Unified Payments API (`/payments`, JSON, `Cko-Idempotency-Key`)."""
