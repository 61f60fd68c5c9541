"""Scrub card data and secrets out of log events (DESIGN rule 6).

The `Redactor` is a structlog processor, so it runs on every event of every logger built by
`gateway.txlog.logger`; no call site has to remember to redact. It works on a *copy*:
structlog only shallow-copies the event dict, so scrubbing nested containers in place would
corrupt the caller's own payment data.

Two independent nets catch a secret:

* by key name: the value under a sensitive key (``cvc``, ``api_key``, ``encryptedCardNumber``,
  ...) is replaced whole, whatever its type;
* by content: every string (values and dict keys) is scanned for Luhn-valid card numbers,
  Stripe-style secret keys, bearer tokens and PEM private keys.

It runs once per transaction on the request path, so the scan is one precompiled regex pass
per string, skipped for strings too short to hold any secret and for non-string scalars.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["DEFAULT_SENSITIVE_KEYS", "REDACTED", "Redactor", "luhn_valid", "mask_pan"]

REDACTED = "[REDACTED]"

DEFAULT_SENSITIVE_KEYS: frozenset[str] = frozenset(
    {
        "number",
        "card_number",
        "pan",
        "cvc",
        "cvv",
        "cvc2",
        "cvv2",
        "security_code",
        "exp_month",
        "exp_year",
        "expiry",
        "expiry_date",
        "expiry_month",
        "expiry_year",
        "api_key",
        "x-api-key",
        "authorization",
        "proxy-authorization",
        "password",
        "passphrase",
        "secret",
        "private_key",
        "client_secret",
        "webhook_secret",
        "token",
        "access_token",
        "refresh_token",
        "encrypted_card_number",
        "encrypted_security_code",
        "encrypted_expiry_month",
        "encrypted_expiry_year",
    }
)

# Strings shorter than the shortest secret the scan can recognise ("whsec_x") are left alone.
_MIN_SCAN_LEN = 7
# Deeper nesting than this is not payment data; it is replaced rather than recursed into, so a
# cyclic or pathological structure cannot crash the logging call.
_MAX_DEPTH = 32
_TOO_DEEP = "[TOO DEEP]"

_PAN_MIN, _PAN_MAX = 12, 19
_INT_PAN_LOW, _INT_PAN_HIGH = 10 ** (_PAN_MIN - 1), 10**_PAN_MAX

# One alternation, one pass per string. Leftmost match wins, so a PEM block is consumed before
# its base64 body could be inspected, and a key or token swallows any digits it contains.
_SCAN = re.compile(
    r"(?P<pem>-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z))"
    r"|(?P<key>(?:sk|rk)_(?:live|test)_|whsec_)[A-Za-z0-9]+"
    r"|(?P<bearer>(?i:bearer))[ \t]+[A-Za-z0-9\-._~+/]+=*"
    r"|(?P<digits>[0-9](?:[ -]?[0-9]){%d,})" % (_PAN_MIN - 1),
    re.DOTALL,
)
_SEPARATORS = str.maketrans("", "", " -")
# Luhn: value of a digit when it sits in a doubled position.
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)
# Scalars orjson renders natively and that cannot carry free text.
_PLAIN_TYPES = (bool, float, type(None))
_OPAQUE_TYPES = (float, datetime.date, datetime.time, uuid.UUID, enum.Enum)


def luhn_valid(digits: str) -> bool:
    """Return True if `digits` (ASCII digits only) passes the Luhn check used by card PANs."""
    if not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        total += _DOUBLED[d] if i & 1 else d
    return total % 10 == 0


def mask_pan(pan: str) -> str:
    """Mask a card number to BIN (first 6) and last 4, the most PCI DSS lets us keep.

    Separators are dropped: ``"4242 4242 4242 4242"`` -> ``"424242******4242"``. Numbers too
    short to keep 6 + 4 digits and still hide some are masked completely.
    """
    digits = "".join(ch for ch in pan if "0" <= ch <= "9")
    if len(digits) < _PAN_MIN:
        return "*" * len(digits)
    return digits[:6] + "*" * (len(digits) - 10) + digits[-4:]


def _normalise_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _luhn_windows(digits: str) -> bytearray:
    """Flag the digits to hide: the middle of every Luhn-valid 12-19 digit window.

    Used for digit runs that are not a card number as a whole (a PAN glued to other digits).
    Prefix sums make each window's Luhn sum O(1); the union of all windows guarantees the
    embedded PAN loses its middle digits whatever else surrounds it.
    """
    n = len(digits)
    # even[i] / odd[i]: Luhn sum of digits[:i] doubling the even / odd positions.
    even, odd = [0] * (n + 1), [0] * (n + 1)
    for j, ch in enumerate(digits):
        d = ord(ch) - 48
        even[j + 1] = even[j] + (_DOUBLED[d] if j % 2 == 0 else d)
        odd[j + 1] = odd[j] + (d if j % 2 == 0 else _DOUBLED[d])
    hide = bytearray(n)
    for end in range(_PAN_MIN, n + 1):
        # The rightmost digit (end - 1) is never doubled, so doubled positions share end's parity.
        sums = even if end % 2 == 0 else odd
        for start in range(max(0, end - _PAN_MAX), end - _PAN_MIN + 1):
            if (sums[end] - sums[start]) % 10 == 0:
                hide[start + 6 : end - 4] = b"\x01" * (end - 4 - start - 6)
    return hide


def _mask_digit_run(run: str) -> str:
    digits = run.translate(_SEPARATORS)
    if len(digits) <= _PAN_MAX and luhn_valid(digits):
        return mask_pan(digits)
    hide = _luhn_windows(digits)
    if not any(hide):
        return run
    out, k = [], 0
    for ch in run:
        if ch in " -":
            out.append(ch)
        else:
            out.append("*" if hide[k] else ch)
            k += 1
    return "".join(out)


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "digits":
        return _mask_digit_run(match.group())
    if kind == "key":
        return match.group("key") + REDACTED
    if kind == "bearer":
        return "Bearer " + REDACTED
    return "[REDACTED PRIVATE KEY]"


def _scrub_str(text: str) -> str:
    if len(text) < _MIN_SCAN_LEN:
        return text
    return _SCAN.sub(_replace, text)


def _scrub_int(value: int) -> int | str:
    """Mask an integer that is a card number (a PAN parsed as a number still leaks)."""
    if _INT_PAN_LOW <= value < _INT_PAN_HIGH:
        digits = str(value)
        if luhn_valid(digits):
            return mask_pan(digits)
    return value


class Redactor:
    """structlog processor that returns a scrubbed deep copy of the event.

    `sensitive_keys` are compared case-insensitively with ``-`` and ``_`` removed, so
    ``api_key``, ``X-Api-Key`` and ``apiKey`` are one name.
    """

    def __init__(self, sensitive_keys: Iterable[str] = DEFAULT_SENSITIVE_KEYS) -> None:
        self._sensitive = frozenset(_normalise_key(k) for k in sensitive_keys)
        # Key names repeat from event to event; cache the normalised verdict (bounded).
        self._is_sensitive = functools.lru_cache(maxsize=4096)(self._match_key)

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        return self._scrub_mapping(event_dict, 0)

    def _match_key(self, key: str) -> bool:
        return _normalise_key(key) in self._sensitive

    def _scrub_mapping(self, mapping: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key, value in mapping.items():
            if type(key) is str:
                if self._is_sensitive(key):
                    out[_scrub_str(key)] = REDACTED
                    continue
                key = _scrub_str(key)
            elif type(key) is int:
                key = _scrub_int(key)
            out[key] = self._scrub(value, depth)
        return out

    def _scrub(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind is str:
            return _scrub_str(value)
        if kind in _PLAIN_TYPES:
            return value
        if kind is int:
            return _scrub_int(value)
        if depth >= _MAX_DEPTH:
            return _TOO_DEEP
        if kind is dict:
            return self._scrub_mapping(value, depth + 1)
        if kind is list:
            return [self._scrub(v, depth + 1) for v in value]
        if kind is tuple:
            return tuple(self._scrub(v, depth + 1) for v in value)
        return self._scrub_other(value, depth)

    def _scrub_other(self, value: Any, depth: int) -> Any:
        """Subclasses and foreign objects: scrub what the JSON renderer would print for them."""
        if isinstance(value, str):
            return _scrub_str(value)
        if isinstance(value, int):
            return _scrub_int(value)
        if isinstance(value, _OPAQUE_TYPES):
            return value
        if isinstance(value, Mapping):
            return self._scrub_mapping(value, depth + 1)
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self._scrub(v, depth + 1) for v in value]
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _scrub_str(bytes(value).decode("utf-8", "backslashreplace"))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return self._scrub_mapping(fields, depth + 1)
        # The renderer would fall back to __structlog__() or repr(); scrub that text instead.
        structlog_repr = getattr(value, "__structlog__", None)
        if callable(structlog_repr):
            return self._scrub(structlog_repr(), depth + 1)
        return _scrub_str(repr(value))
