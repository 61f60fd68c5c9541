"""Find and scrub card data and secrets (DESIGN rule 6): the one detector the gateway has.

The `Redactor` is a structlog processor, so it runs on every event of every logger built by
`gateway.txlog.logger`; no call site has to remember to redact. The same instance's matching
also decides what the API refuses in free-text fields (`Redactor.finding`,
`gateway.http.free_text`) and what the journal scrubs from the documents it stores
(`gateway.journal.records`), so a value the API accepts passes the log and the journal
unchanged. It works on a *copy*: structlog only shallow-copies the event dict, so scrubbing
nested containers in place would corrupt the caller's own payment data.

Two independent nets catch a secret:

* by key name: the value under a sensitive key (``cvc``, ``card_cvc``, ``cardCvv``, ``security
  code``, ``api_key``, ``encryptedCardNumber``, ...) is replaced whole, whatever its type. Names
  are folded first (NFKC, lower case, every character but letters and digits dropped), so
  ``Card_CVV``, ``card-cvv`` and ``card.cvv`` are one name;
* by content: every string (values and dict keys) is normalised (NFKC, any script's digits as
  ASCII) and scanned for PEM private keys, the secret values the configuration loaded
  (`secrets`), provider API keys (Stripe ``sk_/rk_live|test_``, Checkout.com ``sk_sbox_`` and
  ``sk_``, Adyen ``AQE...``), webhook secrets (``whsec_``), bearer tokens, security codes
  written inline (``cvc=917``, ``CVV: 917``) and Luhn-valid card numbers.

What counts as a card number in text:

* a run of 12-19 digits that passes the Luhn check and begins as a card can (not with 0, nor
  with 1 unless it has UATP's 15 digits: `domain.cards.card_like`; epoch times and padded
  counters in references begin so), or groups of digits in a card's own grouping (4 digits
  first, then groups of 4-6, the last of 1-6) that together hold 12-19 and pass it,
  joined by short separators (up to three of whitespace of any kind, any ASCII punctuation
  (``-``, ``.``, ``/``, ``_``, ``,``, ``:``, ``|`` ...), Unicode dashes, zero-width characters).
  The grouping is what keeps decimals, IP addresses, epoch times with fractions
  (``1714564800.123456``) and references such as ``ORD-123456-000012`` from being taken for
  cards;
* a card glued to other digits: a 13-19 digit window inside a longer run that passes Luhn *and*
  starts with a card network's prefix for that length (`domain.cards.issuer_plausible`). The
  prefix test is what keeps most long references (a random window passes Luhn one time in ten)
  from being mangled in every line that mentions them.

Matches keep what PCI DSS truncation allows (`domain.cards.mask_pan`: at least 6 digits
hidden). Integers that are card numbers are masked too, except under amount keys (``amount``,
``captured_amount``): amounts are validated numbers, and a large one must stay readable.

It runs once per transaction on the request path, so each string costs a few substring tests
and one precompiled regex pass; strings too short to hold a secret and non-string scalars other
than card-number-sized numbers are passed through untouched.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import SecretBytes, SecretStr
from structlog.typing import EventDict, WrappedLogger

from domain.cards import PAN_MAX, PAN_MIN, card_like, issuer_lengths, luhn_valid, mask_pan, visible_digits
from domain.secret import Secret

__all__ = ["DEFAULT_SENSITIVE_KEYS", "REDACTED", "Finding", "Redactor", "fold_key", "luhn_valid", "mask_pan"]

REDACTED = "[REDACTED]"


class Finding(enum.StrEnum):
    """What the detector found, for an error that says what to take out."""

    CARD_NUMBER = "card_number"
    SECURITY_CODE = "security_code"
    SECRET = "secret"


# Folded names (see `fold_key`); a leading ``*`` matches every name ending in the rest, so
# ``*cvc`` covers ``card_cvc``, ``cardCvc`` and ``card.cvc``.
DEFAULT_SENSITIVE_KEYS: frozenset[str] = frozenset(
    {
        "number",
        "pan",
        "primary_account_number",
        "*card_number",
        "*cvc",
        "*cvv",
        "*cvc2",
        "*cvv2",
        "*cvn",
        "*csc",
        "*security_code",
        "*verification_code",
        "*verification_value",
        "exp_month",
        "exp_year",
        "*card_exp_month",
        "*card_exp_year",
        "*expiry",
        "*expiry_date",
        "*expiry_month",
        "*expiry_year",
        "*api_key",
        "authorization",
        "proxy-authorization",
        "*password",
        "*passwd",
        "*passphrase",
        "pin",
        "*card_pin",
        "*pin_code",
        "*cookie",
        "*secret",
        "*private_key",
        "*token",
        "*encrypted_security_code",
        "*encrypted_expiry_month",
        "*encrypted_expiry_year",
    }
)
# Integers under these folded names (and names ending in them) are amounts, never card numbers.
_AMOUNT_SUFFIX = "amount"

# Strings shorter than the shortest secret the scan can recognise ("cvc=917") are left alone.
_MIN_SCAN_LEN = 7
# A configured secret shorter than this is not matched by value: it would blank ordinary words.
MIN_LITERAL_SECRET = 8
# Deeper nesting than this is not payment data; it is replaced rather than recursed into, so a
# cyclic or pathological structure cannot crash the logging call.
_MAX_DEPTH = 32
_TOO_DEEP = "[TOO DEEP]"

_INT_PAN_LOW, _INT_PAN_HIGH = 10 ** (PAN_MIN - 1), 10**PAN_MAX
_FLOAT_PAN_LOW = float(_INT_PAN_LOW)

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_FOREIGN_DIGIT = re.compile(r"(?![0-9])\d")

# -- content patterns ----------------------------------------------------------------------------
# Each runs only when a cheap substring test says it could match. Order matters: PEM blocks,
# keys and tokens are replaced first, so the digits inside them never reach the card scan.
_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
# Stripe secret and restricted keys, Checkout.com sandbox and (old) test keys, webhook secrets:
# the prefix stays, so a line still says which kind of key it was; the body runs to the end of
# the word, underscores included (``sk_test_dev_gateway`` kept ``_gateway``). Checkout.com's live
# keys are a bare ``sk_`` and a long body.
_KEY = re.compile(
    r"((?:sk|rk)_(?:live|test|sbox)_|whsec_)[A-Za-z0-9][A-Za-z0-9_-]*|(?<![A-Za-z0-9])(sk_)[A-Za-z0-9]{20,}"
)
# Adyen API keys: "AQE" and a long base64 body, then dash-joined parts that may hold any
# printable character; everything up to whitespace or a quote goes.
_ADYEN_KEY = re.compile(r"(?<![A-Za-z0-9+/])AQE[A-Za-z0-9+/=]{20,}[^\s\"'`]*")
_BEARER = re.compile(r"(?i:bearer)[ \t]+[A-Za-z0-9\-._~+/]+=*")
# "cvc=917", "CVV: 917", "card_cvc 917", "security code: 0123", '"cvv":"917"',
# "card verification value 917".
_INLINE_CODE = re.compile(
    r"(?i:cv[cv]2?|cvn|csc|security[\s._-]*code|card[\s._-]*verification[\s._-]*(?:value|code))(?![a-z])"
    r"[\s\"'\]]*(?:[:=]|is)?[\s\"']*([0-9]{3,4})(?![0-9])"
)

# Card-number candidates: a digit, then 11 or more digits each after up to three separators.
# Starting only where no digit precedes and matching possessively keeps the scan linear; the
# leading digit class lets the engine skip to the next digit without trying each position.
# Any ASCII punctuation (a PAN typed as 4111,1111,1111,1111 or 4111:1111:... was stored verbatim
# when only spaces, dots, slashes and dashes counted), whitespace, soft hyphen, Unicode dashes,
# the minus sign and zero-width characters. The card grouping below keeps lists and times out.
_SEP = r"\s!-/:-@\[-`{-~\u00ad\u2010-\u2015\u2212\u200b-\u200d\u2060\ufeff"
_CANDIDATE = re.compile(r"[0-9](?<![0-9][0-9])(?:[%s]{0,3}+[0-9]){%d,}+" % (_SEP, PAN_MIN - 1))
_GROUP = re.compile(r"[0-9]+")
_WINDOW_MIN = 13


def fold_key(name: str) -> str:
    """A key name as the sensitive-key match sees it: NFKC, lower case, letters and digits only
    (``Card_CVV``, ``card-cvv``, ``card.cvv`` and ``cardCvv`` all fold to ``cardcvv``)."""
    if not name.isascii():
        name = unicodedata.normalize("NFKC", name)
    return _NON_ALNUM.sub("", name.lower())


def _normalise(text: str) -> str:
    """NFKC (full-width digits, no-break spaces), then any script's decimal digits as ASCII."""
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():
        return text
    return _FOREIGN_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group())), text)


