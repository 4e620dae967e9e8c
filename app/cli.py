"""The ``orthanc-intake`` command: serve, migrate, and site management."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Annotated, Any

import typer

from app import migrations, sites
from app.db import make_engine, make_sessionmaker
from app.settings import Settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
sites_cli = typer.Typer(no_args_is_help=True, help="Manage the sites allowed to upload.")
cli.add_typer(sites_cli, name="sites")

PEER_NAME = "intake"


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


@cli.command()
def serve() -> None:
    """Run the public and admin listeners and the forwarder."""
    from app.main import serve as run

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


def orthanc_peers(settings: Settings, site: str, token: str) -> dict[str, Any]:
    """The OrthancPeers entries a site pastes into its Orthanc configuration."""
    return {
        "basic": {"Url": settings.peer_url, "Username": site, "Password": token},
        "bearer": {"Url": settings.peer_url, "HttpHeaders": {"Authorization": f"Bearer {token}"}},
    }


@sites_cli.command("add")
def sites_add(
    name: Annotated[str, typer.Argument(help="Site name; also the HTTP Basic user name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    label: Annotated[str | None, typer.Option(help="A note about the first token.")] = None,
) -> None:
    """Create a site; print its token (once) and the OrthancPeers snippet."""
    settings = _settings()
    migrations.upgrade(settings.database_url) if settings.auto_migrate else None
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            created = sites.add(session, name, label)
    except (sites.SiteNameInvalid, sites.SiteExists) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        engine.dispose()
    peers = orthanc_peers(settings, created.name, created.token)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "site": created.name,
                    "token": created.token,
                    "orthanc_peer": peers["basic"],
                    "orthanc_peer_bearer": peers["bearer"],
                },
                indent=2,
            )
        )
        return
    typer.echo(f"Site {created.name!r} created.")
    typer.echo(f"Token (shown once; store it now): {created.token}")
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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
