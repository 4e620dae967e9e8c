"""A site's policy: where it may connect from, what it may send, and how much.

Loaded from the site's row into an immutable value at authentication (and cached
with it); the limits it names are enforced by app/access/quotas.py in the shared database.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.db.models import Site
from app.dicom.summary import Summary
from app.errors import (
    AddressNotAllowed,
    ClientCertificateMismatch,
    ClientCertificateRequired,
    ContentNotAllowed,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (a bare address is a /32 or /128); ValueError names the bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from exc
    return tuple(networks)


def parse_address(value: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped  # ::ffff:a.b.c.d is an IPv4 client on a dual-stack socket
    return address


@dataclass(frozen=True)
class SitePolicy:
    networks: tuple[IPNetwork, ...] = ()
    modalities: frozenset[str] = field(default_factory=frozenset)
    sop_classes: frozenset[str] = field(default_factory=frozenset)
    max_instance_bytes: int | None = None
    instances_per_minute: int | None = None
    bytes_per_day: int | None = None
    max_concurrent_uploads: int | None = None
    client_cert_sha256: str | None = None  # mutual TLS: the certificate this site must present

    @classmethod
    def of(cls, site: Site) -> SitePolicy:
        return cls(
            networks=parse_networks(site.allowed_cidrs or []),
            modalities=frozenset(m.upper() for m in site.allowed_modalities or []),
            sop_classes=frozenset(site.allowed_sop_classes or []),
            max_instance_bytes=site.max_instance_bytes,
            instances_per_minute=site.instances_per_minute,
            bytes_per_day=site.bytes_per_day,
            max_concurrent_uploads=site.max_concurrent_uploads,
            client_cert_sha256=site.client_cert_sha256,
        )

    def check_address(self, site: str, address: str | None) -> None:
        if not self.networks:
            return
        parsed = parse_address(address or "")
        if parsed is None or not any(parsed in network for network in self.networks):
            raise AddressNotAllowed(
                f"site {site!r} may not upload from {address}: not in its address allow-list",
                site=site,
            )

    def check_client_cert(self, site: str, presented_sha256: str | None) -> None:
        """The second factor: a site bound to a certificate must have shown it in the handshake."""
        if self.client_cert_sha256 is None:
            return
        if presented_sha256 is None:
            raise ClientCertificateRequired(
                f"site {site!r} must present its client certificate (mutual TLS)", site=site
            )
        if not hmac.compare_digest(presented_sha256, self.client_cert_sha256):
            raise ClientCertificateMismatch(
                f"the client certificate presented is not the one bound to site {site!r}",
                site=site,
            )

    def check_content(self, site: str, summary: Summary) -> None:
        if self.modalities and (summary.modality or "").upper() not in self.modalities:
            allowed = ", ".join(sorted(self.modalities))
            raise ContentNotAllowed(
                f"site {site!r} may not send modality {summary.modality or '(none)'!s}; "
                f"allowed: {allowed}"
            )
        if self.sop_classes and summary.sop_class_uid not in self.sop_classes:
            raise ContentNotAllowed(
                f"site {site!r} may not send SOP Class {summary.sop_class_uid}; "
                f"allowed: {', '.join(sorted(self.sop_classes))}"
            )

    def max_bytes(self, global_limit: int) -> int:
        if self.max_instance_bytes is None:
            return global_limit
        return min(global_limit, self.max_instance_bytes)
