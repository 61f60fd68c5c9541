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

It runs once per transaction on the request path, so each string costs a few substring tests
and one precompiled regex pass; strings too short to hold a secret, and non-string scalars
other than card-number-sized integers, are passed through untouched.
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

from structlog.typing import EventDict, WrappedLogger

from domain.cards import luhn_valid

__all__ = ["DEFAULT_SENSITIVE_KEYS", "REDACTED", "Redactor", "mask_pan"]

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

# Each pattern runs only when a cheap substring test says it could match. Order matters: PEM
# blocks, keys and tokens are replaced first, so the digits inside them never reach the card
# number scan.
_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
_KEY = re.compile(r"((?:sk|rk)_(?:live|test)_|whsec_)[A-Za-z0-9]+")
_BEARER = re.compile(r"(?i:bearer)[ \t]+[A-Za-z0-9\-._~+/]+=*")
# A run of 12+ digits, single spaces or dashes allowed between digits. Starting only where no
# digit precedes and matching possessively keeps the scan linear on long digit-rich strings.
_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9](?:[ -]?+[0-9]){%d,}+" % (_PAN_MIN - 1))
_GROUP = re.compile(r"[0-9]+")
_SEPARATORS = str.maketrans("", "", " -")
# Luhn: value of a digit when it sits in a doubled position.
# Scalars orjson renders natively and that cannot carry free text.
_PLAIN_TYPES = (bool, float, type(None))
_OPAQUE_TYPES = (float, datetime.date, datetime.time, uuid.UUID, enum.Enum)


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


def _mask_digit_run(match: re.Match[str]) -> str:
    """Mask a digit run if it, or a span of its whole groups, is a Luhn-valid card number.

    Spans of whole groups catch a formatted card next to another number ("qty 2 4242 4242
    4242 4242"). Windows cutting through a group are not tried, so a card glued to other digits
    with no separator is not recognised. That is deliberate: most 16-digit references (PSP
    references, order numbers) hold some Luhn-valid 12-19 digit window by chance and would be
    mangled in every log line that mentions them.
    """
    run = match.group()
    digits = run.translate(_SEPARATORS)
    if len(digits) <= _PAN_MAX and luhn_valid(digits):
        return mask_pan(digits)
    groups = [m.span() for m in _GROUP.finditer(run)]
    chars: list[str] | None = None
    for i, (start, _) in enumerate(groups):
        count = 0
        for group_start, end in groups[i:]:
            count += end - group_start
            if count > _PAN_MAX:
                break
            if count >= _PAN_MIN and luhn_valid(run[start:end].translate(_SEPARATORS)):
                chars = chars or list(run)
                positions = [p for p in range(start, end) if run[p] not in " -"]
                for p in positions[6:-4]:
                    chars[p] = "*"
    return run if chars is None else "".join(chars)


def _scrub_str(text: str) -> str:
    if len(text) < _MIN_SCAN_LEN:
        return text
    if "PRIVATE KEY" in text:
        text = _PEM.sub("[REDACTED PRIVATE KEY]", text)
    if "_live_" in text or "_test_" in text or "whsec_" in text:
        text = _KEY.sub(r"\1" + REDACTED, text)
    if "earer" in text or "EARER" in text:  # Bearer, bearer, BEARER
        text = _BEARER.sub("Bearer " + REDACTED, text)
    return _DIGIT_RUN.sub(_mask_digit_run, text)


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
        # Key names repeat from event to event: cache each key's verdict (bounded).
        self._scrub_key = functools.lru_cache(maxsize=4096)(self._scrub_key_uncached)

    def __call__(
        self, logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> EventDict:
        return self._scrub_mapping(event_dict, 0)

    def _scrub_key_uncached(self, key: str) -> tuple[str, bool]:
        """Return the key as it may be printed, and whether its value must be hidden."""
        return _scrub_str(key), _normalise_key(key) in self._sensitive

    def _scrub_mapping(self, mapping: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key, value in mapping.items():
            if type(key) is str:
                key, sensitive = self._scrub_key(key)
                if sensitive:
                    out[key] = REDACTED
                    continue
            elif type(key) is int:
                key = _scrub_int(key)
            # Strings are most values: scrub them inline, without the dispatch call.
            out[key] = _scrub_str(value) if type(value) is str else self._scrub(value, depth)
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
