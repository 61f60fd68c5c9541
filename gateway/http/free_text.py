"""Refuse card data and secrets in free-text fields (DESIGN rule 6), before anything is written.

A card number in a merchant reference or a key pasted into metadata would otherwise be
journalled, logged and sent to a provider as text. The check uses the log's own detector (the
app's `Redactor`, which also knows the configuration's secret values), so what the API accepts
is exactly what redaction leaves alone: a stored document never differs from what the caller
sent. It runs right after validation, before the idempotency claim, so a refused request leaves
no journal row and no key record (the same key is free for the corrected request).

Errors name the field (``metadata.note``) and the kind of data, never the data itself.
"""

from __future__ import annotations

import html
import re
import unicodedata
from urllib.parse import unquote_plus

from gateway.http.errors import ApiError
from gateway.http.schemas import Body
from gateway.redaction import Finding, Redactor

_REFUSED: dict[Finding, tuple[str, str]] = {
    Finding.CARD_NUMBER: ("card_data_in_free_text", "holds a card number; card data goes in payment_method only"),
    Finding.SECURITY_CODE: ("card_data_in_free_text",
                            "holds a card security code; card data goes in payment_method only"),
    Finding.SECRET: ("secret_in_free_text",
                     "holds what looks like a secret (an API key, token or private key); never send credentials"),
}


def refuse_card_data(body: Body, redactor: Redactor) -> None:
    """Raise a 422 `ApiError` for the first free-text field of `body` that holds card data or a
    secret, or a metadata key whose name the log would redact the value of (``cvc``, ``token``):
    the journal would keep that value as ``[REDACTED]``, not as sent."""
    for item in body.free_text():
        if item.opaque:
            refuse_in_text(item.text, item.field, redactor, secrets=False)
            continue
        refuse_in_text(item.text, item.field, redactor, f"a key of {item.field}" if item.is_key else item.field)
        if item.is_key and redactor.is_sensitive_key(item.text):
            raise ApiError(422, "sensitive_metadata_key",
                           f"{item.field} key {item.text!r} names card data or a secret, which the gateway never "
                           "stores; rename the key or leave it out", f"{item.field}.{item.text}")


def refuse_in_text(text: str, field: str, redactor: Redactor, where: str | None = None, *,
                   secrets: bool = True) -> None:
    """Raise a 422 `ApiError` naming `field` (described as `where`, default `field`) when
    `text`, a value the caller chose (a body's free text, the `Idempotency-Key` header), holds
    card data or (unless `secrets` is False: a provider's opaque value) a secret."""
    pasted = as_read(text)
    found = redactor.finding(text, secrets=secrets) or (redactor.finding(pasted, secrets=secrets) if pasted else None)
    if found is not None:
        code, what = _REFUSED[found]
        raise ApiError(422, code, f"{where or field} {what}", field)


_TAG = re.compile(r"<[^<>]{0,200}>")
_SPACES = re.compile(r"\s{2,}")
_INVISIBLE = frozenset({"Mn", "Me", "Cf"})  # combining marks, format characters (U+180E, ZWJ, ...)


def as_read(text: str) -> str | None:
    """`text` as a person reads it, where that differs: percent-decoded, HTML entities and tags
    resolved, runs of whitespace as one space, combining marks and format characters dropped.
    A re-attack stored card numbers pasted from a URL (`4111%201111%20...`, in a return_url the
    provider echoes), from a page (`&nbsp;`, `<b>`), spaced out beyond the detector's three
    separators, or with an invisible mark in them. None: nothing to read differently."""
    read = text
    if "%" in read or "+" in read:
        read = unquote_plus(read)
    if "&" in read or "<" in read:
        read = _TAG.sub(" ", html.unescape(read))
    read = _SPACES.sub(" ", read)
    if not read.isascii():
        read = "".join(c for c in read if unicodedata.category(c) not in _INVISIBLE)
    return read if read != text else None
