"""The orthanc-intake command, run as a subprocess like an operator would."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from app.access import admins, tokens
from app.db import migrations
from app.db.models import Admin
from app.db.sessions import make_engine, make_sessionmaker
from tests.support.intake import ROOT


def _command(
    *args: str, env: dict[str, str], cwd: Path = ROOT, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``orthanc-intake ARGS`` with exactly ``env`` (INTAKE_* names, PATH added), in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env={"PATH": "/usr/bin:/bin"} | env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _run(
    tmp_path: Path, database_url: str, *args: str, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    base = {
        "INTAKE_HOME": str(tmp_path),
        "INTAKE_DATABASE_URL": database_url,
        "INTAKE_SPOOL_DIR": str(tmp_path / "spool"),
        "INTAKE_PUBLIC_URL": "https://intake.example.org/",
    }
    return _command(
        *args, env=base | {f"INTAKE_{k.upper()}": v for k, v in env.items()}, input=input
    )


def test_migrate_then_sites_add_json(tmp_path: Path, empty_database_url: str) -> None:
    """`sites add --json` prints the site, a well-formed token and the peer snippets."""
    assert _run(tmp_path, empty_database_url, "migrate").returncode == 0
    done = _run(tmp_path, empty_database_url, "sites", "add", "hospital-a", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["site"] == "hospital-a"
    assert tokens.is_well_formed(data["token"])
    assert data["orthanc_peer"] == {
        "Url": "https://intake.example.org/",
        "Username": "hospital-a",
        "Password": data["token"],
        "Timeout": 300,
    }
    assert data["orthanc_peer_bearer"]["HttpHeaders"] == {
        "Authorization": f"Bearer {data['token']}"
    }
    assert data["orthanc_peer_bearer"]["Timeout"] == 300
    assert data["warnings"] == []


def test_sites_add_prints_a_dicomweb_server_for_stow_rs(tmp_path: Path, database_url: str) -> None:
    """The DICOMweb plugin's entry: the intake's /dicom-web root, Bearer, its own Timeout."""
    done = _run(tmp_path, database_url, "sites", "add", "stow-site", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["dicomweb_server"] == {
        "Url": "https://intake.example.org/dicom-web/",
        "HttpHeaders": {"Authorization": f"Bearer {data['token']}"},
        "Timeout": 300,
    }
    text = _run(tmp_path, database_url, "sites", "add", "stow-site-2").stdout
    start = text.index('{\n  "DicomWeb"')
    snippet, _ = json.JSONDecoder().raw_decode(text[start:])
    assert snippet["DicomWeb"]["Servers"]["intake"]["Url"].endswith("/dicom-web/")


def test_sites_add_prints_a_pasteable_snippet(tmp_path: Path, database_url: str) -> None:
    done = _run(tmp_path, database_url, "sites", "add", "hospital-b")
    assert done.returncode == 0, done.stderr
    start = done.stdout.index('{\n  "OrthancPeers"')
    snippet, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
    assert snippet["OrthancPeers"]["intake"]["Username"] == "hospital-b"
    assert snippet["OrthancPeers"]["intake"]["Timeout"] == 300
    assert "HttpsCACertificates" in done.stdout
    assert "warning" not in done.stderr


def test_sites_add_warns_that_a_derived_url_is_of_no_use_to_a_remote_site(
    tmp_path: Path, database_url: str
) -> None:
    """No INTAKE_PUBLIC_URL: the snippets carry 127.0.0.1, and the command says so; an
    http:// URL gets no HTTPS (curl error 77) advice."""
    done = _run(tmp_path, database_url, "sites", "add", "far-away", public_url="")
    assert done.returncode == 0, done.stderr
    assert "http://127.0.0.1:8000/" in done.stdout
    assert "INTAKE_PUBLIC_URL is unset" in done.stderr
    assert "HttpsCACertificates" not in done.stdout
    as_json = _run(tmp_path, database_url, "sites", "add", "far-away-2", "--json", public_url="")
    assert "INTAKE_PUBLIC_URL is unset" in json.loads(as_json.stdout)["warnings"][0]


def test_sites_add_warns_about_a_plain_http_public_url(tmp_path: Path, database_url: str) -> None:
    done = _run(tmp_path, database_url, "sites", "add", "in-clear", public_url="http://intake.lan/")
    assert done.returncode == 0, done.stderr
    assert "plain HTTP" in done.stderr
    assert "HttpsCACertificates" not in done.stdout


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
        tokens.display_prefix(first["token"]),
        tokens.display_prefix(rotated["token"]),
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


