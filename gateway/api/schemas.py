"""Request bodies as pydantic models: validated once at the door, published in /openapi.json."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from gateway.api.currencies import ISO_4217
from domain.cards import luhn_valid

Amount = Annotated[StrictInt, Field(gt=0, le=10**12, description="Amount in minor units (cents)")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CardMethod(_Body):
    type: Literal["card"]
    number: Annotated[StrictStr, Field(min_length=12, max_length=19, pattern=r"^[0-9]+$")]
    exp_month: Annotated[StrictInt, Field(ge=1, le=12)]
    exp_year: Annotated[StrictInt, Field(ge=2000, le=2100)]
    cvc: Annotated[StrictStr, Field(pattern=r"^[0-9]{3,4}$")] | None = None
    holder_name: Annotated[StrictStr, Field(max_length=100)] | None = None

    @field_validator("number")
    @classmethod
    def _luhn(cls, value: str) -> str:
        if not luhn_valid(value):
            raise ValueError("card number fails the Luhn check")
        return value


class TokenMethod(_Body):
    type: Literal["token"]
    token: Annotated[StrictStr, Field(min_length=3, max_length=255)]


class PaymentCreate(_Body):
    amount: Amount
    currency: Annotated[StrictStr, Field(min_length=3, max_length=3, description="ISO 4217 code")]
    payment_method: Annotated[CardMethod | TokenMethod, Field(discriminator="type")]
    capture: StrictBool = True
    merchant_reference: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    country: Annotated[StrictStr, Field(pattern=r"^[A-Z]{2}$")] | None = None
    description: Annotated[StrictStr, Field(max_length=255)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=40)], Annotated[StrictStr, Field(max_length=500)]],
                        Field(max_length=20)] = {}

    @field_validator("currency")
    @classmethod
    def _iso_4217(cls, value: str) -> str:
        if value.upper() not in ISO_4217:
            raise ValueError(f"unknown currency {value!r} (ISO 4217)")
        return value.upper()


class CaptureCreate(_Body):
    amount: Amount | None = None


class RefundCreate(_Body):
    amount: Amount | None = None
    reason: Annotated[StrictStr, Field(max_length=255)] | None = None


class VoidCreate(_Body):
    reason: Annotated[StrictStr, Field(max_length=255)] | None = None
