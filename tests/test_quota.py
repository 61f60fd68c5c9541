"""Provider quotas kept by the gateway (gateway/quota/): the bucket, its configuration, the
router's over_quota skip, spill-over before the provider's 429s, follow-ups bound to their
provider, the 503 when every candidate is at its quota, and the bucket shared through Redis by
real `gateway serve` processes (and kept locally, as a share, while Redis is away)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis import asyncio as aioredis

from emulators.quota import QuotaPlan
from emulators.server import EmulatorServer
from gateway.app_keys import CONFIG, POOL
from gateway.config import ConfigError, RouteConfig
from gateway.emulator_launch import account_quota
from gateway.quota.bucket import TokenBucket
from gateway.quota.provider import LOCAL, SHARED, ProviderQuota
from gateway.quota.shared import RedisBuckets
from gateway.router import OVER_QUOTA, Router, RoutingFacts
from tests.conftest import card_payment, charges, entries, idem, metrics_text, pay, txlog
from tests.redis_server import RedisServer
from tests.test_breaker_sync_hung import _hung
from tests.test_workers import host  # noqa: F401 (fixture)
from tests.test_scale_out import Replica, eventually, fleet, fleet_data, own_redis  # noqa: F401 (fixtures)

EUR = RoutingFacts(amount=1000, currency="EUR", country="DE", brand="visa", merchant="m1")
ACCOUNT_PER_S = 20.0  # the emulator's quota (the provider's account) ...
KEPT_PER_S = 18.0  # ... and what the gateway keeps of it
LOAD = 200
CONCURRENCY = 16


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_lets_its_burst_through_then_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, capacity=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert not bucket.has_token()
    assert bucket.take() == pytest.approx(0.1)  # nothing spent: the next token in 1/rate
    clock.now = 0.05
    assert bucket.wait_s() == pytest.approx(0.05)
    clock.now = 0.1
    assert bucket.take() == 0.0
    clock.now = 100.0
    assert [bucket.take() for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # never more than its capacity
    assert not bucket.has_token()


def test_quota_fields_are_validated_with_their_path(engine_config) -> None:
    with pytest.raises(ConfigError, match=r"providers\.primary: .*rate_limit_burst needs rate_limit_per_s"):
        engine_config(providers={"primary": {"rate_limit_burst": 5}})
    with pytest.raises(ConfigError, match=r"providers\.primary\.rate_limit_per_s: "):
        engine_config(providers={"primary": {"rate_limit_per_s": 0}})
    with pytest.raises(ConfigError, match=r"providers\.primary\.rate_limit_burst: "):
        engine_config(providers={"primary": {"rate_limit_per_s": 5, "rate_limit_burst": 0}})
    with pytest.raises(ConfigError, match=r"providers\.primary\.rate_limit_per_s: "):
        engine_config(providers={"primary": {"rate_limit_per_s": True}})  # YAML's `true` is no rate
    with pytest.raises(ConfigError, match=r"providers\.primary\.rate_limit_per_s: .*finite"):
        engine_config(providers={"primary": {"rate_limit_per_s": float("nan")}})
    with pytest.raises(ConfigError, match=r"routes\.0\.demote_above_p99_ms: "):
        engine_config(route={"demote_above_p99_ms": -1})
    config = engine_config(providers={"primary": {"rate_limit_per_s": 2.5}})
    assert config.providers["primary"].quota_capacity == 3  # one second's worth, rounded up
    assert config.providers["backup"].quota_capacity is None
    # The dev stack's emulator for an account enforces the quota the configuration gives it.
    assert account_quota(config.providers["primary"]) == QuotaPlan(rate_limit_per_s=2.5)
    assert account_quota(config.providers["backup"]) is None


def test_the_router_skips_a_provider_at_its_quota_and_says_when_the_first_token_comes() -> None:
    at_quota = {"a"}
    router = Router([RouteConfig(name="r", providers=("a", "b"))],
                    lambda p: OVER_QUOTA if p in at_quota else None, quota_wait=lambda p: 0.25 if p == "a" else None)
    decision = router.route(EUR)
    assert decision.candidates == ("b",) and decision.skipped == (("a", OVER_QUOTA),)
    assert decision.quota_wait_s is None  # someone can take it: no wait
    at_quota.add("b")
    decision = router.route(EUR)
    assert decision.candidates == () and decision.quota_wait_s == 0.25


def _quota_config(engine_config, **changes: Any):  # type: ignore[no-untyped-def]
    return engine_config(providers={"primary": {"rate_limit_per_s": KEPT_PER_S},
                                    **changes.pop("providers", {})}, **changes)


async def _load(url_or_client: Any, n: int, concurrency: int) -> list[tuple[int, dict[str, Any]]]:
    """`n` payments, `concurrency` at a time; over a test client, or round robin over base URLs."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    answers: list[tuple[int, dict[str, Any]]] = []

    async def one(session: Any, prefix: str, i: int) -> None:
        resp = await session.post(f"{prefix}/v1/payments", json=card_payment(merchant_reference=f"order-{i}"),
                                  headers=idem())
        answers.append((resp.status, await resp.json()))

    async def worker(session: Any, prefixes: list[str]) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await one(session, prefixes[i % len(prefixes)], i)

    if isinstance(url_or_client, list):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(worker(session, url_or_client) for _ in range(concurrency)))
    else:
        await asyncio.gather(*(worker(url_or_client, [""]) for _ in range(concurrency)))
    return answers


