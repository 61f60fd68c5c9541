"""Provider kinds by name: the one place that knows which mapping serves a kind."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any


@dataclass(frozen=True, slots=True)
class ProviderKind:
    name: str
    module: str
    mapping_class: str

    def mapping_type(self) -> Any:
        """The mapping class, for what it says of its provider without an account (`redirects`)."""
        return getattr(import_module(f"{self.module}.mapping"), self.mapping_class)

    def mapping(self, name: str, api_key: str, *, merchant_account: str | None = None) -> Any:
        return self.mapping_type()(name, api_key, merchant_account=merchant_account)


KINDS: dict[str, ProviderKind] = {
    k.name: k
    for k in (
        ProviderKind("stripe", "providers.stripe", "StripeMapping"),
        ProviderKind("adyen", "providers.adyen", "AdyenMapping"),
        ProviderKind("checkout", "providers.checkout", "CheckoutMapping"),
    )
}