def _key_prefix(match: re.Match[str]) -> str:
    return (match.group(1) or match.group(2)) + REDACTED


def _scrub_secrets(text: str) -> str:
    """PEM private keys, provider API keys, webhook secrets and bearer tokens."""
    if "PRIVATE KEY" in text:
        text = _PEM.sub("[REDACTED PRIVATE KEY]", text)
    if "k_" in text or "whsec_" in text:
        text = _KEY.sub(_key_prefix, text)
    if "AQE" in text:
        text = _ADYEN_KEY.sub("AQE" + REDACTED, text)
    if "earer" in text or "EARER" in text:  # Bearer, bearer, BEARER
        text = _BEARER.sub("Bearer " + REDACTED, text)
    return text


def _hide_code(match: re.Match[str]) -> str:
    offset = match.start()
    start, end = match.span(1)
    whole = match.group()
    return whole[: start - offset] + REDACTED + whole[end - offset :]


def _scrub_inline_codes(text: str) -> str:
    lower = text.lower()
    if "cv" in lower or "csc" in lower or "security" in lower or "verification" in lower:
        return _INLINE_CODE.sub(_hide_code, text)
    return text


def _card_shaped(lengths: list[int]) -> bool:
    """A card's own grouping: 4 digits, then groups of 4-6, the last of 1-6."""
    return lengths[0] == 4 and all(4 <= n <= 6 for n in lengths[1:-1]) and 1 <= lengths[-1] <= 6


