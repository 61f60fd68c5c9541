"""The front door's plumbing, shared by every handler (`gateway/api/`: payments, health, the
console, provider webhooks): error answers and the error middleware, body decoding and strict
JSON, the request models, the free-text card-data refusal, the Idempotency-Key header and
fingerprint, API-key authentication. Nothing here reads the app's keys: the handlers do, so the
keys may name these types without an import running back up."""
