"""Request bodies as pydantic models: validated once at the door, published in /openapi.json.

The card number, security code and token are `SecretStr`s: a model printed, logged or caught in
a traceback shows ``**********``; `CardMethod.to_card` and `TokenMethod.to_secret` hand them on
as the domain's own `Secret`. Each body names its free-text fields (`Body.free_text`), which
the API refuses to accept card data or secrets in (`gateway.http.free_text`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictBool, StrictInt, StrictStr, field_validator

from domain.cards import luhn_valid
from domain.secret import Secret
from domain.types import Card, ThreeDS
from gateway.http.currencies import ISO_4217, ISO_4217_PATTERN

Amount = Annotated[StrictInt, Field(gt=0, le=10**12, description="Amount in minor units (cents)")]


@dataclass(frozen=True, slots=True)
class FreeText:
    """One piece of caller-written text and the field path an error about it names."""

    field: str
    text: str
    is_key: bool = False  # a metadata key: its name must not call for redaction either
    # A provider's opaque value the shopper's browser brought back (a Stripe client secret is
    # one): only card data is refused in it, never what merely looks like a secret.
    opaque: bool = False


class Body(BaseModel):
    # A ValidationError's text would otherwise quote the rejected input: a card number that
    # failed the Luhn check by one digit is still card data.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    def free_text(self) -> Iterator[FreeText]:
        """Every field the caller writes free text into (none by default)."""
        return iter(())


def _digits(value: SecretStr, what: str) -> SecretStr:
    text = value.get_secret_value()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{what} must be digits only")
    return value


class CardMethod(Body):
    type: Literal["card"]
    number: Annotated[SecretStr, Field(min_length=12, max_length=19, description="digits only, passing the Luhn check",
                                       json_schema_extra={"pattern": "^[0-9]+$"})]
    exp_month: Annotated[StrictInt, Field(ge=1, le=12)]
    exp_year: Annotated[StrictInt, Field(ge=2000, le=2100)]
    cvc: Annotated[SecretStr, Field(min_length=3, max_length=4, json_schema_extra={"pattern": "^[0-9]{3,4}$"})] \
        | None = None
    holder_name: Annotated[StrictStr, Field(max_length=100)] | None = None

    @field_validator("number")
    @classmethod
    def _luhn(cls, value: SecretStr) -> SecretStr:
        if not luhn_valid(_digits(value, "card number").get_secret_value()):
            raise ValueError("card number fails the Luhn check")
        return value

    @field_validator("cvc")
    @classmethod
    def _cvc_digits(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is None else _digits(value, "cvc")

    def to_card(self) -> Card:
        """The card for the provider call, its number and code still unprintable."""
        return Card(Secret(self.number.get_secret_value()), self.exp_month, self.exp_year,
                    None if self.cvc is None else Secret(self.cvc.get_secret_value()), self.holder_name)


class TokenMethod(Body):
    type: Literal["token"]
    token: Annotated[SecretStr, Field(min_length=3, max_length=255)]

    def to_secret(self) -> Secret:
        return Secret(self.token.get_secret_value())


class PaymentCreate(Body):
    amount: Amount
    currency: Annotated[StrictStr, Field(min_length=3, max_length=3, description="ISO 4217 code, any letter case",
                                         json_schema_extra={"pattern": ISO_4217_PATTERN, "examples": ["EUR"]})]
    payment_method: Annotated[CardMethod | TokenMethod, Field(discriminator="type")]
    capture: StrictBool = True
    merchant_reference: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    country: Annotated[StrictStr, Field(pattern=r"^[A-Z]{2}$")] | None = None
    description: Annotated[StrictStr, Field(max_length=255)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=40)], Annotated[StrictStr, Field(max_length=500)]],
                        Field(max_length=20)] = {}
    # Where the provider sends the shopper back after 3-D Secure (https; `gateway.http.return_url`).
    return_url: Annotated[StrictStr, Field(min_length=8, max_length=2048)] | None = None
    three_ds: ThreeDS = ThreeDS.AUTOMATIC

    @field_validator("currency")
    @classmethod
    def _iso_4217(cls, value: str) -> str:
        # ASCII first: "ınr".upper() is "INR" (a dotless i), and /openapi.json publishes ASCII letters.
        if not value.isascii() or value.upper() not in ISO_4217:
            raise ValueError(f"unknown currency {value!r} (ISO 4217)")
        return value.upper()

    def free_text(self) -> Iterator[FreeText]:
        yield FreeText("merchant_reference", self.merchant_reference)
        if self.description is not None:
            yield FreeText("description", self.description)
        if self.return_url is not None:  # sent to the provider, echoed in its redirect, journalled
            yield FreeText("return_url", self.return_url)
        method = self.payment_method
        if isinstance(method, CardMethod) and method.holder_name is not None:
            yield FreeText("payment_method.holder_name", method.holder_name)
        if isinstance(method, TokenMethod):  # a provider's token, forwarded: never a card number typed there
            yield FreeText("payment_method.token", method.token.get_secret_value(), opaque=True)
        for key, value in self.metadata.items():
            yield FreeText("metadata", key, is_key=True)
            yield FreeText(f"metadata.{key}", value)


class CompleteCreate(Body):
    """What the shopper's browser brought back to the return URL, as its query parameters
    (Adyen `redirectResult` or `threeDSResult`, Stripe `payment_intent`, Checkout.com
    `cko-session-id`): opaque provider values, passed on to the provider and never stored."""

    return_params: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[StrictStr, Field(max_length=8192)]],
                             Field(max_length=20)] = {}

    def free_text(self) -> Iterator[FreeText]:
        # Sent to the provider (a Stripe payment intent id goes into the URL path, where the
        # provider's access logs keep it): a card number typed here must not travel on.
        for key, value in self.return_params.items():
            yield FreeText(f"return_params.{key}", value, opaque=True)


class CaptureCreate(Body):
    amount: Amount | None = None


class _WithReason(Body):
    reason: Annotated[StrictStr, Field(max_length=255)] | None = None

    def free_text(self) -> Iterator[FreeText]:
        if self.reason is not None:
            yield FreeText("reason", self.reason)


class RefundCreate(_WithReason):
    amount: Amount | None = None


class VoidCreate(_WithReason):
    pass
