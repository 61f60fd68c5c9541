"""The rule for a payment's `return_url`, where the provider sends the shopper back after a
3-D Secure challenge or another redirect.

- It is an absolute `https://` URL with a host and no user name or password in it (the shopper's
  browser follows it, and a provider would echo credentials into its redirect). `http://` is
  accepted only to a loopback host (127.0.0.1, ::1, localhost), and only where the configuration
  allows it for development (`three_ds.allow_http_loopback_return_url`).
- It is required where a redirect will follow: when the payment asks for authentication
  (`three_ds` `any` or `challenge`), and on every route whose return-URL policy is `required`
  (checked by the payment service once the route is known). Without one, no provider is asked
  for a redirect (Checkout.com's 3-D Secure stays off; Stripe's required cards answer
  `use_stripe_sdk`, an action of type `sdk`).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from domain.types import ThreeDS
from gateway.http.errors import ApiError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
# A DNS name as browsers resolve it: labels of letters, digits and inner hyphens (IDNs in their
# xn-- form), none empty, at most 63 characters each, 253 in all, the last not all digits.
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def check_return_url(url: str | None, three_ds: ThreeDS, *, allow_http_loopback: bool) -> None:
    """Raise a 422 naming `return_url` when it breaks the rule."""
    if url is None:
        if three_ds is not ThreeDS.AUTOMATIC:
            raise ApiError(422, "return_url_required", f"three_ds {three_ds.value} sends the shopper to "
                           "authenticate: a return_url must bring them back", "return_url")
        return
    problem = _problem(url, allow_http_loopback)
    if problem is not None:
        raise ApiError(422, "invalid_return_url", problem, "return_url")


def _problem(url: str, allow_http_loopback: bool) -> str | None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return "return_url is not a valid URL"
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        return "return_url must be printable ASCII without spaces (percent-encode the rest)"
    if parts.scheme not in ("https", "http") or not host:
        return "return_url must be an absolute https URL"
    if not _valid_host(host) or parts.port == 0:
        return "return_url must name a host a browser can reach (a DNS name or an IP address, a port from 1)"
    if parts.username is not None or parts.password is not None:
        return "return_url must not carry a user name or password"
    if parts.scheme == "http" and not (allow_http_loopback and host in LOOPBACK_HOSTS):
        return "return_url must be https (http only to a loopback host, where the configuration allows it)"
    return None


def _valid_host(host: str) -> bool:
    """A DNS name (see _LABEL) or an IP address. An outside attack had `https://%zz/`,
    `https://exa%00mple.com/`, `https://1.2.3.4.5/` and `https://.../` accepted: each is a
    redirect the provider would send the shopper to, and no browser can follow."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".") if len(host) <= 253 else []
    if not labels or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return False
    try:  # an IDN label must decode (xn-- alone does not)
        return all(not label.startswith("xn--") or bool(label.encode().decode("idna")) for label in labels)
    except UnicodeError:
        return False
