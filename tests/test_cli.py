"""The orthanc-intake command, run as a subprocess like an operator would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app import admins, auth
from app.db import make_engine, make_sessionmaker
from app.models import Admin
from tests.support.intake import ROOT


def _run(
    tmp_path: Path, database_url: str, *args: str, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": "/usr/bin:/bin",
        "INTAKE_DATABASE_URL": database_url,
        "INTAKE_SPOOL_DIR": str(tmp_path / "spool"),
        "INTAKE_PUBLIC_URL": "https://intake.example.org/",
    }
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=base | {f"INTAKE_{k.upper()}": v for k, v in env.items()},
        cwd=ROOT,
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_migrate_then_sites_add_json(tmp_path: Path, empty_database_url: str) -> None:
    """`sites add --json` prints the site, a well-formed token and the peer snippets."""
    assert _run(tmp_path, empty_database_url, "migrate").returncode == 0
    done = _run(tmp_path, empty_database_url, "sites", "add", "hospital-a", "--json")
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
    done = _run(
        tmp_path, database_url, "migrate", orthanc_url="http://admin:s3cret-pass@127.0.0.1:8042"
    )
    assert done.returncode != 0
    assert "INTAKE_ORTHANC_PASSWORD" in done.stderr
    assert "s3cret-pass" not in done.stderr + done.stdout


def _json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_site_lifecycle_commands_speak_json(tmp_path: Path, database_url: str) -> None:
    """list, show, rotate, revoke, disable, enable and delete all answer --json."""
    first = _json(_run(tmp_path, database_url, "sites", "add", "lab", "--json"))
    rotated = _json(_run(tmp_path, database_url, "sites", "rotate", "lab", "--json"))
    assert rotated["token"] != first["token"]
    assert rotated["orthanc_peer"]["Password"] == rotated["token"]
    shown = _json(_run(tmp_path, database_url, "sites", "show", "lab", "--json"))
    assert [t["prefix"] for t in shown["tokens"]] == [
        auth.display_prefix(first["token"]),
        auth.display_prefix(rotated["token"]),
    ]
    assert first["token"] not in json.dumps(shown)
    old, new = shown["tokens"]
    assert old["expires_at"] < new["expires_at"]  # the old one now ends with the grace period
    revoked = _json(
        _run(tmp_path, database_url, "sites", "revoke", "lab", "--token", old["prefix"], "--json")
    )
    assert revoked == {"site": "lab", "revoked": 1}
    assert (
        _json(_run(tmp_path, database_url, "sites", "disable", "lab", "--json"))["status"]
        == "disabled"
    )
    assert (
        _json(_run(tmp_path, database_url, "sites", "enable", "lab", "--json"))["status"]
        == "active"
    )
    assert [s["name"] for s in _json(_run(tmp_path, database_url, "sites", "list", "--json"))] == [
        "lab"
    ]
    deleted = _json(_run(tmp_path, database_url, "sites", "delete", "lab", "--json"))
    assert deleted["status"] == "deleted"
    assert all(t["revoked_at"] for t in deleted["tokens"])
    assert _json(_run(tmp_path, database_url, "sites", "list", "--json")) == []
    listed = _json(_run(tmp_path, database_url, "sites", "list", "--all", "--json"))
    assert [s["status"] for s in listed] == ["deleted"]
    again = _run(tmp_path, database_url, "sites", "add", "lab")
    assert again.returncode == 2


def test_policy_command_sets_and_clears(tmp_path: Path, database_url: str) -> None:
    _json(_run(tmp_path, database_url, "sites", "add", "ct-only", "--json"))
    policy = _json(
        _run(
            tmp_path,
            database_url,
            "sites",
            "policy",
            "ct-only",
            "--allow-cidr",
            "192.0.2.0/24",
            "--allow-cidr",
            "2001:db8::/32",
            "--allow-modality",
            "ct",
            "--instances-per-minute",
            "100",
            "--bytes-per-day",
            "1000000",
            "--json",
        )
    )["policy"]
    assert policy["allowed_cidrs"] == ["192.0.2.0/24", "2001:db8::/32"]
    assert policy["allowed_modalities"] == ["CT"]
    assert policy["instances_per_minute"] == 100
    cleared = _json(
        _run(
            tmp_path,
            database_url,
            "sites",
            "policy",
            "ct-only",
            "--clear",
            "allowed_cidrs",
            "--clear",
            "instances_per_minute",
            "--json",
        )
    )["policy"]
    assert cleared["allowed_cidrs"] == []
    assert cleared["instances_per_minute"] is None
    assert cleared["bytes_per_day"] == 1000000
    bad = _run(tmp_path, database_url, "sites", "policy", "ct-only", "--allow-cidr", "10.0.0/99")
    assert bad.returncode == 2
    assert "10.0.0/99" in bad.stderr


def test_revoke_needs_a_prefix_or_all(tmp_path: Path, database_url: str) -> None:
    _json(_run(tmp_path, database_url, "sites", "add", "r", "--json"))
    assert _run(tmp_path, database_url, "sites", "revoke", "r").returncode == 2
    assert _json(_run(tmp_path, database_url, "sites", "revoke", "r", "--all", "--json")) == {
        "site": "r",
        "revoked": 1,
    }


def test_admins_are_argon2_hashed(tmp_path: Path, database_url: str) -> None:
    """Admin passwords are stored as argon2 hashes and verify through passlib."""
    done = _run(
        tmp_path,
        database_url,
        "admins",
        "add",
        "php-app",
        "--password-stdin",
        "--json",
        input="correct horse battery staple\n",
    )
    assert _json(done)["name"] == "php-app"
    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine)() as session:
            stored = session.scalar(select(Admin.password_hash))
            assert stored is not None
            assert stored.startswith("$argon2")
            assert admins.verify(session, "php-app", "correct horse battery staple")
            assert not admins.verify(session, "php-app", "wrong horse battery staple")
            assert not admins.verify(session, "nobody", "correct horse battery staple")
    finally:
        engine.dispose()
    listed = _json(_run(tmp_path, database_url, "admins", "list", "--json"))
    assert [a["name"] for a in listed] == ["php-app"]
    assert _json(_run(tmp_path, database_url, "admins", "remove", "php-app", "--json"))
    short = _run(tmp_path, database_url, "admins", "add", "x", "--password-stdin", input="short\n")
    assert short.returncode == 2