def _books_agree(answers: list[tuple[int, dict[str, Any]]], stripes: dict[str, EmulatorServer]) -> None:
    """Every payment approved, charged exactly once, at the provider its journal names."""
    for status, doc in answers:
        assert status == 201 and doc["status"] == "approved", doc
        for name, server in stripes.items():
            assert len(charges(server, doc["id"])) == (1 if name == doc["provider"] else 0), (name, doc)


def _journal_rows(client: Any) -> int:
    conn = sqlite3.connect(f"file:{client.app[CONFIG].storage.sqlite_path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM payments").fetchone()[0])
    finally:
        conn.close()


def _within_quota(charged: int, seconds: float) -> bool:
    """At most a full bucket plus the kept rate over the time the load took."""
    return charged <= KEPT_PER_S * (1 + seconds) + 1


async def _warm(url_or_client: Any, stripes: dict[str, EmulatorServer]) -> list[tuple[int, dict[str, Any]]]:
    """A peak finds its connections open: one payment per connection the load will use, before
    the account's quota is set (so it starts full). Otherwise the first tokens are taken while
    the mTLS handshakes run, and their requests reach the provider bunched, later than taken
    (README: the cold start)."""
    answers = await _load(url_or_client, CONCURRENCY, CONCURRENCY)
    stripes["primary"].emulator.quota.set(QuotaPlan(rate_limit_per_s=ACCOUNT_PER_S))
    return answers


async def test_load_above_the_quota_spills_over_before_the_providers_429s(engine_config, start_gateway,
                                                                          stripes) -> None:
    client = await start_gateway(_quota_config(engine_config))
    warm = await _warm(client, stripes)
    started = time.monotonic()
    answers = await _load(client, LOAD, CONCURRENCY)
    seconds = time.monotonic() - started
    assert len(answers) == LOAD
    _books_agree(warm + answers, stripes)
    assert stripes["primary"].emulator.quota.limited == 0, "no request met the account's 429"
    at_primary = sum(1 for _, doc in answers if doc["provider"] == "primary")
    assert 0 < at_primary < LOAD and _within_quota(at_primary, seconds), (at_primary, seconds)
    spilled = [doc for _, doc in warm + answers if doc["provider"] == "backup"]
    assert all(doc["attempts"][0] == {**doc["attempts"][0], "provider": "primary", "outcome": "skipped",
                                      "raw_code": OVER_QUOTA} for doc in spilled)
    assert all(a["http_status"] != 429 for _, doc in answers for a in doc["attempts"])
    text = await metrics_text(client)
    assert f'gateway_quota_spillovers_total{{provider="primary"}} {float(len(spilled))}' in text
    assert 'gateway_quota_shared{provider="primary"} 0.0' in text


