"""The ``orthanc-intake`` command: serve, migrate, sites, admins, and upload (for sites)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import ssl
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app import logs
from app.access import admins, sites
from app.db import migrations
from app.db.migrations import Schema
from app.db.sessions import make_engine, make_sessionmaker
from app.errors import IntakeError
from app.settings import Settings
from app.uploader import sender

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
sites_cli = typer.Typer(no_args_is_help=True, help="Manage the sites allowed to upload.")
admins_cli = typer.Typer(no_args_is_help=True, help="Manage admin accounts.")
cli.add_typer(sites_cli, name="sites")
cli.add_typer(admins_cli, name="admins")

PEER_NAME, PEER_TIMEOUT_SECONDS = sites.PEER_NAME, sites.PEER_TIMEOUT_SECONDS
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
log = logging.getLogger(__name__)


def _settings() -> Settings:
    try:
        return Settings.load()
    except (ValidationError, SettingsError) as exc:
        # hide_input_in_errors: the message names variables, never their values.
        typer.echo(f"error: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from None


def _logging(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format)


def _shown(url: str) -> str:
    """The database URL as it may be printed: any password masked."""
    return make_url(url).render_as_string(hide_password=True)


def _announce(settings: Settings) -> None:
    """Say, on stderr, which database an admin command works on, and from which settings."""
    source = f" (settings from {settings.env_file} too)" if settings.env_file else ""
    typer.echo(f"database: {_shown(settings.database_url)}{source}", err=True)


def _schema_error(settings: Settings, schema: Schema) -> str:
    """Why the command cannot use the database, and what to run."""
    shown = _shown(settings.database_url)
    if schema is Schema.OTHER:
        return (
            f"the database {shown} is not at this version's schema: run `orthanc-intake "
            'migrate` (on upgrades, with the service stopped: docs/DEPLOYMENT.md "Upgrades")'
        )
    path = migrations.sqlite_file(settings.database_url)
    where = f"there is no database at {path}" if path else f"the database {shown} has no schema"
    return (
        f"{where}. On a new installation, `orthanc-intake migrate` creates it; if the service "
        "uses another database, give this command the service's settings: INTAKE_HOME (now "
        f"{settings.home}), INTAKE_ENV_FILE or INTAKE_DATABASE_URL."
    )


def _schema(settings: Settings) -> Schema:
    try:
        return migrations.schema_of(settings.database_url)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        typer.echo(
            f"error: cannot open the database {_shown(settings.database_url)}: {reason}", err=True
        )
        raise typer.Exit(2) from None


def _require_schema(settings: Settings) -> None:
    """Refuse, exit 2, a database that does not exist or is not at the newest schema:
    only `migrate` (and `serve`, with auto-migrate) creates or changes it."""
    schema = _schema(settings)
    if schema is not Schema.CURRENT:
        typer.echo(f"error: {_schema_error(settings, schema)}", err=True)
        raise typer.Exit(2)


@contextlib.contextmanager
def _session() -> Iterator[tuple[Settings, Session]]:
    """A session on the configured, migrated database; a refused change exits 2."""
    settings = _settings()
    _announce(settings)
    _require_schema(settings)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield settings, session
    except IntakeError as exc:  # the domain's refusals: InvalidChange, SiteNotFound, …
        typer.echo(f"error: {exc.detail}", err=True)
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
    from app.api.apps import run  # imported here: keeps the other commands light

    settings = _settings()
    _logging(settings)
    log.info(
        "database %s, spool %s (home %s, env file %s)",
        _shown(settings.database_url),
        settings.spool_dir,
        settings.home,
        settings.env_file or "none",
    )
    try:
        schema = migrations.schema_of(settings.database_url)
    except SQLAlchemyError as exc:  # the service reports an unreachable database itself
        log.warning("the database cannot be checked yet: %s", type(exc).__name__)
    else:
        if schema is Schema.MISSING and settings.auto_migrate:
            log.info("no database schema yet: INTAKE_AUTO_MIGRATE creates it")
        elif schema is not Schema.CURRENT and not settings.auto_migrate:
            typer.echo(f"error: {_schema_error(settings, schema)}", err=True)
            raise typer.Exit(2)
    run(settings)


@cli.command()
def migrate() -> None:
    """Create the database, or bring its schema up to date."""
    settings = _settings()
    _logging(settings)
    _announce(settings)
    migrations.upgrade(settings.database_url)
    typer.echo("database schema is up to date")


def _print_new_token(settings: Settings, created: sites.NewToken, as_json: bool, verb: str) -> None:
    snippets = sites.site_snippets(settings.peer_url, created.site, created.token)
    warnings = sites.url_warnings(settings.public_url, settings.peer_url)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        _print_json(
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
        _print_json(view)
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
    with _session() as (_, session):
        _show(sites.set_policy(session, name, **changes), as_json)


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


@cli.command()
def upload(
    paths: Annotated[
        list[Path],
        typer.Argument(
            exists=True,
            readable=True,
            help="DICOM files, folders (searched recursively) and ZIP archives.",
            show_default=False,
        ),
    ],
    url: Annotated[str, typer.Option(help="The intake's URL, e.g. https://intake.example.org/.")],
    site: Annotated[str, typer.Option(help="Your site's name (the HTTP Basic user name).")],
    token: Annotated[
        str,
        typer.Option(
            envvar="INTAKE_UPLOAD_TOKEN",
            show_envvar=True,
            help="Your site's token. Prefer the environment variable: it keeps the token "
            "out of shell history and process lists.",
        ),
    ],
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Files in flight.")] = 4,
    retries: Annotated[
        int, typer.Option(min=0, help="Retries of a file after a transient failure.")
    ] = 5,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for the server, per request.")
    ] = 60.0,
    cacert: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="CA certificate (PEM) to trust instead of the system's.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="No progress bar (none when not on a terminal).")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also show the raw error behind a failed connection."),
    ] = False,
) -> None:
    """Send DICOM files to an intake, for a site without an Orthanc.

    Folders are searched recursively; in them, files without the DICM prefix and
    DICOMDIR indexes are skipped. ZIP archives are sent whole. Transient failures (lost
    connections, timeouts, 408, 429, 502, 503, 504, 507) are retried with back-off,
    honouring Retry-After up to 60 s. Exit status: 0 when everything was accepted, a
    duplicate or skipped; 1 when something was rejected, quarantined or failed, or the
    intake could not be reached; 2 for a usage error; 3 when the site name or token was
    refused; 130 after Ctrl-C (the summary says what was taken; running the command again
    sends every file again, and the intake answers those it took as duplicates).
    """
    try:
        sender.instances_url(url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--url") from exc
    try:
        report = sender.upload(
            paths,
            url,
            site,
            token,
            concurrency=concurrency,
            retries=retries,
            timeout=timeout,
            cacert=cacert,
            progress=not no_progress and sys.stdout.isatty(),
        )
    except ssl.SSLError as exc:  # only loading --cacert raises it; TLS failures are reported
        raise typer.BadParameter(f"not a PEM certificate: {exc}", param_hint="--cacert") from exc
    if (error := report.message(verbose)) is not None:
        typer.echo(error, err=True)
    if as_json:
        typer.echo(json.dumps(report.as_json(), indent=2))
    elif summary := report.summary(verbose):
        typer.echo(summary)
    raise typer.Exit(report.exit_code)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
