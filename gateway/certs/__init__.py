"""Certificates: a dev CA, TLS contexts that rotate without restart, and expiry inspection.

Ops rotate what lives under ``certs/``; this package is what reads, checks and loads it.
"""

from gateway.certs.devca import DevCertLayout, generate_dev_certs, issue_dev_pair
from gateway.certs.inspect import (
    CertInfo,
    CertStatus,
    inspect_file,
    inspect_pem,
    key_matches_cert,
    verify_chain,
)
from gateway.certs.tls import client_context, reload_cert_chain, server_context

__all__ = [
    "CertInfo",
    "CertStatus",
    "DevCertLayout",
    "client_context",
    "generate_dev_certs",
    "inspect_file",
    "inspect_pem",
    "issue_dev_pair",
    "key_matches_cert",
    "reload_cert_chain",
    "server_context",
    "verify_chain",
]
