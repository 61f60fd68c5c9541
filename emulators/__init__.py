"""Local stand-ins for the providers: real HTTP(S) servers on loopback that speak each
provider's API shape, keep a ledger of every charge, and take fault injection at run time.

Test and drill infrastructure, not adapters: the gateway never imports these on its request
path. Each provider's emulator supplies only what differs (paths, auth, bodies, error shapes,
idempotency policy, webhook shapes, signature and retry schedule); the shared machinery (ledger,
faults, idempotency, server, webhook sender) behaves the same for all of them.
"""
