"""Card facts the gateway may keep: brand, BIN and last four. Never the full number."""

from __future__ import annotations

from gateway.txlog.redaction import luhn_valid

__all__ = ["card_brand", "luhn_valid"]

_BRANDS: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("amex", ((34, 34), (37, 37))),
    ("mastercard", ((51, 55), (2221, 2720))),
    ("visa", ((4, 4),)),
    ("discover", ((6011, 6011), (65, 65))),
)


def card_brand(number: str) -> str:
    for brand, ranges in _BRANDS:
        for low, high in ranges:
            width = len(str(low))
            if low <= int(number[:width]) <= high:
                return brand
    return "unknown"
