"""The payment domain: the outcome taxonomy, payments and follow-ups, card facts. The lowest
layer: it imports nothing of the gateway, the adapters or the emulators."""
