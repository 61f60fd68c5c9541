"""Provider webhooks in: `POST /v1/webhooks/{provider}`.

Journal first, answer fast, process from the journal: the route verifies the provider's
signature on the raw body (`providers/<kind>/webhook.py`), journals each notification item once
per (provider, event id) and answers what the provider wants (Adyen `[accepted]` within its
10 s); the processor (`processor.py`) leases journalled events, fleet-safe like the
reconciler's rows, and applies each through the payment's state machine (`rules.py`) with
conditional writes. Webhooks settle what status queries cannot: Adyen's pending authorisations
and every provider's asynchronous follow-ups (`<op>_pending` until their notification).
"""