async def test_every_candidate_at_its_quota_is_a_503_with_retry_after(engine_config, start_gateway,
                                                                                       stripes) -> None:
    tiny = {"rate_limit_per_s": 4, "rate_limit_burst": 1}  # a token every 250 ms
    client = await start_gateway(engine_config(every_provider=tiny, engine={"quota_max_wait_ms": 0}))
    first, second = await pay(client), await pay(client)
    assert (first[1]["provider"], second[1]["provider"]) == ("primary", "backup")
    headers = idem()
    resp = await client.post("/v1/payments", json=card_payment(), headers=headers)
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["code"] == "overloaded"
    assert [len(charges(s, d["id"])) for s in stripes.values() for d in (first[1], second[1])].count(1) == 2
    assert 'gateway_shed_total{reason="quota"} 1.0' in await metrics_text(client)

    # The same key again once a token is back: a fresh payment (the key was never claimed).
    await eventually(lambda: _has_token(client, "primary"), "a token is back")
    status, doc = await pay(client, headers=headers)
    assert status == 201 and doc["provider"] == "primary"


async def test_more_payments_at_once_than_tokens_charge_once_each_and_shed_the_rest(engine_config, start_gateway,
                                                                                     stripes) -> None:
    """Concurrent payments all see a token at routing; each token goes to one payment only (the
    reservation), and the one left without is answered 503 with its key free, never a failed
    payment stored for its key."""
    tiny = {"rate_limit_per_s": 0.2, "rate_limit_burst": 1}  # one token each, the next in 5 s
    client = await start_gateway(engine_config(every_provider=tiny, engine={"quota_max_wait_ms": 0}))
    keys = [idem() for _ in range(3)]
    resps = await asyncio.gather(*(client.post("/v1/payments", json=card_payment(), headers=h) for h in keys))
    statuses = sorted(r.status for r in resps)
    assert statuses == [201, 201, 503], statuses
    shed = next(r for r in resps if r.status == 503)
    assert 1 <= int(shed.headers["Retry-After"]) <= 5 and (await shed.json())["code"] == "overloaded"
    docs = [await r.json() for r in resps if r.status == 201]
    assert sorted(d["provider"] for d in docs) == ["backup", "primary"]
    assert sum(len(s.emulator.ledger.entries()) for s in stripes.values()) == 2
    assert all(s.emulator.quota.limited == 0 for s in stripes.values())
    # The caller told "not now" has no failed payment in the books: the journal and the log
    # hold the two payments made, nothing for the one shed.
    assert _journal_rows(client) == 2
    lines = [line for line in await txlog(client) if line["event"] == "payment"]
    assert sorted(line["payment_id"] for line in lines) == sorted(d["id"] for d in docs)


async def test_a_payment_with_no_time_for_a_call_spends_no_token(engine_config, start_gateway, stripes) -> None:
    """A tiny Request-Timeout: no call is made, so no token of any provider's quota is spent
    (else any client could drain the quotas with such requests and the fleet shed everyone)."""
    tiny = {"rate_limit_per_s": 0.2, "rate_limit_burst": 1}  # one token each, the next in 5 s
    client = await start_gateway(engine_config(every_provider=tiny, engine={"quota_max_wait_ms": 0}))
    for _ in range(3):
        resp = await client.post("/v1/payments", json=card_payment(), headers={**idem(), "Request-Timeout": "1"})
        doc = await resp.json()
        assert all(a["raw_code"] == "deadline_exceeded" for a in doc["attempts"]), doc
    assert sum(len(s.emulator.ledger.entries()) for s in stripes.values()) == 0
    status, doc = await pay(client)
    assert (status, doc["provider"]) == (201, "primary"), "the primary's token is still there"