def _mask_candidate(match: re.Match[str]) -> str:
    """Mask every card number inside one candidate run of digits and separators (see the
    module docstring for what counts); the rest of the run stays as it was."""
    run = match.group()
    if run.isdigit() and len(run) <= _WINDOW_MIN:  # the common case: a short run, no separators
        return mask_pan(run) if card_like(run) else run
    groups = [m.span() for m in _GROUP.finditer(run)]
    hidden: set[int] = set()

    def hide(positions: list[int]) -> None:
        lead, last = visible_digits(len(positions))
        hidden.update(positions[lead : len(positions) - last])

    # Spans of whole groups: a formatted card, also beside other numbers ("qty 2 4242 4242 ...").
    for i in range(len(groups)):
        count, lengths = 0, []
        for j in range(i, len(groups)):
            start, end = groups[j]
            count += end - start
            lengths.append(end - start)
            if count > PAN_MAX:
                break
            if count < PAN_MIN:
                continue
            digits = "".join(run[s:e] for s, e in groups[i : j + 1])
            # A card's own grouping, or any grouping (8+8, a digit at a time) whose digits are
            # an issuer's number of that length: a payment network's prefix, length and Luhn.
            if not (j == i or _card_shaped(lengths) or count in issuer_lengths(digits[:4])):
                continue
            if card_like(digits):
                if i == 0 and j == len(groups) - 1:
                    return mask_pan(digits)  # the whole run is one card: print it compactly
                hide([p for s, e in groups[i : j + 1] for p in range(s, e)])
    # Windows inside a longer run of digits: a card glued to other digits.
    for start, end in groups:
        size = end - start
        if size <= _WINDOW_MIN:
            continue
        for offset in range(start, end - _WINDOW_MIN + 1):
            for length in issuer_lengths(run[offset : offset + 4]):
                # 13+ digits, inside the run (the whole run was tried above)
                if _WINDOW_MIN <= length < size and offset + length <= end \
                        and luhn_valid(run[offset : offset + length]):
                    hide(list(range(offset, offset + length)))
    if not hidden:
        return run
    return "".join("*" if p in hidden else ch for p, ch in enumerate(run))


def _scrub_card_numbers(text: str) -> str:
    out = _CANDIDATE.sub(_mask_candidate, text)
    return text if out == text else out  # a candidate that held no card: the argument itself


