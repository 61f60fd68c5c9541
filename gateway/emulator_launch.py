"""Start a provider emulator with the dev certificates: used by the CLI, `make run`, drills
and tests alike, so every one of them speaks TLS/mTLS the same way. With dev certificates its
webhook feed trusts the dev CA, so it can post to a gateway serving the dev server certificate."""

from __future__ import annotations

from pathlib import Path

from gateway.certs.devca import DevCertLayout, issue_dev_pair, write_pem_pair
from gateway.certs.tls import client_context, server_context
from gateway.config import ProviderConfig
from emulators.quota import QuotaPlan
from emulators.server import EmulatorServer
from emulators.registry import EMULATORS
from emulators.webhooks import WebhookTarget


def _issuer(layout: DevCertLayout, kind: str):  # type: ignore[no-untyped-def]
    def issue(days_valid: float) -> tuple[Path, Path]:
        cert_pem, key_pem = issue_dev_pair(layout, usage="server", common_name=f"{kind}-emulator",
                                           days_valid=days_valid)
        cert, key = layout.emulator_cert(kind).with_suffix(".rotated.pem"), layout.emulator_key(kind).with_suffix(
            ".rotated.key")
        write_pem_pair(cert_pem, key_pem, cert, key)
        return cert, key

    return issue


def account_quota(provider: ProviderConfig) -> QuotaPlan | None:
    """The quota the configuration says the provider's account has (`rate_limit_per_s`,
    `rate_limit_burst`), for an emulator standing in for that account; None without one."""
    if provider.rate_limit_per_s is None:
        return None
    return QuotaPlan(rate_limit_per_s=provider.rate_limit_per_s, burst=provider.rate_limit_burst)


async def start_emulator(
    kind: str,
    *,
    port: int = 0,
    admin_port: int = 0,
    certs: DevCertLayout | None = None,
    require_client_cert: bool = True,
    api_key: str | None = None,
    webhook: WebhookTarget | None = None,
    quota: QuotaPlan | None = None,
) -> EmulatorServer:
    """Plain HTTP when `certs` is None; otherwise HTTPS, and mTLS unless told not to.
    `webhook`: where its notifications go, `quota`: the account's rate limit (both also
    settable later on the admin API)."""
    emulator = EMULATORS[kind].emulator(api_key=api_key) if api_key else EMULATORS[kind].emulator()
    emulator.webhooks.set_target(webhook)
    if quota is not None:
        emulator.quota.set(quota)
    ssl_context = None
    issuer = None
    if certs is not None:
        ssl_context = server_context(certs.emulator_cert(kind), certs.emulator_key(kind),
                                     client_ca=certs.ca_cert(), require_client_cert=require_client_cert)
        issuer = _issuer(certs, kind)
        emulator.webhooks.set_client_ssl(client_context(certs.ca_cert()))
    server = EmulatorServer(emulator, port=port, admin_port=admin_port, ssl_context=ssl_context,
                            certificate_issuer=issuer)
    await server.start()
    return server