async def test_a_payment_waits_for_a_token_that_comes_within_its_short_wait(engine_config, start_gateway,
                                                                            stripes) -> None:
    tiny = {"rate_limit_per_s": 4, "rate_limit_burst": 1}
    client = await start_gateway(engine_config(every_provider=tiny, engine={"quota_max_wait_ms": 1000}))
    answers = [await pay(client) for _ in range(3)]
    assert [(status, doc["provider"]) for status, doc in answers] == [(201, "primary"), (201, "backup"),
                                                                      (201, "primary")]


async def _has_token(client: Any, provider: str) -> bool:
    quota = client.app[POOL][provider].quota
    return quota is not None and quota.has_token()


async def test_a_follow_up_waits_for_its_providers_token_and_never_goes_elsewhere(engine_config, start_gateway,
                                                                                  stripes) -> None:
    client = await start_gateway(engine_config(providers={"primary": {"rate_limit_per_s": 1,
                                                                      "rate_limit_burst": 1}}))
    status, doc = await pay(client, card_payment(capture=False))
    assert status == 201 and doc["provider"] == "primary"
    assert not await _has_token(client, "primary"), "the payment took the one token: the capture must wait"
    resp = await client.post(f"/v1/payments/{doc['id']}/capture", json={}, headers=idem())
    assert resp.status == 200, await resp.text()
    captured = await resp.json()
    assert captured["status"] == "captured"
    assert [a["provider"] for a in captured["attempts"] if a["operation"] == "capture"] == ["primary"]
    assert not entries(stripes["backup"], doc["id"])


async def test_a_follow_up_whose_token_comes_after_its_deadline_is_a_503(engine_config, start_gateway,
                                                                         stripes) -> None:
    client = await start_gateway(engine_config(providers={"primary": {"rate_limit_per_s": 0.05,
                                                                      "rate_limit_burst": 1}},
                                               engine={"deadline_ms": 2000}))
    status, doc = await pay(client, card_payment(capture=False))
    assert status == 201 and doc["provider"] == "primary"
    started = time.monotonic()
    resp = await client.post(f"/v1/payments/{doc['id']}/capture", json={}, headers=idem())
    assert time.monotonic() - started < 2.0, "refused at once, not after waiting out its deadline"
    # A token every 20 s: the answer says when the capture can be made, not "1".
    assert resp.status == 503 and 15 <= int(resp.headers["Retry-After"]) <= 20, resp.headers["Retry-After"]
    assert (await resp.json())["code"] == "provider_unavailable"
    read = await (await client.get(f"/v1/payments/{doc['id']}", headers=idem())).json()
    assert read["status"] == "approved" and read["captured_amount"] == 0
    assert not entries(stripes["backup"], doc["id"])
    assert 'gateway_quota_denied_total{provider="primary"} 1.0' in await metrics_text(client)


# -- shared through Redis, by real processes ---------------------------------------------------------


async def test_two_processes_share_the_bucket_through_redis(fleet_data, stripes, tmp_path: Path) -> None:
    """Two `gateway serve` processes, each told the account keeps 18/s: together they stay under
    the account's 20/s (two local buckets would send up to 36/s) and spill the excess over."""
    quota = {"primary": {"rate_limit_per_s": KEPT_PER_S}}
    one = Replica("one", fleet_data("one", providers=quota), tmp_path)
    two = Replica("two", fleet_data("two", providers=quota), tmp_path)
    await asyncio.gather(one.process.start(), two.process.start())
    try:
        warm = await _warm([one.url, two.url], stripes)
        started = time.monotonic()
        answers = await _load([one.url, two.url], LOAD, CONCURRENCY)
        seconds = time.monotonic() - started
        async with aiohttp.ClientSession() as session:
            for replica in (one, two):
                async with session.get(f"{replica.url}/metrics") as resp:
                    assert 'gateway_quota_shared{provider="primary"} 1.0' in await resp.text()
    finally:
        await asyncio.gather(one.process.stop(), two.process.stop())
    _books_agree(warm + answers, stripes)
    assert stripes["primary"].emulator.quota.limited == 0, "no request met the account's 429"
    at_primary = sum(1 for _, doc in answers if doc["provider"] == "primary")
    assert 0 < at_primary < LOAD and _within_quota(at_primary, seconds), (at_primary, seconds)