# (what a rule finds, the rule): each returns its argument itself when it finds nothing.
_RULES: tuple[tuple[Finding, Callable[[str], str]], ...] = (
    (Finding.SECRET, _scrub_secrets),
    (Finding.SECURITY_CODE, _scrub_inline_codes),
    (Finding.CARD_NUMBER, _scrub_card_numbers),
)


def _scrub_int(value: int) -> int | str:
    """Mask an integer that is a card number (a PAN parsed as a number still leaks)."""
    magnitude = -value if value < 0 else value
    if _INT_PAN_LOW <= magnitude < _INT_PAN_HIGH:
        digits = str(magnitude)
        if card_like(digits):
            return mask_pan(digits)
    return value


def _scrub_float(value: float) -> float | str:
    """A card number that went through a float renders as ``4.242424242424242e15``: mask it."""
    if abs(value) >= _FLOAT_PAN_LOW and value.is_integer() and abs(value) < _INT_PAN_HIGH:
        masked = _scrub_int(int(value))
        return value if isinstance(masked, int) else masked
    return value


# Scalars orjson renders natively and that cannot carry free text.
_PLAIN_TYPES = (bool, type(None))
_OPAQUE_TYPES = (datetime.date, datetime.time, uuid.UUID, enum.Enum)
_SECRET_TYPES = (Secret, SecretStr, SecretBytes)

_PLAIN, _SENSITIVE, _AMOUNT, _IDENTIFIER = 0, 1, 2, 3
# Keys whose text values are a provider's identifiers for what we sent it (its payment reference,
# its notification's id), kept as they are: the journal keeps them verbatim too, and an incident
# is followed from our lines to the provider's records by them. A 16-digit Adyen pspReference
# passes the Luhn check one time in ten, so masking it would lose exactly those. They come only
# from the provider (a notification only once its signature verified), never from the caller.
IDENTIFIER_KEYS = ("provider_reference", "event_id")
_KEY_CACHE_SIZE = 4096
_IDENTIFIERS = frozenset(fold_key(k) for k in IDENTIFIER_KEYS)


