"""The orthanc-intake command, run as a subprocess like an operator would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from app import auth
from tests.support.intake import ROOT


def _run(tmp_path: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "INTAKE_DATABASE_URL": database_url,
        "INTAKE_SPOOL_DIR": str(tmp_path / "spool"),
        "INTAKE_PUBLIC_URL": "https://intake.example.org/",
    }
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_migrate_then_sites_add_json(tmp_path: Path, database_url: str) -> None:
    """`sites add --json` prints the site, a well-formed token and the peer snippets."""
    assert _run(tmp_path, database_url, "migrate").returncode == 0
    done = _run(tmp_path, database_url, "sites", "add", "hospital-a", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["site"] == "hospital-a"
    assert auth.is_well_formed(data["token"])
    assert data["orthanc_peer"] == {
        "Url": "https://intake.example.org/",
        "Username": "hospital-a",
        "Password": data["token"],
    }
    assert data["orthanc_peer_bearer"]["HttpHeaders"] == {
        "Authorization": f"Bearer {data['token']}"
    }


def test_sites_add_prints_a_pasteable_snippet(tmp_path: Path, database_url: str) -> None:
    done = _run(tmp_path, database_url, "sites", "add", "hospital-b")
    assert done.returncode == 0, done.stderr
    start = done.stdout.index('{\n  "OrthancPeers"')
    snippet, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
    assert snippet["OrthancPeers"]["intake"]["Username"] == "hospital-b"
    assert "HttpsCACertificates" in done.stdout


def test_duplicate_and_invalid_names_are_refused(tmp_path: Path, database_url: str) -> None:
    assert _run(tmp_path, database_url, "sites", "add", "dup").returncode == 0
    again = _run(tmp_path, database_url, "sites", "add", "dup")
    assert again.returncode == 2
    assert "already exists" in again.stderr
    bad = _run(tmp_path, database_url, "sites", "add", "no:colons")
    assert bad.returncode == 2
    assert "site name" in bad.stderr


def test_credentials_in_the_orthanc_url_are_refused_without_echoing_them(
    tmp_path: Path, database_url: str
) -> None:
    env_url = "http://admin:s3cret-pass@127.0.0.1:8042"
    done = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        env={
            "PATH": "/usr/bin:/bin",
            "INTAKE_DATABASE_URL": database_url,
            "INTAKE_ORTHANC_URL": env_url,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "INTAKE_ORTHANC_PASSWORD" in done.stderr
    assert "s3cret-pass" not in done.stderr + done.stdout