async def test_the_workers_of_one_host_each_keep_their_share_without_redis(host, stripes) -> None:
    """`serve --workers 2` without Redis: each worker keeps half the account's 18/s, so the host
    as a whole stays under the account's 20/s."""
    gateway = await host(providers={"primary": {"rate_limit_per_s": KEPT_PER_S}})
    warm = await _warm([gateway.url], stripes)
    started = time.monotonic()
    answers = await _load([gateway.url], LOAD, CONCURRENCY)
    seconds = time.monotonic() - started
    _books_agree(warm + answers, stripes)
    assert stripes["primary"].emulator.quota.limited == 0, "no request met the account's 429"
    at_primary = sum(1 for _, doc in answers if doc["provider"] == "primary")
    assert 0 < at_primary < LOAD and _within_quota(at_primary, seconds), (at_primary, seconds)


async def test_redis_away_means_this_process_keeps_its_share_until_redis_is_back(
        fleet, own_redis: RedisServer, start_gateway, stripes) -> None:
    config = fleet("one", providers={"primary": {"rate_limit_per_s": 10}}, engine={"replicas": 2})
    client = await start_gateway(config)
    quota = client.app[POOL]["primary"].quota
    assert quota is not None and quota.mode == SHARED
    await own_redis.stop()
    started = time.monotonic()
    answers = [await pay(client) for _ in range(12)]
    seconds = time.monotonic() - started
    assert all(status == 201 for status, _ in answers)
    assert quota.mode == LOCAL
    at_primary = sum(1 for _, doc in answers if doc["provider"] == "primary")
    # Its share: 10/s over 2 replicas, a bucket of 5 (the whole quota would let 10 through at once).
    assert 5 <= at_primary <= min(11, 5 + 5 * seconds + 1), (at_primary, seconds)
    assert 'gateway_quota_shared{provider="primary"} 0.0' in await metrics_text(client)
    await own_redis.start()
    await eventually(lambda: _shared(quota), "the bucket is shared again once Redis answers", timeout_s=10)
    status, doc = await pay(client)
    assert status == 201


async def _shared(quota: Any) -> bool:
    return bool(quota.mode == SHARED)


async def test_a_hung_redis_costs_one_short_timeout_then_payments_take_the_local_share(
        fleet, own_redis: RedisServer, start_gateway, stripes) -> None:
    """A stopped Redis keeps its connections open and never answers: the first take times out
    (TIMEOUT_S), and until a PING answers again no payment asks Redis at all."""
    client = await start_gateway(fleet("one", providers={"primary": {"rate_limit_per_s": 50}}))
    quota = client.app[POOL]["primary"].quota
    assert quota is not None and quota.shared is not None
    status, _ = await pay(client)
    assert status == 201 and quota.mode == SHARED and quota.shared.errors == 0
    # A new shared bucket starts empty (the account may have spent its burst a moment ago):
    # let it fill before the primary is expected to take every payment.
    await eventually(lambda: _has_token(client, "primary"), "the shared bucket has filled a little")
    async with _hung(own_redis):
        answers = [await pay(client) for _ in range(5)]
        assert all(status == 201 and doc["provider"] == "primary" for status, doc in answers)
        assert quota.mode == LOCAL
        assert quota.shared.errors == 1, "one take timed out; the others did not ask Redis"
    await eventually(lambda: _shared(quota), "shared again once Redis answers", timeout_s=10)


