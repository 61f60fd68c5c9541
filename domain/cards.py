"""Card facts: the Luhn check that tells a card number from other digits, and the brand, BIN and
last four the gateway may keep. Never the full number."""

from __future__ import annotations

__all__ = ["card_brand", "luhn_valid"]

_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)

_BRANDS: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("amex", ((34, 34), (37, 37))),
    ("mastercard", ((51, 55), (2221, 2720))),
    ("visa", ((4, 4),)),
    ("discover", ((6011, 6011), (65, 65))),
)


def luhn_valid(digits: str) -> bool:
    """Return True if `digits` (ASCII digits only) passes the Luhn check used by card PANs."""
    if not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        total += _DOUBLED[d] if i & 1 else d
    return total % 10 == 0


def card_brand(number: str) -> str:
    for brand, ranges in _BRANDS:
        for low, high in ranges:
            width = len(str(low))
            if low <= int(number[:width]) <= high:
                return brand
    return "unknown"
