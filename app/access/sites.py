"""Sites and their tokens: the one service layer behind the CLI and the admin API.

A site may hold several live tokens (rotation keeps the old one valid for a grace
period). Deleting a site keeps its row, so the intake log stays attributed; its
tokens are revoked and its name stays taken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.access import tokens
from app.access.policy import SitePolicy, parse_networks
from app.db.models import Site, SiteToken, utcnow
from app.errors import (
    InvalidName,
    InvalidPolicy,
    SiteExists,
    SiteNotFound,
    Unauthenticated,
    UnknownTokenPrefix,
)

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always fullmatch: `$` takes a newline
POLICY_LIMITS = (
    "max_instance_bytes",
    "instances_per_minute",
    "bytes_per_day",
    "max_concurrent_uploads",
)
POLICY_LISTS = ("allowed_cidrs", "allowed_modalities", "allowed_sop_classes")
POLICY_BINDINGS = ("client_cert_sha256",)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def normalise_fingerprint(value: str) -> str:
    """``AB:CD:…`` or ``abcd…`` (as openssl and browsers print SHA-256 fingerprints)."""
    cleaned = value.strip().lower().replace(":", "").removeprefix("sha256=")
    if not _SHA256_HEX.fullmatch(cleaned):
        raise InvalidPolicy(
            "a client certificate fingerprint is 64 hex digits (SHA-256 of the DER)"
        )
    return cleaned


@dataclass(frozen=True)
class AuthenticatedSite:
    site_id: int
    name: str
    token_id: int
    token_digest: str
    token_expires_at: datetime | None
    policy: SitePolicy = field(default_factory=SitePolicy)


@dataclass(frozen=True)
class NewToken:
    site: str
    token: str  # shown once, never stored
    token_id: int
    expires_at: datetime | None


@dataclass(frozen=True)
class TokenView:
    id: int
    prefix: str
    label: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    last_used_ip: str | None

    def live(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class SiteView:
    id: int
    name: str
    created_at: datetime
    disabled_at: datetime | None
    deleted_at: datetime | None
    policy: dict[str, Any]
    tokens: tuple[TokenView, ...]

    @property
    def status(self) -> str:
        if self.deleted_at:
            return "deleted"
        return "disabled" if self.disabled_at else "active"


PEER_NAME = "intake"
# Seconds a site's Orthanc gives one request (the peer's or the DICOMweb server's
# `Timeout`, else its global HttpTimeout, 60 s): the whole upload of an instance over the
# site's uplink (docs/DEPLOYMENT.md, "Site onboarding").
PEER_TIMEOUT_SECONDS = 300


def site_snippets(peer_url: str, site: str, token: str) -> dict[str, dict[str, Any]]:
    """What a site pastes into its Orthanc: a peer (Basic or Bearer) and a DICOMweb server.

    Both are Orthanc "web service" entries (OrthancPeers and the DICOMweb plugin's
    DicomWeb.Servers take the same keys, `Timeout` per entry included); an
    `Authorization` header in `HttpHeaders` replaces Basic. The plugin's STOW-RS client
    posts to `{Url}studies`, which is the intake's `/dicom-web/studies`. The CLI and the
    admin API both hand out these.
    """
    timeout = {"Timeout": PEER_TIMEOUT_SECONDS}
    bearer = {"Authorization": f"Bearer {token}"}
    return {
        "orthanc_peer": {"Url": peer_url, "Username": site, "Password": token} | timeout,
        "orthanc_peer_bearer": {"Url": peer_url, "HttpHeaders": bearer} | timeout,
        "dicomweb_server": {"Url": f"{peer_url}dicom-web/", "HttpHeaders": bearer} | timeout,
    }


def url_warnings(public_url: str | None, peer_url: str) -> list[str]:
    """What is wrong, for a remote site, with the URL the snippets carry."""
    if not public_url:
        return [
            f"INTAKE_PUBLIC_URL is unset, so the snippets carry {peer_url}, this host's own "
            "listener, which a remote site cannot use: put the address sites reach (e.g. "
            "https://intake.example.org/) in their Url, and set INTAKE_PUBLIC_URL to it for "
            "the next sites."
        ]
    if peer_url.startswith("http://"):
        return [
            f"{peer_url} is plain HTTP: the token would cross the network in clear. Give sites "
            "an https:// URL (TLS on the intake or on a reverse proxy, docs/DEPLOYMENT.md)."
        ]
    return []


def _view(site: Site) -> SiteView:
    return SiteView(
        id=site.id,
        name=site.name,
        created_at=site.created_at,
        disabled_at=site.disabled_at,
        deleted_at=site.deleted_at,
        policy={k: getattr(site, k) for k in (*POLICY_LISTS, *POLICY_LIMITS, *POLICY_BINDINGS)},
        tokens=tuple(
            TokenView(
                id=t.id,
                prefix=t.display_prefix,
                label=t.label,
                created_at=t.created_at,
                expires_at=t.expires_at,
                revoked_at=t.revoked_at,
                last_used_at=t.last_used_at,
                last_used_ip=t.last_used_ip,
            )
            for t in sorted(site.tokens, key=lambda t: t.id)
        ),
    )


def _get(session: Session, name: str, *, include_deleted: bool = False) -> Site:
    site = session.scalar(select(Site).where(Site.name == name))
    if site is None or (site.deleted_at is not None and not include_deleted):
        raise SiteNotFound(f"no site named {name!r}")
    return site


def _issue(
    site: Site, label: str | None, lifetime: timedelta | None, now: datetime
) -> tuple[SiteToken, str]:
    token = tokens.new_token()
    row = SiteToken(
        digest=tokens.digest(token),
        display_prefix=tokens.display_prefix(token),
        label=label,
        created_at=now,
        expires_at=now + lifetime if lifetime else None,
    )
    site.tokens.append(row)
    return row, token


def add(
    session: Session,
    name: str,
    label: str | None = None,
    lifetime: timedelta | None = timedelta(days=365),
) -> NewToken:
    """Create a site with its first token; the token is returned once."""
    if not SITE_NAME.fullmatch(name):
        raise InvalidName(
            f"site name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    now = utcnow()
    site = Site(name=name, allowed_cidrs=[], allowed_modalities=[], allowed_sop_classes=[])
    row, token = _issue(site, label, lifetime, now)
    session.add(site)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise SiteExists(
            f"a site named {name!r} already exists (deleted names stay taken)"
        ) from exc
    return NewToken(site=name, token=token, token_id=row.id, expires_at=row.expires_at)


def rotate(
    session: Session,
    name: str,
    grace: timedelta,
    label: str | None = None,
    lifetime: timedelta | None = timedelta(days=365),
) -> NewToken:
    """Issue a new token; every other live token of the site expires after ``grace``."""
    site = _get(session, name)
    now = utcnow()
    for old in site.tokens:
        if old.revoked_at is None and (old.expires_at is None or old.expires_at > now + grace):
            old.expires_at = now + grace
    row, token = _issue(site, label, lifetime, now)
    session.commit()
    return NewToken(site=name, token=token, token_id=row.id, expires_at=row.expires_at)


def revoke(session: Session, name: str, token_prefix: str | None = None) -> int:
    """Revoke one token (by its visible prefix) or, without a prefix, all; how many."""
    site = _get(session, name, include_deleted=True)
    now = utcnow()
    targets = [
        t
        for t in site.tokens
        if t.revoked_at is None and (token_prefix is None or t.display_prefix == token_prefix)
    ]
    if token_prefix is not None and not targets:
        raise UnknownTokenPrefix(
            f"site {name!r} has no unrevoked token with prefix {token_prefix!r}"
        )
    for token in targets:
        token.revoked_at = now
    session.commit()
    return len(targets)


def set_disabled(session: Session, name: str, disabled: bool) -> SiteView:
    site = _get(session, name)
    site.disabled_at = utcnow() if disabled else None
    session.commit()
    return _view(site)


def delete(session: Session, name: str) -> SiteView:
    """Retire a site: tokens revoked, uploads refused; its history stays."""
    site = _get(session, name)
    now = utcnow()
    site.deleted_at = now
    for token in site.tokens:
        token.revoked_at = token.revoked_at or now
    session.commit()
    return _view(site)


def set_policy(session: Session, name: str, **changes: Any) -> SiteView:
    """Change policy fields; a limit of None (or a list of []) removes that restriction."""
    site = _get(session, name)
    for key, value in changes.items():
        if key in POLICY_LIMITS:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidPolicy(f"{key} must be a positive whole number, or unset")
        elif key == "allowed_cidrs":
            try:
                value = [str(n) for n in parse_networks(value)]
            except ValueError as exc:
                raise InvalidPolicy(str(exc)) from exc
        elif key == "allowed_modalities":
            value = sorted({str(v).strip().upper() for v in value if str(v).strip()})
        elif key == "allowed_sop_classes":
            value = sorted({str(v).strip() for v in value if str(v).strip()})
        elif key == "client_cert_sha256":
            value = None if value is None else normalise_fingerprint(str(value))
        else:
            raise InvalidPolicy(f"unknown policy field {key!r}")
        setattr(site, key, value)
    session.commit()
    return _view(site)


def show(session: Session, name: str) -> SiteView:
    return _view(_get(session, name, include_deleted=True))


def list_sites(session: Session, include_deleted: bool = False) -> list[SiteView]:
    query = select(Site).order_by(Site.name)
    if not include_deleted:
        query = query.where(Site.deleted_at.is_(None))
    return [_view(site) for site in session.scalars(query)]


def lookup(session: Session, digest: str) -> AuthenticatedSite | None:
    """The site and token behind a digest, whatever their state (check() decides)."""
    row = session.execute(
        select(SiteToken, Site).join(Site).where(SiteToken.digest == digest)
    ).first()
    if row is None:
        return None
    token, site = row[0], row[1]
    expires = token.expires_at
    if token.revoked_at is not None or site.disabled_at is not None or site.deleted_at:
        # A dead credential is remembered as already expired.
        expires = datetime.min.replace(tzinfo=token.created_at.tzinfo)
    return AuthenticatedSite(
        site_id=site.id,
        name=site.name,
        token_id=token.id,
        token_digest=digest,
        token_expires_at=expires,
        policy=SitePolicy.of(site),
    )


def check(found: AuthenticatedSite, site_name: str | None, now: datetime) -> AuthenticatedSite:
    """Refuse a looked-up credential that is expired, revoked or named for another site."""
    # The digest matched by an indexed lookup; compare names in constant time all the same.
    if site_name is not None and not tokens.same(site_name, found.name):
        raise Unauthenticated("unknown site or token")
    if found.token_expires_at is not None and found.token_expires_at <= now:
        # The token was the site's: the refusal log names it.
        raise Unauthenticated(
            "the token is revoked or expired, or the site is disabled", site=found.name
        )
    return found


def touch(session: Session, token_id: int, address: str | None, now: datetime) -> None:
    token = session.get(SiteToken, token_id)
    if token is not None:
        token.last_used_at = now
        token.last_used_ip = (address or "")[:64] or None
        session.commit()
