"""``orthanc-intake upload``: the site-side uploader's command (app/uploader/ does the work)."""

from __future__ import annotations

import json
import ssl
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import (
    JsonOpt,
)
from app.uploader import sender


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
