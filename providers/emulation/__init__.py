"""Shared machinery of the provider emulators: ledger, fault injection, idempotency, server.

Each provider's emulator supplies only what differs (paths, auth, bodies, error shapes,
idempotency policy); everything tests and drills rely on behaves the same for all of them.
"""