class Redactor:
    """structlog processor that returns a scrubbed deep copy of the event, and the detector the
    API and the journal share (`finding`, `scrub_text`, `scrub`).

    `sensitive_keys` are folded names (`fold_key`); an entry starting with ``*`` matches every
    name that ends with it. `secrets` are literal values to hide wherever they appear (the
    configuration's API keys, DSNs, ...; `GatewayConfig.secret_values`); ones shorter than
    `MIN_LITERAL_SECRET` are ignored.
    """

    def __init__(self, sensitive_keys: Iterable[str] = DEFAULT_SENSITIVE_KEYS, *,
                 secrets: Iterable[str] = ()) -> None:
        keys = list(sensitive_keys)
        self._exact = frozenset(fold_key(k) for k in keys if not k.startswith("*"))
        self._suffixes = tuple(fold_key(k[1:]) for k in keys if k.startswith("*"))
        # Longest first, so a secret containing another is hidden whole.
        self._literals = tuple(sorted({s for s in secrets if len(s) >= MIN_LITERAL_SECRET}, key=len, reverse=True))
        rules = ((Finding.SECRET, self._scrub_literals), *_RULES) if self._literals else _RULES
        self._all_rules = tuple(rule for _, rule in rules)
        self._letter_rules = (self._scrub_literals,) if self._literals else ()
        self._kinds = {rule: kind for kind, rule in rules}
        # Key names repeat from event to event: each key's verdict is cached (a plain dict is
        # the cheapest lookup; it is emptied when full, so odd keys cannot grow it without bound).
        self._key_verdicts: dict[str, tuple[str, int]] = {}

    def __call__(
        self, logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> EventDict:
        return self._scrub_mapping(event_dict, 0)

    # -- the detector ------------------------------------------------------------------------------

    def scrub_text(self, text: str) -> str:
        """`text` with every secret and card number in it hidden; `text` itself if none."""
        work, rules = self._prepare(text)
        out = work
        for rule in rules:
            out = rule(out)
        return text if out is work else out

    def finding(self, text: str, *, secrets: bool = True) -> Finding | None:
        """What `scrub_text` would hide in `text` first, or None if it would leave it as it is.
        `secrets=False`: card data only (a number, an inline security code), whatever else the
        text holds: for a provider's opaque value, where what looks like a secret is expected (a
        Stripe client secret) and would otherwise be found first, hiding a card number behind it."""
        work, rules = self._prepare(text)
        for rule in rules:
            kind = self._kinds[rule]
            if (secrets or kind is not Finding.SECRET) and rule(work) is not work:
                return kind
        return None

    def _prepare(self, text: str) -> tuple[str, tuple[Callable[[str], str], ...]]:
        """The text as the rules read it, and the rules that can match in it at all."""
        if len(text) < _MIN_SCAN_LEN:
            return text, ()
        if text.isalpha() and "AQE" not in text:
            # Letters only (most values: statuses, names, codes): no digit, separator or key
            # prefix, so only a configured secret can hide in it.
            return text, self._letter_rules
        return (text if text.isascii() else _normalise(text)), self._all_rules

    def is_sensitive_key(self, key: str) -> bool:
        """Whether a value under `key` is hidden whole."""
        return self._scrub_key(key)[1] == _SENSITIVE

    def _scrub_key(self, key: str) -> tuple[str, int]:
        verdict = self._key_verdicts.get(key)
        if verdict is None:
            if len(self._key_verdicts) >= _KEY_CACHE_SIZE:
                self._key_verdicts.clear()
            verdict = self._key_verdicts[key] = self._scrub_key_uncached(key)
        return verdict

    def scrub(self, value: Any) -> Any:
        """A scrubbed copy of any value the log could hold (what the journal stores goes here)."""
        return self._scrub(value, 0)

    def _scrub_literals(self, text: str) -> str:
        for secret in self._literals:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    # -- walking a value ---------------------------------------------------------------------------

    def _scrub_key_uncached(self, key: str) -> tuple[str, int]:
        """The key as it may be printed, and what its value is (plain, sensitive, an amount)."""
        folded = fold_key(key)
        if folded in self._exact or folded.endswith(self._suffixes):
            verdict = _SENSITIVE
        elif folded.endswith(_AMOUNT_SUFFIX):
            verdict = _AMOUNT
        elif folded in _IDENTIFIERS:
            verdict = _IDENTIFIER
        else:
            verdict = _PLAIN
        return self.scrub_text(key), verdict

    def _scrub_mapping(self, mapping: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        text = self.scrub_text
        verdicts = self._key_verdicts
        for key, value in mapping.items():
            kind = type(value)
            if type(key) is str:
                key, verdict = verdicts.get(key) or self._scrub_key(key)
                if verdict:
                    if verdict == _SENSITIVE:
                        out[key] = REDACTED
                        continue
                    if verdict == _IDENTIFIER:
                        if kind is str:
                            out[key] = value
                            continue
                    elif kind is int or kind is float:  # an amount
                        out[key] = value
                        continue
            elif type(key) is int:
                key = _scrub_int(key)
            # The common scalars inline, without a call: this loop is the hot path.
            if kind is str:
                out[key] = value if len(value) < _MIN_SCAN_LEN else text(value)
            elif value is None or kind is bool:
                out[key] = value
            elif kind is int:
                out[key] = value if -_INT_PAN_LOW < value < _INT_PAN_LOW else _scrub_int(value)
            elif kind is float:
                out[key] = value if -_FLOAT_PAN_LOW < value < _FLOAT_PAN_LOW else _scrub_float(value)
            else:
                out[key] = self._scrub(value, depth)
        return out

    def _scrub(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind is str:
            return self.scrub_text(value)
        if kind in _PLAIN_TYPES:
            return value
        if kind is int:
            return _scrub_int(value)
        if kind is float:
            return _scrub_float(value)
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
        if isinstance(value, _SECRET_TYPES):
            return REDACTED
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return _scrub_int(value)
        if isinstance(value, float):
            return _scrub_float(value)
        if isinstance(value, _OPAQUE_TYPES):
            return value
        if isinstance(value, Mapping):
            return self._scrub_mapping(value, depth + 1)
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self._scrub(v, depth + 1) for v in value]
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self.scrub_text(bytes(value).decode("utf-8", "backslashreplace"))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return self._scrub_mapping(fields, depth + 1)
        # The renderer would fall back to __structlog__() or repr(); scrub that text instead.
        structlog_repr = getattr(value, "__structlog__", None)
        if callable(structlog_repr):
            return self._scrub(structlog_repr(), depth + 1)
        return self.scrub_text(repr(value))
