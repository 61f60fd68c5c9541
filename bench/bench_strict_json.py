"""What refusing duplicate JSON keys costs per request body (gateway/http/strict_json.py).

    .venv/bin/python bench/bench_strict_json.py [--rounds 20000]

Times, per body shape, plain `orjson.loads` against `strict_json.loads`, and the stdlib with an
`object_pairs_hook` (the naive way to see duplicates) for scale. Shapes: a card payment as the
checkout service sends it (no colon inside a string: the colon count settles it), the same
with a URL and a timestamp in its metadata (the exact member count settles it), and a body that
repeats `amount` (the slow path that names the key). Bounded by --rounds; no I/O.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.http import strict_json  # noqa: E402

PAYMENT = {"amount": 1299, "currency": "EUR", "merchant_reference": "order-8812", "capture": True,
           "description": "2 items", "country": "DE",
           "payment_method": {"type": "card", "number": "4242424242424242", "exp_month": 12, "exp_year": 2030,
                              "cvc": "123", "holder_name": "A Shopper"}}
SHAPES = {
    "payment": orjson.dumps(PAYMENT),
    "payment with colons in strings": orjson.dumps({**PAYMENT, "metadata": {
        "return_url": "https://shop.example/return?o=8812", "placed_at": "2026-11-27T20:00:01Z"}}),
    "payment repeating amount": orjson.dumps(PAYMENT)[:-1] + b',"amount":999999}',
}


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    return dict(pairs)


def per_call_us(fn: Callable[[bytes], object], body: bytes, rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            try:
                fn(body)
            except strict_json.DuplicateKey:
                pass
        best = min(best, time.perf_counter() - start)
    return best / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    rounds = min(parser.parse_args().rounds, 1_000_000)
    candidates: dict[str, Callable[[bytes], object]] = {
        "orjson.loads": orjson.loads,
        "strict_json.loads": strict_json.loads,
        "json.loads(object_pairs_hook)": lambda b: json.loads(b, object_pairs_hook=_pairs),
    }
    for shape, body in SHAPES.items():
        print(f"{shape} ({len(body)} bytes)")
        for name, fn in candidates.items():
            print(f"  {name:32s} {per_call_us(fn, body, rounds):6.2f} µs")


if __name__ == "__main__":
    main()