async def test_a_providers_429s_hold_it_off_for_its_retry_after_and_never_open_its_breaker(engine_config,
                                                                                          start_gateway,
                                                                                          stripes) -> None:
    """No quota configured, the account's limit passed: each 429 (not processed) holds the
    primary off for its Retry-After while payments go to the backup, and the primary's breaker
    stays closed (a quota's 429s used to open it, taking the primary out for its reset time)."""
    client = await start_gateway(engine_config())
    await _load(client, CONCURRENCY, CONCURRENCY)  # connections open
    stripes["primary"].emulator.quota.set(QuotaPlan(rate_limit_per_s=ACCOUNT_PER_S / 4))
    answers = await _load(client, LOAD // 2, CONCURRENCY)
    _books_agree(answers, stripes)
    limited = stripes["primary"].emulator.quota.limited
    assert limited > 0, "the load passed the account's quota"
    held = [doc for _, doc in answers if any(a["http_status"] == 429 for a in doc["attempts"])]
    assert held and all(doc["provider"] == "backup" for doc in held), "a 429 moves the payment on"
    after_429 = [a for _, doc in answers for a in doc["attempts"] if a["raw_code"] == OVER_QUOTA]
    assert after_429, "later payments skip the held-off primary instead of meeting the 429 again"
    assert limited < len(answers) / 2, limited
    assert client.app[POOL]["primary"].breaker.state == "closed"
    text = await metrics_text(client)
    assert f'gateway_provider_rate_limited_total{{provider="primary"}} {float(limited)}' in text


def test_the_local_share_starts_empty_when_redis_goes_away() -> None:
    """While the shared bucket answers, this process's local share is kept empty: if Redis goes
    away it refills from that moment at the share's rate instead of starting full (the outside
    attack saw a burst of the account's 429s at each switch to local)."""
    quota = ProviderQuota("primary", 20.0, 20, share=2)
    assert quota.take_local() == 0.0, "alone, a fresh local bucket starts full"
    quota.observe(15.0)  # a shared answer: the fleet's bucket holds 15
    assert quota.take_local() > 0.0, "the local share holds nothing at the switch"


class _Log:
    """The ops log's sink, kept: what RedisBuckets said."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def warning(self, event: str, **_fields: Any) -> None:
        self.events.append(event)

    def info(self, event: str, **_fields: Any) -> None:
        self.events.append(event)


async def test_a_key_that_is_no_bucket_is_replaced_and_the_quota_stays_shared() -> None:
    """Something else wrote our key (a string where the bucket's hash belongs): every take failed
    with WRONGTYPE and the bucket flapped between shared and local, a warning each 0.2 s."""
    server = RedisServer()
    await server.start()
    log = _Log()
    buckets = RedisBuckets(server.url, "gw-test", log=log)
    await buckets.start()
    try:
        redis = aioredis.from_url(server.url)
        await redis.set(buckets.key("primary"), "garbage")
        await redis.set(buckets.key("backup"), "garbage")
        answer = await buckets.take_first([buckets.key("primary"), buckets.key("backup")], ["10", "10", "10", "10"])
        assert answer == (None, [0.0, 0.0]), "fresh buckets start empty"
        assert await redis.type(buckets.key("primary")) == b"hash"
        assert buckets.usable and buckets.errors == 0 and log.events == []
        await redis.aclose()
    finally:
        await buckets.close()
        await server.stop()


async def test_a_redis_that_answers_ping_but_fails_every_take_is_retried_ever_more_slowly() -> None:
    """Out of memory (maxmemory reached, noeviction): PING answers, every write is refused. The
    backoff starts over only at a take that succeeds, so the warnings thin out instead of coming
    every 0.2 s."""
    server = RedisServer()
    await server.start()
    log = _Log()
    buckets = RedisBuckets(server.url, "gw-test", log=log)
    await buckets.start()
    redis = aioredis.from_url(server.url)
    try:
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", "1")
        keys, limits = [buckets.key("primary")], ["10", "10"]
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # a payment every 20 ms for 3 s
            await buckets.take_first(keys, limits)
            await asyncio.sleep(0.02)
        warnings = log.events.count("quota_redis_unavailable")
        assert 1 <= warnings <= 5, log.events  # backoffs 0.2, 0.4, 0.8, 1.6 s: not 15 flaps
        await redis.config_set("maxmemory", "0")
        await eventually(lambda: _taken(buckets, keys, limits), "takes succeed once Redis has memory again",
                         timeout_s=10)
    finally:
        await redis.aclose()
        await buckets.close()
        await server.stop()


async def _taken(buckets: RedisBuckets, keys: list[str], limits: list[str]) -> bool:
    return await buckets.take_first(keys, limits) is not None
