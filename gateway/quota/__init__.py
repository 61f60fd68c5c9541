"""Provider quotas kept by the gateway: a token bucket per provider account, so a peak sale
spills over to the next provider before the provider's 429s start.

- `bucket.TokenBucket`: the arithmetic, in memory (one process's bucket, or its share).
- `shared.RedisBuckets`: the fleet's buckets in Redis, refilled and taken by one Lua script.
- `provider.ProviderQuota`: what the router, the payment service and `ProviderClient` use per
  provider: a memory-only peek for routing, a payment's first token reserved from the first
  candidate that has one, and every other request's token taken at the moment of its call
  (shared, or the local share while Redis is away).
"""
