"""The ``orthanc-intake`` command: serve, migrate, sites, admins, and upload (for sites)."""

from __future__ import annotations

import logging

import typer
from sqlalchemy.exc import SQLAlchemyError

from app.cli.admins import admins_cli
from app.cli.common import (
    announce,
    configure_logging,
    load_settings,
    masked_url,
    schema_error,
)
from app.cli.sites import sites_cli
from app.cli.upload import upload
from app.db import migrations
from app.db.migrations import Schema

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
cli.add_typer(sites_cli, name="sites")
cli.add_typer(admins_cli, name="admins")
log = logging.getLogger(__name__)


@cli.command()
def serve() -> None:
    """Run the public and admin listeners and the forwarder."""
    from app.api.apps import run  # imported here: keeps the other commands light

    settings = load_settings()
    configure_logging(settings)
    log.info(
        "database %s, spool %s (home %s, env file %s)",
        masked_url(settings.database_url),
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
            typer.echo(f"error: {schema_error(settings, schema)}", err=True)
            raise typer.Exit(2)
    run(settings)


@cli.command()
def migrate() -> None:
    """Create the database, or bring its schema up to date."""
    settings = load_settings()
    configure_logging(settings)
    announce(settings)
    migrations.upgrade(settings.database_url)
    typer.echo("database schema is up to date")


cli.command()(upload)  # after serve and migrate: the order `--help` lists them in


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
