"""``orthanc-intake sites``: the sites allowed to upload, their tokens and policy."""

from __future__ import annotations

import hashlib
import json
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from app.access import sites
from app.cli.common import (
    JsonOpt,
    admin_session,
    print_json,
)
from app.settings import Settings

sites_cli = typer.Typer(no_args_is_help=True, help="Manage the sites allowed to upload.")
PEER_NAME, PEER_TIMEOUT_SECONDS = sites.PEER_NAME, sites.PEER_TIMEOUT_SECONDS


def _print_new_token(settings: Settings, created: sites.NewToken, as_json: bool, verb: str) -> None:
    snippets = sites.site_snippets(settings.peer_url, created.site, created.token)
    warnings = sites.url_warnings(settings.public_url, settings.peer_url)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(
            {
                "site": created.site,
                "token": created.token,
                "token_id": created.token_id,
                "expires_at": created.expires_at,
                **snippets,
                "warnings": warnings,
            }
        )
        return
    typer.echo(f"Site {created.site!r} {verb}.")
    typer.echo(f"Token (shown once; store it now): {created.token}")
    if created.expires_at:
        typer.echo(f"It expires at {created.expires_at.isoformat()}.")
    typer.echo("")
    typer.echo("A site Orthanc sending as a peer: paste into its configuration (HTTP Basic):")
    typer.echo(json.dumps({"OrthancPeers": {PEER_NAME: snippets["orthanc_peer"]}}, indent=2))
    typer.echo("")
    typer.echo("or, as a Bearer header:")
    typer.echo(json.dumps({"OrthancPeers": {PEER_NAME: snippets["orthanc_peer_bearer"]}}, indent=2))
    typer.echo("")
    typer.echo(
        'A site Orthanc sending with STOW-RS (DICOMweb plugin): add to "Servers" in its '
        '"DicomWeb" section (Debian: /etc/orthanc/dicomweb.json):'
    )
    typer.echo(
        json.dumps({"DicomWeb": {"Servers": {PEER_NAME: snippets["dicomweb_server"]}}}, indent=2)
    )
    typer.echo("")
    typer.echo(
        f'"Timeout" is seconds per request: raise it if the site\'s largest instance takes '
        f"longer than {PEER_TIMEOUT_SECONDS} s over its uplink. To send a study, on the site's "
        f"Orthanc: POST /peers/{PEER_NAME}/store or POST /dicom-web/servers/{PEER_NAME}/stow "
        'with {"Resources": ["<study ID>"]}.'
    )
    if settings.peer_url.startswith("https://"):
        typer.echo(
            'Orthanc 1.10-1.12.5 senders: set "HttpsCACertificates" to a CA bundle '
            "(e.g. /etc/ssl/certs/ca-certificates.crt) or HTTPS peers fail with curl error 77."
        )


def _lifetime(settings: Settings) -> timedelta:
    return timedelta(days=settings.token_lifetime_days)


@sites_cli.command("add")
def sites_add(
    name: Annotated[str, typer.Argument(help="Site name; also the HTTP Basic user name.")],
    as_json: JsonOpt = False,
    label: Annotated[str | None, typer.Option(help="A note about the first token.")] = None,
) -> None:
    """Create a site; print its token (once) and the OrthancPeers snippet."""
    with admin_session() as (settings, session):
        created = sites.add(session, name, label, _lifetime(settings))
    _print_new_token(settings, created, as_json, "created")


@sites_cli.command("rotate")
def sites_rotate(
    name: str,
    as_json: JsonOpt = False,
    grace_days: Annotated[
        float | None,
        typer.Option(help="How long the site's other tokens stay valid (default 30 days)."),
    ] = None,
    label: Annotated[str | None, typer.Option(help="A note about the new token.")] = None,
) -> None:
    """Issue a new token; the old ones keep working for the grace period."""
    with admin_session() as (settings, session):
        days = settings.token_rotation_grace_days if grace_days is None else grace_days
        created = sites.rotate(session, name, timedelta(days=days), label, _lifetime(settings))
    _print_new_token(settings, created, as_json, "has a new token")


