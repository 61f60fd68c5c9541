"""Emulator kinds by name: which emulator class stands in for each provider kind, on which
default port, with which public test cards (3-D Secure ones too)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any


@dataclass(frozen=True, slots=True)
class EmulatorKind:
    name: str
    module: str
    emulator_class: str
    default_port: int

    def emulator(self, **kwargs: Any) -> Any:
        return getattr(import_module(self.module), self.emulator_class)(**kwargs)

    def scenario_cards(self) -> dict[str, str]:
        """Cards by behaviour ("approve", "insufficient_funds", "stolen_card", "do_not_honor",
        "issuer_unavailable"), as the provider's public test-card docs define them."""
        return dict(import_module(self.module).SCENARIO_CARDS)

    def threeds_cards(self) -> dict[str, str]:
        """3-D Secure cards by behaviour ("frictionless", "challenge": the shopper's Complete /
        Fail decides), from the provider's test-card docs."""
        return dict(import_module(self.module).THREEDS_SCENARIO_CARDS)


EMULATORS: dict[str, EmulatorKind] = {
    k.name: k
    for k in (
        EmulatorKind("stripe", "emulators.stripe", "StripeEmulator", 9101),
        EmulatorKind("adyen", "emulators.adyen", "AdyenEmulator", 9102),
        EmulatorKind("checkout", "emulators.checkout", "CheckoutEmulator", 9103),
    )
}
