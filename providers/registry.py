"""Provider kinds by name: the one place that knows which mapping and emulator serve a kind."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any


@dataclass(frozen=True, slots=True)
class ProviderKind:
    name: str
    module: str
    mapping_class: str
    emulator_class: str
    default_port: int

    def mapping(self, name: str, api_key: str, *, merchant_account: str | None = None) -> Any:
        cls = getattr(import_module(f"{self.module}.mapping"), self.mapping_class)
        return cls(name, api_key, merchant_account=merchant_account)

    def emulator(self, **kwargs: Any) -> Any:
        cls = getattr(import_module(f"{self.module}.emulator"), self.emulator_class)
        return cls(**kwargs)

    def scenario_cards(self) -> dict[str, str]:
        """Cards by behaviour ("approve", "insufficient_funds", "stolen_card", "do_not_honor",
        "issuer_unavailable"), as the provider's public test-card docs define them."""
        return dict(import_module(f"{self.module}.emulator").SCENARIO_CARDS)


KINDS: dict[str, ProviderKind] = {
    k.name: k
    for k in (
        ProviderKind("stripe", "providers.stripe", "StripeMapping", "StripeEmulator", 9101),
        ProviderKind("adyen", "providers.adyen", "AdyenMapping", "AdyenEmulator", 9102),
        ProviderKind("checkout", "providers.checkout", "CheckoutMapping", "CheckoutEmulator", 9103),
    )
}