def test_commands_from_any_folder_use_the_home_database(tmp_path: Path) -> None:
    """The defaults are anchored to INTAKE_HOME, not the current folder: a site added from
    elsewhere is in the database `migrate` made, and no stray database appears."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"INTAKE_HOME": str(home), "INTAKE_PUBLIC_URL": "https://intake.example.org/"}
    assert _command("migrate", env=env).returncode == 0
    added = _command("sites", "add", "hospital-y", "--json", env=env, cwd=elsewhere)
    assert added.returncode == 0, added.stderr
    assert f"database: sqlite:///{home / 'intake.db'}" in added.stderr
    listed = _command("sites", "list", "--json", env=env, cwd=tmp_path)
    assert [s["name"] for s in json.loads(listed.stdout)] == ["hospital-y"]
    assert sorted(p.name for p in home.iterdir()) == ["intake.db"]
    assert list(elsewhere.iterdir()) == []


def test_the_env_file_in_home_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    """INTAKE_HOME/intake.env is read by every command; a relative SQLite path in it is
    under the home too; a variable in the environment beats the file's."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "intake.env").write_text(
        "INTAKE_DATABASE_URL=sqlite:///state/intake.db\n"
        "INTAKE_PUBLIC_URL=https://from-the-file.example.org/\n"
        "INTAKE_TOKEN_LIFETIME_DAYS=7\n"
    )
    env = {"INTAKE_HOME": str(home)}
    migrated = _command("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert f"settings from {home / 'intake.env'}" in migrated.stderr
    assert (home / "state" / "intake.db").is_file()
    env["INTAKE_PUBLIC_URL"] = "https://from-the-environment.example.org/"
    data = json.loads(_command("sites", "add", "lab", "--json", env=env).stdout)
    assert data["orthanc_peer"]["Url"] == "https://from-the-environment.example.org/"
    created = datetime.fromisoformat(data["expires_at"]) - timedelta(days=7)
    assert abs((created - datetime.now(UTC)).total_seconds()) < 120


def test_a_named_env_file_must_exist(tmp_path: Path) -> None:
    env = {"INTAKE_HOME": str(tmp_path), "INTAKE_ENV_FILE": str(tmp_path / "missing.env")}
    done = _command("migrate", env=env)
    assert done.returncode == 2
    assert "INTAKE_ENV_FILE" in done.stderr
    assert not (tmp_path / "intake.db").exists()


@pytest.mark.parametrize(
    "command",
    [("sites", "add", "x"), ("sites", "list"), ("admins", "list"), ("sites", "show", "x")],
    ids=" ".join,
)
def test_only_migrate_creates_the_database(
    tmp_path: Path, empty_database_url: str, command: tuple[str, ...]
) -> None:
    """A command other than `migrate` refuses a missing SQLite file (and creates neither it
    nor its folder) or a PostgreSQL database without the schema, and names `migrate`."""
    url = empty_database_url
    if url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'not-yet' / 'intake.db'}"
    done = _run(tmp_path, url, *command)
    assert done.returncode == 2
    assert "`orthanc-intake migrate` creates it" in done.stderr
    assert not (tmp_path / "not-yet").exists()
    assert migrations.schema_of(url) is migrations.Schema.MISSING


def test_an_outdated_schema_is_refused_not_upgraded(tmp_path: Path) -> None:
    """Only `migrate` (and `serve`) changes the schema: a command asks for it."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(migrations.alembic_config(url), "0005")
    done = _run(tmp_path, url, "sites", "list")
    assert done.returncode == 2
    assert "run `orthanc-intake migrate`" in done.stderr
    assert migrations.schema_of(url) is migrations.Schema.OTHER
    assert _run(tmp_path, url, "migrate").returncode == 0
    assert _run(tmp_path, url, "sites", "list").returncode == 0


def test_serve_without_auto_migrate_refuses_a_missing_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'intake.db'}"
    done = _run(tmp_path, url, "serve", auto_migrate="false", public_port="0", admin_port="0")
    assert done.returncode == 2
    assert "`orthanc-intake migrate` creates it" in done.stderr
    assert not (tmp_path / "intake.db").exists()


def test_the_database_is_named_with_its_password_masked(tmp_path: Path, database_url: str) -> None:
    """Every admin command says which database it uses, on stderr; never a password."""
    done = _run(tmp_path, database_url, "sites", "list", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    parsed = make_url(database_url)
    assert f"database: {parsed.render_as_string(hide_password=True)}" in done.stderr
    if parsed.password:
        assert f":{parsed.password}@" not in done.stderr
        assert ":***@" in done.stderr
