"""The ``orthanc-intake`` command: serve, migrate, sites and admins."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any

import typer
from sqlalchemy.orm import Session

from app import admins, migrations, sites
from app.db import make_engine, make_sessionmaker
from app.settings import Settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
sites_cli = typer.Typer(no_args_is_help=True, help="Manage the sites allowed to upload.")
admins_cli = typer.Typer(no_args_is_help=True, help="Manage admin accounts.")
cli.add_typer(sites_cli, name="sites")
cli.add_typer(admins_cli, name="admins")

PEER_NAME = "intake"
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


def _settings() -> Settings:
    return Settings()


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request line at INFO; the forwarder logs its own.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@contextlib.contextmanager
def _session() -> Iterator[tuple[Settings, Session]]:
    """A session on the configured database, migrated first; site errors exit 2."""
    settings = _settings()
    if settings.auto_migrate:
        migrations.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield settings, session
    except sites.SiteError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        engine.dispose()


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, sites.SiteView):
            data["status"] = value.status
        return data
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(_jsonable(value), indent=2))


@cli.command()
def serve() -> None:
    """Run the public and admin listeners and the forwarder."""
    from app.main import serve as run  # imported here: keeps the other commands light

    settings = _settings()
    _logging(settings)
    asyncio.run(run(settings))


@cli.command()
def migrate() -> None:
    """Bring the database schema up to date."""
    settings = _settings()
    _logging(settings)
    migrations.upgrade(settings.database_url)
    typer.echo("database schema is up to date")


def _print_new_token(settings: Settings, created: sites.NewToken, as_json: bool, verb: str) -> None:
    peers = sites.orthanc_peers(settings.peer_url, created.site, created.token)
    if as_json:
        _print_json(
            {
                "site": created.site,
                "token": created.token,
                "token_id": created.token_id,
                "expires_at": created.expires_at,
                "orthanc_peer": peers["basic"],
                "orthanc_peer_bearer": peers["bearer"],
            }
        )
        return
    typer.echo(f"Site {created.site!r} {verb}.")
    typer.echo(f"Token (shown once; store it now): {created.token}")
    if created.expires_at:
        typer.echo(f"It expires at {created.expires_at.isoformat()}.")
    typer.echo("")
    typer.echo("Paste into the site's Orthanc configuration (HTTP Basic):")
    typer.echo(json.dumps({"OrthancPeers": {PEER_NAME: peers["basic"]}}, indent=2))
    typer.echo("")
    typer.echo("or, as a Bearer header:")
    typer.echo(json.dumps({"OrthancPeers": {PEER_NAME: peers["bearer"]}}, indent=2))
    typer.echo("")
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
    with _session() as (settings, session):
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
    with _session() as (settings, session):
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
    with _session() as (_, session):
        count = sites.revoke(session, name, token)
    if as_json:
        _print_json({"site": name, "revoked": count})
    else:
        typer.echo(f"revoked {count} token(s) of {name!r}")


def _show(view: sites.SiteView, as_json: bool) -> None:
    if as_json:
        _print_json(view)
        return
    typer.echo(f"{view.name}  [{view.status}]  created {view.created_at:%Y-%m-%d}")
    policy = {k: v for k, v in view.policy.items() if v not in (None, [])}
    typer.echo(f"  policy: {json.dumps(policy) if policy else 'no restrictions'}")
    for t in view.tokens:
        state = "revoked" if t.revoked_at else f"expires {t.expires_at:%Y-%m-%d %H:%M}"
        used = f"last used {t.last_used_at:%Y-%m-%d %H:%M} from {t.last_used_ip}"
        typer.echo(
            f"  token {t.prefix}…  {t.label or ''}  {state}  "
            f"{used if t.last_used_at else 'never used'}"
        )


@sites_cli.command("list")
def sites_list(
    as_json: JsonOpt = False,
    include_deleted: Annotated[bool, typer.Option("--all", help="Include deleted sites.")] = False,
) -> None:
    """List the sites."""
    with _session() as (_, session):
        views = sites.list_sites(session, include_deleted)
    if as_json:
        _print_json(views)
        return
    for view in views:
        live = sum(1 for t in view.tokens if t.revoked_at is None)
        typer.echo(f"{view.name}\t{view.status}\t{live} unrevoked token(s)")


@sites_cli.command("show")
def sites_show(name: str, as_json: JsonOpt = False) -> None:
    """A site's tokens (prefixes only), their use, and its policy."""
    with _session() as (_, session):
        _show(sites.show(session, name), as_json)


@sites_cli.command("disable")
def sites_disable(name: str, as_json: JsonOpt = False) -> None:
    """Refuse the site's uploads until it is enabled again."""
    with _session() as (_, session):
        _show(sites.set_disabled(session, name, True), as_json)


@sites_cli.command("enable")
def sites_enable(name: str, as_json: JsonOpt = False) -> None:
    """Accept the site's uploads again."""
    with _session() as (_, session):
        _show(sites.set_disabled(session, name, False), as_json)


@sites_cli.command("delete")
def sites_delete(name: str, as_json: JsonOpt = False) -> None:
    """Retire a site: tokens revoked, uploads refused, its intake history kept."""
    with _session() as (_, session):
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
        elif key in sites.POLICY_LIMITS:
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
    }
    changes.update({k: v for k, v in given.items() if v is not None})
    with _session() as (_, session):
        try:
            view = sites.set_policy(session, name, **changes)
        except ValueError as exc:
            raise sites.SiteError(str(exc)) from exc
        _show(view, as_json)


@admins_cli.command("add")
def admins_add(
    name: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create an admin account (argon2-hashed password)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _session() as (_, session):
        view = admins.add(session, name, password)
    if as_json:
        _print_json(view)
    else:
        typer.echo(f"admin {view.name!r} created")


@admins_cli.command("token")
def admins_token(
    name: str,
    label: Annotated[str | None, typer.Option(help="What uses it, e.g. 'php-app'.")] = None,
    revoke: Annotated[
        str | None, typer.Option(help="Revoke the admin token with this prefix instead.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a Bearer token for the admin API (shown once), or revoke one."""
    with _session() as (_, session):
        if revoke is not None:
            admins.revoke_token(session, revoke)
            if as_json:
                _print_json({"revoked": revoke})
            else:
                typer.echo(f"admin token {revoke} revoked")
            return
        issued = admins.issue_token(session, name, label)
    if as_json:
        _print_json(issued)
    else:
        typer.echo(f"Admin token for {issued.admin!r} (shown once; store it now): {issued.token}")
        typer.echo(f"Use it as: Authorization: Bearer {issued.token}")


@admins_cli.command("list")
def admins_list(as_json: JsonOpt = False) -> None:
    """List admin accounts."""
    with _session() as (_, session):
        views = admins.list_admins(session)
    if as_json:
        _print_json(views)
    else:
        for view in views:
            typer.echo(f"{view.name}\tcreated {view.created_at:%Y-%m-%d}")


@admins_cli.command("remove")
def admins_remove(name: str, as_json: JsonOpt = False) -> None:
    """Delete an admin account."""
    with _session() as (_, session):
        admins.remove(session, name)
    if as_json:
        _print_json({"removed": name})
    else:
        typer.echo(f"admin {name!r} removed")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
