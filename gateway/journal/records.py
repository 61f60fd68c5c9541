"""What the journal stores. No card number, CVC or secret is ever part of a record: a crash
must leave enough to reconcile (provider, its reference, the idempotency key we used), never
enough to charge again.

Every document a store writes passes the log's own redaction first (DESIGN rule 6), in the two
codecs here that every backend uses: `PaymentRecord.to_doc` (the payment row) and
`StoredResponse` (a key's stored answer). The API already refuses card data in free text
(`gateway.http.free_text`); this is the net for whatever reaches a record another way (a
provider's message, a future field, a caller that skipped the API). Identifiers, amounts and
times are kept verbatim: they are ours or the provider's, never free text, and masking a
provider reference that happens to pass the Luhn check would break every follow-up on the
payment. Every other field is redacted, so a new field is covered unless it is listed here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, Self

import orjson

from domain.outcome import PaymentStatus
from gateway.redaction import Redactor

# The journal knows no configured secret values (the log's Redactor does); it hides every
# pattern the detector knows.
_REDACTOR = Redactor()


# Each document class keeps, under this field, what a newer release wrote that this one does
# not know; it is written back as it was read (see `_split`).
_NEWER = "newer_fields"


def _codec(cls: type, verbatim: frozenset[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every field of `cls`, the ones redacted: all but `verbatim`), computed once per class.
    `verbatim` None: every field is kept as it is (identifiers, amounts, states, times of ours)."""
    names = tuple(f.name for f in fields(cls) if f.name != _NEWER)
    if verbatim is None:
        verbatim = frozenset(names)
    unknown = verbatim - set(names)
    if unknown:
        raise AssertionError(f"{cls.__name__} has no fields {sorted(unknown)}")
    return names, tuple(n for n in names if n not in verbatim)


def _redacted_doc(obj: Any, codec: tuple[tuple[str, ...], tuple[str, ...]]) -> dict[str, Any]:
    names, redacted = codec
    doc = {name: getattr(obj, name) for name in names}
    for name in redacted:
        value = doc[name]
        if value is not None:
            doc[name] = _REDACTOR.scrub(value)  # a copy: the document never shares the record's dicts
    newer = getattr(obj, _NEWER)
    if newer:
        doc.update(_REDACTOR.scrub(newer))
    return doc


def _split(doc: dict[str, Any], codec: tuple[tuple[str, ...], tuple[str, ...]]) -> dict[str, Any]:
    """A stored document as constructor arguments: the fields this release knows, and the rest
    under `newer_fields`. During a rolling upgrade the previous release reads rows the new one
    wrote; it keeps a field it does not know and writes it back unchanged, rather than refusing
    the row (a TypeError for every such payment) or dropping what the new release needs."""
    names = codec[0]
    known = {k: v for k, v in doc.items() if k in names}
    if len(known) < len(doc):
        known[_NEWER] = {k: v for k, v in doc.items() if k not in names}
    return known


class _Document:
    """A document class of the journal: `to_doc` redacts all but its verbatim fields, `from_doc`
    keeps what a newer release wrote (`_split`). Each subclass sets `_CODEC` once it is defined."""

    __slots__ = ()
    _CODEC: ClassVar[tuple[tuple[str, ...], tuple[str, ...]]]

    def to_doc(self) -> dict[str, Any]:
        return _redacted_doc(self, self._CODEC)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Self:
        return cls(**_split(doc, cls._CODEC))


@dataclass(slots=True)
class Attempt(_Document):
    """One call to one provider. Each try is its own record under the payment."""

    provider: str
    try_number: int
    operation: str
    idempotency_key: str | None
    started_at: float
    outcome: str | None = None  # Outcome value once answered
    raw_code: str | None = None
    http_status: int | None = None
    latency_ms: float | None = None
    breaker_state: str | None = None
    reference: str | None = None
    failover_reason: str | None = None
    message: str | None = None
    amount: int | None = None  # a follow-up's amount
    newer_fields: dict[str, Any] = field(default_factory=dict)  # a newer release's, kept as read


Attempt._CODEC = _codec(Attempt, frozenset({"provider", "try_number", "operation", "idempotency_key", "started_at",
                                            "outcome", "http_status", "latency_ms", "breaker_state", "reference",
                                            "amount"}))


@dataclass(slots=True)
class PendingFollowUp(_Document):
    """A capture, void or refund journalled before its provider call and not yet settled.

    While it is set the payment's status is `<op>_pending` and no other follow-up may start;
    if the request dies (or the provider's answer is unknown) the reconciler settles it from the
    provider's list of the payment's follow-ups, and answers the caller's key (`scope`,
    `front_key`), which was claimed with `provider_key` as its resource."""

    operation: str
    amount: int | None
    provider_key: str
    scope: str
    front_key: str
    prior_status: str
    started_at: float
    deadline_s: float
    answered: bool = False  # the caller got an answer (202, not yet confirmed): no live request holds it
    newer_fields: dict[str, Any] = field(default_factory=dict)  # a newer release's, kept as read


# Every field is an identifier, an amount, a state or a time of ours: nothing to redact.
PendingFollowUp._CODEC = _codec(PendingFollowUp)


@dataclass(slots=True)
class SettledFollowUp(_Document):
    """A capture, void or refund once settled: what it did to the payment's amounts.

    Why: a provider reports some follow-ups twice over, and out of order (Adyen's REFUND then
    REFUND_FAILED, Stripe's refund.failed after a lookup already found the refund failed). Only
    this follow-up's own record says whether its amount was counted, and so whether a failure
    reported later must take it off again (`reversed` once it has)."""

    operation: str
    provider_key: str
    amount: int | None  # what it added to captured_amount / refunded_amount (None: a void)
    done: bool  # the provider made it (its amount counted); False: refused or never made
    reversed: bool = False  # a failure reported after it was done took its amount off
    newer_fields: dict[str, Any] = field(default_factory=dict)  # a newer release's, kept as read


