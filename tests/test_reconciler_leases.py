"""A replica restarted in place (SIGKILLed and started again, or rolled by a deploy) takes back
the reconciler leases its previous process held, at its first pass.

Before, every process leased under a name of its own (host, pid, random), so the rows the dead
process had leased (every unresolved row its last pass saw) waited out the whole lease
(`reconciler.LEASE_S`, 120 s) before anyone settled them: in the fleet drill, orphans left
before a rolling restart were settled 128 s after their payment. Now the lease owner is the
transaction log's name (host and log file), which one live process holds at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.app_keys import RECONCILER, STORE
from gateway.config import GatewayConfig
from gateway.journal.postgres import PostgresStore
from gateway.journal.records import PaymentRecord
from gateway.reconciler import LEASE_S
from gateway.txlog.outbox import log_owner
from domain.outcome import PaymentStatus
from tests.conftest import payment

LONG_AGO = time.time() - 3600  # past any deadline: the request that wrote it is gone


def orphan() -> PaymentRecord:
    """What a request killed before its provider call leaves: `attempting`, no provider yet."""
    record = payment(status=PaymentStatus.ATTEMPTING, updated_at=LONG_AGO)
    record.created_at = LONG_AGO
    return record


async def test_a_replica_restarted_in_place_settles_what_its_previous_process_leased(
        pg_dsn: str, make_config: Callable[..., GatewayConfig], start_gateway: Callable[..., Any],
        monkeypatch: Any) -> None:
    monkeypatch.setenv("GATEWAY_PG_DSN", pg_dsn)
    config = make_config(storage={"backend": "postgres"})
    left = orphan()
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        await store.save_payment(left)
        # The previous process of this replica (same host, same log file) leased it in its last
        # pass, then died; another replica's lease is left alone.
        previous = f"reconciler:{log_owner(Path(config.log.dir) / config.log.file)}"
        assert [r.id for r in await store.lease_unresolved(previous, LEASE_S)] == [left.id]
        foreign = orphan()
        await store.save_payment(foreign)
        assert [r.id for r in await store.lease_unresolved("another-host:/logs/transactions.jsonl", LEASE_S)] \
            == [foreign.id]
    finally:
        await store.close()

    client = await start_gateway(config)  # its start-up pass runs before it serves
    app = client.server.app
    assert app[RECONCILER].owner == previous

    settled = await app[STORE].get_payment(left.id)
    assert settled is not None and settled.status is PaymentStatus.FAILED
    assert settled.error_code == "interrupted_before_provider_call"
    untouched = await app[STORE].get_payment(foreign.id)
    assert untouched is not None and untouched.status is PaymentStatus.ATTEMPTING  # still the other's lease
