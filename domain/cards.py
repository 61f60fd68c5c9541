"""Card facts: the Luhn check that tells a card number from other digits, the networks' number
ranges, and how much of a number the gateway may show or keep (PCI DSS truncation). Never the
full number."""

from __future__ import annotations

import functools
import secrets
import string

__all__ = [
    "PAN_MAX",
    "PAN_MIN",
    "card_brand",
    "card_like",
    "digitless_tag",
    "issuer_lengths",
    "issuer_plausible",
    "luhn_valid",
    "mask_pan",
    "truncate_pan",
    "visible_digits",
]

PAN_MIN, PAN_MAX = 12, 19
# PCI DSS 3.4: a truncated number hides at least this many digits, whatever its length.
MIN_HIDDEN = 6
_BIN, _LAST = 6, 4

# Luhn: each digit in a doubled position replaced by the digit sum of its double.
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")

_Ranges = tuple[tuple[int, int], ...]
# (network, IIN ranges, the lengths its cards are issued in), from the networks' published
# ranges; rare lengths (a 17-digit UnionPay) are left out, as every length let in here makes a
# window of a long reference pass for a card more often. The first match names the brand, so the
# four brands routes match on come first, as before.
_NETWORKS: tuple[tuple[str, _Ranges, frozenset[int]], ...] = (
    ("amex", ((34, 34), (37, 37)), frozenset({15})),
    ("mastercard", ((51, 55), (2221, 2720)), frozenset({16})),
    ("visa", ((4, 4),), frozenset({13, 16, 19})),
    ("discover", ((6011, 6011), (644, 649), (65, 65)), frozenset({16, 19})),
    ("diners", ((300, 305), (36, 36), (38, 39)), frozenset({14, 16, 19})),
    ("jcb", ((3528, 3589),), frozenset({16, 19})),
    ("unionpay", ((62, 62), (81, 81)), frozenset({16, 19})),
    ("mir", ((2200, 2204),), frozenset({16})),
    ("maestro", ((5018, 5018), (5020, 5020), (5038, 5038), (5893, 5893), (6304, 6304), (6759, 6759), (6761, 6763)),
     frozenset(range(12, 20))),
    ("rupay", ((60, 60), (82, 82), (508, 508)), frozenset({16})),
)


def luhn_valid(digits: str) -> bool:
    """Return True if `digits` (ASCII digits only) passes the Luhn check used by card PANs."""
    if not (digits.isascii() and digits.isdigit()):
        return False
    # Summed as ASCII codes (48 = "0") in C: this runs for every long digit run the log meets.
    raw = digits.encode()
    return (sum(raw[-1::-2]) + sum(raw[-2::-2].translate(_DOUBLED)) - 48 * len(raw)) % 10 == 0


def card_like(digits: str) -> bool:
    """Whether a run of digits found in text may be a card number: Luhn-valid, and a number a
    card can begin with (ISO/IEC 7812's major industry identifier, its first digit): never 0
    (reserved), 1 only for UATP's 15-digit airline cards. Luhn alone passes one digit string in
    ten, and the long numbers merchants put in references and idempotency keys are mostly
    epoch timestamps (``order-1733058000123``) and zero-padded counters, which begin with 1 or 0:
    without this rule one such reference in ten was refused as card data. Every other first
    digit still counts, not only the networks this module lists, so a card of an unlisted
    network is still hidden."""
    first = digits[:1]
    if first == "0" or (first == "1" and len(digits) != 15):
        return False
    return luhn_valid(digits)


def digitless_tag(length: int = 8) -> str:
    """A random tag of lowercase letters, for the references and Idempotency-Keys a load
    generator makes from a tag and a counter. The detector reads digits across separators, so a
    hex tag can make a card number with the counter ('f4661919' and payment 13 are a Luhn-valid
    14 digits): the gateway then rightly refuses every tenth request as card data. Letters leave
    only the counter's digits, never card-long."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(length))


def _in_ranges(digits: str, ranges: _Ranges) -> bool:
    for low, high in ranges:
        width = len(str(low))
        if len(digits) >= width and low <= int(digits[:width]) <= high:
            return True
    return False


def card_brand(number: str) -> str:
    for brand, ranges, _ in _NETWORKS:
        if _in_ranges(number, ranges):
            return brand
    return "unknown"


@functools.lru_cache(maxsize=10_000)  # keyed by at most 4 digits: every prefix fits
def issuer_lengths(prefix: str) -> frozenset[int]:
    """The lengths card networks issue numbers in that start with `prefix` (4 digits decide:
    no range in the table is longer)."""
    lengths: frozenset[int] = frozenset()
    for _, ranges, network_lengths in _NETWORKS:
        if _in_ranges(prefix, ranges):
            lengths |= network_lengths
    return lengths


def issuer_plausible(digits: str) -> bool:
    """True if some card network issues numbers with this prefix and this length.

    Luhn alone passes one digit string in ten; a network's range *and* length on top of it is
    what tells a card number apart from other long numbers where both can occur (a window inside
    a longer run of digits). Networks not in the table are not recognised here."""
    return len(digits) in issuer_lengths(digits[:4])


def visible_digits(length: int) -> tuple[int, int]:
    """How many leading and trailing digits of a `length`-digit number may be shown.

    At least `MIN_HIDDEN` (6) digits stay hidden whatever the length: the last 4 are kept
    first, then as much of the 6-digit BIN as still fits. 16 digits show 6 + 4, 13 show 3 + 4,
    12 show 2 + 4, 10 show 0 + 4, 6 or fewer show nothing.
    """
    shown = max(0, length - MIN_HIDDEN)
    last = min(_LAST, shown)
    return min(_BIN, shown - last), last


def truncate_pan(number: str) -> tuple[str, str]:
    """The leading and trailing digits the journal may keep (its `card_bin` and `card_last4`)."""
    lead, last = visible_digits(len(number))
    return number[:lead], number[len(number) - last :]


def mask_pan(pan: str) -> str:
    """Mask a card number to the digits `visible_digits` allows, separators dropped:
    ``"4242 4242 4242 4242"`` -> ``"424242******4242"``, a 12-digit number -> ``"42******4242"``."""
    digits = "".join(ch for ch in pan if "0" <= ch <= "9")
    lead, last = visible_digits(len(digits))
    return digits[:lead] + "*" * (len(digits) - lead - last) + digits[len(digits) - last :]
