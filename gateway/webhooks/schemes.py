"""Each provider kind's webhook scheme (signature check, event parser, the answer it expects),
looked up by kind in one place, and the configured secrets of each provider name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module

from domain.webhook import ProviderEvent
from gateway.config import GatewayConfig

Verify = Callable[[bytes, Mapping[str, str], Sequence[str], float], None]
Parse = Callable[[bytes], tuple[ProviderEvent, ...]]


@dataclass(frozen=True, slots=True)
class WebhookScheme:
    verify: Verify  # raises domain.webhook.SignatureInvalid
    parse: Parse  # raises domain.webhook.MalformedEvent
    answer: tuple[int, bytes, str]  # status, body, content type the provider expects on success


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """One provider name's webhook URL: its kind's scheme and the secrets it accepts now."""

    provider: str
    scheme: WebhookScheme
    secrets: tuple[str, ...]

    def __repr__(self) -> str:  # never the secrets
        return f"WebhookEndpoint({self.provider!r}, secrets={len(self.secrets)})"


def scheme(kind: str) -> WebhookScheme:
    module = import_module(f"providers.{kind}.webhook")
    return WebhookScheme(module.verify, module.parse, module.ANSWER)


def endpoints(config: GatewayConfig) -> dict[str, WebhookEndpoint]:
    """Every provider with webhook secrets configured; the others have no webhook URL."""
    return {name: WebhookEndpoint(name, scheme(p.kind), tuple(s.get_secret_value() for s in p.webhook_keys))
            for name, p in config.providers.items() if p.webhook_keys}
