"""What every ``orthanc-intake`` command shares: settings, logging, the database.

An admin command prints the database it uses (password masked) and runs only on a
migrated one: ``migrate`` alone creates a schema. A refused change exits 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app import logs
from app.access import sites
from app.db import migrations
from app.db.migrations import Schema
from app.db.sessions import make_engine, make_sessionmaker
from app.errors import IntakeError
from app.settings import Settings

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


def load_settings() -> Settings:
    try:
        return Settings.load()
    except (ValidationError, SettingsError) as exc:
        # hide_input_in_errors: the message names variables, never their values.
        typer.echo(f"error: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from None


def configure_logging(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format)


def masked_url(url: str) -> str:
    """The database URL as it may be printed: any password masked."""
    return make_url(url).render_as_string(hide_password=True)


def announce(settings: Settings) -> None:
    """Say, on stderr, which database an admin command works on, and from which settings."""
    source = f" (settings from {settings.env_file} too)" if settings.env_file else ""
    typer.echo(f"database: {masked_url(settings.database_url)}{source}", err=True)


def schema_error(settings: Settings, schema: Schema) -> str:
    """Why the command cannot use the database, and what to run."""
    shown = masked_url(settings.database_url)
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


def read_schema(settings: Settings) -> Schema:
    try:
        return migrations.schema_of(settings.database_url)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        typer.echo(
            f"error: cannot open the database {masked_url(settings.database_url)}: {reason}",
            err=True,
        )
        raise typer.Exit(2) from None


def require_schema(settings: Settings) -> None:
    """Refuse, exit 2, a database that does not exist or is not at the newest schema:
    only `migrate` (and `serve`, with auto-migrate) creates or changes it."""
    schema = read_schema(settings)
    if schema is not Schema.CURRENT:
        typer.echo(f"error: {schema_error(settings, schema)}", err=True)
        raise typer.Exit(2)


@contextlib.contextmanager
def admin_session() -> Iterator[tuple[Settings, Session]]:
    """A session on the configured, migrated database; a refused change exits 2."""
    settings = load_settings()
    announce(settings)
    require_schema(settings)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield settings, session
    except IntakeError as exc:  # the domain's refusals: InvalidChange, SiteNotFound, …
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(2) from exc
    finally:
        engine.dispose()


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, sites.SiteView):
            data["status"] = value.status
        return data
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def print_json(value: Any) -> None:
    typer.echo(json.dumps(jsonable(value), indent=2))
