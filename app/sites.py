"""Sites and their tokens: creation, and authentication of an upload request."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import auth
from app.errors import Unauthenticated
from app.models import Site, SiteToken, utcnow

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SiteNameInvalid(ValueError):
    pass


class SiteExists(ValueError):
    pass


@dataclass(frozen=True)
class AuthenticatedSite:
    site_id: int
    name: str
    token_id: int


@dataclass(frozen=True)
class NewSite:
    name: str
    token: str  # shown once, never stored


def add(session: Session, name: str, label: str | None = None) -> NewSite:
    """Create a site with its first token; the token is returned once."""
    if not SITE_NAME.match(name):
        raise SiteNameInvalid(
            f"site name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    token = auth.new_token()
    site = Site(name=name)
    site.tokens.append(
        SiteToken(digest=auth.digest(token), display_prefix=auth.display_prefix(token), label=label)
    )
    session.add(site)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise SiteExists(f"a site named {name!r} already exists") from exc
    return NewSite(name=name, token=token)


def authenticate(
    session: Session, credentials: auth.Credentials | None, now: datetime | None = None
) -> AuthenticatedSite:
    """The site a request speaks for, or Unauthenticated. Cheap: one indexed lookup."""
    if credentials is None:
        raise Unauthenticated("no credentials: use HTTP Basic (site name + token) or Bearer")
    if not auth.is_well_formed(credentials.token):
        raise Unauthenticated("the token is not a well-formed intake token")
    presented = auth.digest(credentials.token)
    row = session.execute(
        select(SiteToken, Site).join(Site).where(SiteToken.digest == presented)
    ).first()
    # Lookup by digest is by an index; compare again in constant time all the same.
    if row is None or not secrets.compare_digest(row[0].digest, presented):
        raise Unauthenticated("unknown site or token")
    token, site = row[0], row[1]
    if credentials.site_name is not None and not secrets.compare_digest(
        credentials.site_name.encode(), site.name.encode()
    ):
        raise Unauthenticated("unknown site or token")
    now = now or utcnow()
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
        raise Unauthenticated("the token is revoked or expired")
    if site.disabled_at is not None:
        raise Unauthenticated("the site is disabled")
    return AuthenticatedSite(site_id=site.id, name=site.name, token_id=token.id)
