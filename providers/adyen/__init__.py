"""Adyen-shaped provider: Checkout API v71 (`/payments` and its modifications) over JSON."""
