"""``orthanc-intake admins``: admin accounts and their tokens (the PHP app's way in)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from app.access import admins
from app.cli.common import (
    JsonOpt,
    admin_session,
    print_json,
)

admins_cli = typer.Typer(no_args_is_help=True, help="Manage admin accounts.")


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
    with admin_session() as (_, session):
        view = admins.add(session, name, password)
    if as_json:
        print_json(view)
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
    with admin_session() as (_, session):
        if revoke is not None:
            admins.revoke_token(session, revoke)
            if as_json:
                print_json({"revoked": revoke})
            else:
                typer.echo(f"admin token {revoke} revoked")
            return
        issued = admins.issue_token(session, name, label)
    if as_json:
        print_json(issued)
    else:
        typer.echo(f"Admin token for {issued.admin!r} (shown once; store it now): {issued.token}")
        typer.echo(f"Use it as: Authorization: Bearer {issued.token}")


@admins_cli.command("list")
def admins_list(as_json: JsonOpt = False) -> None:
    """List admin accounts."""
    with admin_session() as (_, session):
        views = admins.list_admins(session)
    if as_json:
        print_json(views)
    else:
        for view in views:
            typer.echo(f"{view.name}\tcreated {view.created_at:%Y-%m-%d}")


@admins_cli.command("remove")
def admins_remove(name: str, as_json: JsonOpt = False) -> None:
    """Delete an admin account."""
    with admin_session() as (_, session):
        admins.remove(session, name)
    if as_json:
        print_json({"removed": name})
    else:
        typer.echo(f"admin {name!r} removed")
