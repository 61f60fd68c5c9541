"""Stripe-shaped provider: PaymentIntents over form-encoded HTTP."""