SettledFollowUp._CODEC = _codec(SettledFollowUp)  # ours only, like a pending one's


@dataclass(slots=True)
class PaymentRecord:
    id: str
    client: str
    amount: int
    currency: str
    capture: bool
    merchant_reference: str
    status: PaymentStatus = PaymentStatus.RECEIVED
    country: str | None = None
    card_brand: str | None = None
    card_bin: str | None = None
    card_last4: str | None = None
    route: str | None = None
    provider: str | None = None
    provider_reference: str | None = None
    provider_idempotency_key: str | None = None
    decline_code: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    outcome: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    captured_amount: int = 0
    refunded_amount: int = 0
    follow_up: PendingFollowUp | None = None
    settled_follow_ups: list[SettledFollowUp] = field(default_factory=list)  # oldest first
    # A status query found more than one charge for this one payment: kept pending, counted and
    # shown until an operator (or the provider's refund of the extra charge) resolves it.
    duplicate_charge_suspected: bool = False
    # ACTION_REQUIRED (3-D Secure): the shopper's action (`ShopperAction.to_doc`), when an
    # unfinished one expires, and whether the reconciler has started cancelling it at the
    # provider (journalled before the cancel, so a later pass knows a cancelled payment expired).
    action: dict[str, Any] | None = None
    action_expires_at: float | None = None
    action_cancelling: bool = False
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    # The row's version for conditional updates (gateway.journal.store): 0 until first journalled.
    version: int = 0
    newer_fields: dict[str, Any] = field(default_factory=dict)  # a newer release's, kept as read

    def to_doc(self) -> dict[str, Any]:
        """The document every store keeps for this payment, redacted (see the module docstring)."""
        doc = _redacted_doc(self, _PAYMENT_CODEC)
        doc["attempts"] = [a.to_doc() for a in self.attempts]
        doc["follow_up"] = self.follow_up.to_doc() if self.follow_up is not None else None
        doc["settled_follow_ups"] = [f.to_doc() for f in self.settled_follow_ups]
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> PaymentRecord:
        doc = _split(doc, _PAYMENT_CODEC)
        doc["status"] = PaymentStatus(doc["status"])
        doc["attempts"] = [Attempt.from_doc(a) for a in doc.get("attempts", [])]
        if doc.get("follow_up") is not None:
            doc["follow_up"] = PendingFollowUp.from_doc(doc["follow_up"])
        doc["settled_follow_ups"] = [SettledFollowUp.from_doc(f) for f in doc.get("settled_follow_ups", [])]
        return cls(**doc)


_PAYMENT_CODEC = _codec(PaymentRecord, frozenset({
    "id", "client", "amount", "currency", "capture", "status", "country", "card_brand", "card_bin", "card_last4",
    "route", "provider", "provider_reference", "provider_idempotency_key", "outcome", "attempts", "captured_amount",
    "refunded_amount", "follow_up", "settled_follow_ups", "duplicate_charge_suspected", "created_at", "updated_at",
    "version",
    "action_expires_at", "action_cancelling"}))


class IdempotencyState(StrEnum):
    IN_FLIGHT = "in_flight"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A key's stored answer. The body is redacted on the way in, so no store can keep card data
    a response carried; our payment id and the provider's reference stay verbatim (the caller
    acts on them). A body with nothing to hide is kept byte for byte."""

    status: int
    body: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", _redacted_answer(self.body))


# Top-level answer fields that are identifiers, not free text (see PaymentRecord's).
_ANSWER_VERBATIM = ("id", "provider_reference")


def _redacted_answer(body: bytes) -> bytes:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "surrogateescape")
        scrubbed = _REDACTOR.scrub_text(text)
        return body if scrubbed is text else scrubbed.encode("utf-8", "surrogateescape")
    clean = _REDACTOR.scrub(doc)
    if isinstance(doc, dict):
        clean.update({k: doc[k] for k in _ANSWER_VERBATIM if k in doc})
    return body if clean == doc else orjson.dumps(clean)


@dataclass(frozen=True, slots=True)
class IdempotentAnswer:
    """The answer a front-door key will replay, stored in the same transaction as the payment."""

    scope: str
    key: str
    response: StoredResponse


@dataclass(frozen=True, slots=True)
class OutboxLine:
    """A transaction-log line stored in the journal's outbox in the same transaction as the final
    journal row it records (DESIGN rule 5 across a crash).

    `line` is the fully rendered line (redacted JSON ending in a newline, exactly the bytes the
    log file gets) and `log_id` the `log_id` field inside it, unique per line. `owner` names the
    log file the line belongs in (host and path), `created_at` is when it was rendered (epoch
    seconds). The row is deleted once the line is on disk; a row left over after a crash is
    written again at start-up unless the file already holds its `log_id`.
    """

    log_id: str
    line: bytes
    owner: str = ""
    created_at: float = field(default_factory=time.time)


class ClaimKind(StrEnum):
    NEW = "new"
    REPLAY = "replay"
    IN_FLIGHT = "in_flight"
    MISMATCH = "mismatch"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A request's identity for its Idempotency-Key, keyed (HMAC): `value`, of its canonical
    JSON, is what a claim stores; `legacy`, of its raw body bytes, is what releases before the
    canonical form stored, still matched so a retry across the upgrade replays instead of 422."""

    value: str
    legacy: str | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    kind: ClaimKind
    resource_id: str | None = None
    response: StoredResponse | None = None