@sites_cli.command("revoke")
def sites_revoke(
    name: str,
    token: Annotated[str | None, typer.Option(help="The token's visible prefix.")] = None,
    all_tokens: Annotated[bool, typer.Option("--all", help="Revoke every token.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token at once (by its prefix), or all of the site's tokens."""
    if (token is None) == (not all_tokens):
        typer.echo("error: give --token PREFIX or --all", err=True)
        raise typer.Exit(2)
    with admin_session() as (_, session):
        count = sites.revoke(session, name, token)
    if as_json:
        print_json({"site": name, "revoked": count})
    else:
        typer.echo(f"revoked {count} token(s) of {name!r}")


def _fingerprint(pem_file: Path) -> str:
    """SHA-256 of the first certificate in a PEM file, as the TLS layer computes it."""
    try:
        der = ssl.PEM_cert_to_DER_cert(pem_file.read_text(encoding="ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        typer.echo(f"error: {pem_file} does not hold a PEM certificate", err=True)
        raise typer.Exit(2) from exc
    return hashlib.sha256(der).hexdigest()


def _show(view: sites.SiteView, as_json: bool) -> None:
    if as_json:
        print_json(view)
        return
    typer.echo(f"{view.name}  [{view.status}]  created {view.created_at:%Y-%m-%d}")
    policy = {k: v for k, v in view.policy.items() if v not in (None, [])}
    typer.echo(f"  policy: {json.dumps(policy) if policy else 'no restrictions'}")
    for t in view.tokens:
        state = "revoked" if t.revoked_at else f"expires {t.expires_at:%Y-%m-%d %H:%M}"
        used = (
            f"last used {t.last_used_at:%Y-%m-%d %H:%M} from {t.last_used_ip}"
            if t.last_used_at
            else "never used"
        )
        typer.echo(f"  token {t.prefix}…  {t.label or ''}  {state}  {used}")


@sites_cli.command("list")
def sites_list(
    as_json: JsonOpt = False,
    include_deleted: Annotated[bool, typer.Option("--all", help="Include deleted sites.")] = False,
) -> None:
    """List the sites."""
    with admin_session() as (_, session):
        views = sites.list_sites(session, include_deleted)
    if as_json:
        print_json(views)
        return
    for view in views:
        live = sum(1 for t in view.tokens if t.revoked_at is None)
        typer.echo(f"{view.name}\t{view.status}\t{live} unrevoked token(s)")


@sites_cli.command("show")
def sites_show(name: str, as_json: JsonOpt = False) -> None:
    """A site's tokens (prefixes only), their use, and its policy."""
    with admin_session() as (_, session):
        _show(sites.show(session, name), as_json)


@sites_cli.command("disable")
def sites_disable(name: str, as_json: JsonOpt = False) -> None:
    """Refuse the site's uploads until it is enabled again."""
    with admin_session() as (_, session):
        _show(sites.set_disabled(session, name, True), as_json)


@sites_cli.command("enable")
def sites_enable(name: str, as_json: JsonOpt = False) -> None:
    """Accept the site's uploads again."""
    with admin_session() as (_, session):
        _show(sites.set_disabled(session, name, False), as_json)


@sites_cli.command("delete")
def sites_delete(name: str, as_json: JsonOpt = False) -> None:
    """Retire a site: tokens revoked, uploads refused, its intake history kept."""
    with admin_session() as (_, session):
        _show(sites.delete(session, name), as_json)


@sites_cli.command("policy")
def sites_policy(
    name: str,
    allow_cidr: Annotated[
        list[str] | None, typer.Option(help="Allowed client network (repeat); replaces the list.")
    ] = None,
    allow_modality: Annotated[
        list[str] | None, typer.Option(help="Allowed Modality, e.g. CT (repeat).")
    ] = None,
    allow_sop_class: Annotated[
        list[str] | None, typer.Option(help="Allowed SOP Class UID (repeat).")
    ] = None,
    max_instance_bytes: Annotated[int | None, typer.Option(min=1)] = None,
    instances_per_minute: Annotated[int | None, typer.Option(min=1)] = None,
    bytes_per_day: Annotated[int | None, typer.Option(min=1)] = None,
    max_concurrent_uploads: Annotated[int | None, typer.Option(min=1)] = None,
    client_cert_sha256: Annotated[
        str | None,
        typer.Option(
            help="Mutual TLS: bind the site to this client certificate (SHA-256 of its DER, "
            "hex, colons allowed); it must then present it as well as its token."
        ),
    ] = None,
    client_cert: Annotated[
        Path | None,
        typer.Option(
            help="Mutual TLS: bind the site to the client certificate in this PEM file.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    clear: Annotated[
        list[str] | None,
        typer.Option(help="Remove a restriction, e.g. --clear allowed_cidrs (repeat)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Set a site's allow-lists and limits; options not given stay as they are."""
    changes: dict[str, Any] = {}
    for key in clear or []:
        if key in sites.POLICY_LISTS:
            changes[key] = []
        elif key in (*sites.POLICY_LIMITS, *sites.POLICY_BINDINGS):
            changes[key] = None
        else:
            typer.echo(f"error: cannot clear {key!r}", err=True)
            raise typer.Exit(2)
    given = {
        "allowed_cidrs": allow_cidr,
        "allowed_modalities": allow_modality,
        "allowed_sop_classes": allow_sop_class,
        "max_instance_bytes": max_instance_bytes,
        "instances_per_minute": instances_per_minute,
        "bytes_per_day": bytes_per_day,
        "max_concurrent_uploads": max_concurrent_uploads,
        "client_cert_sha256": client_cert_sha256,
    }
    if client_cert is not None:
        given["client_cert_sha256"] = _fingerprint(client_cert)
    changes.update({k: v for k, v in given.items() if v is not None})
    with admin_session() as (_, session):
        _show(sites.set_policy(session, name, **changes), as_json)
