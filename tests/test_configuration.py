"""docs/CONFIGURATION.md, the settings' own documentation and the ``INTAKE_…_FILE`` secrets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from app.secret_files import is_secret
from app.settings import DEFAULT_HOME, Group, Settings, env_file_of, group_of
from tests.support.intake import ROOT

REGENERATE = ".venv/bin/python scripts/config_docs.py --write"
SECRET = "file-borne-secret-0123456789"
SECRETS = [name for name, field in Settings.model_fields.items() if is_secret(field)]


def _variable(name: str) -> str:
    return f"INTAKE_{name.upper()}"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's shell (``make dev-orthanc`` exports a password) must not leak in."""
    for key in list(os.environ):
        if key.upper().startswith("INTAKE_"):
            monkeypatch.delenv(key)


def _secret_file(tmp_path: Path, content: str | bytes, name: str = "secret") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def test_configuration_doc_is_generated_from_the_settings() -> None:
    """docs/CONFIGURATION.md is exactly what scripts/config_docs.py prints."""
    done = subprocess.run(
        [sys.executable, "scripts/config_docs.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    committed = (ROOT / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    assert committed == done.stdout, f"docs/CONFIGURATION.md is stale: run {REGENERATE}"


def test_every_setting_has_a_description_and_a_group() -> None:
    """A new field needs both, or the generated documentation would miss it."""
    fields = Settings.model_fields
    assert [n for n, f in fields.items() if not (f.description or "").strip()] == []
    ungrouped = []
    for name, field in fields.items():
        try:
            group_of(field)
        except (LookupError, ValueError):
            ungrouped.append(name)
    assert ungrouped == []
    assert {group_of(field) for field in fields.values()} == set(Group)  # no empty section


def test_the_known_secrets_have_file_variants() -> None:
    assert {"orthanc_password", "webhook_secret"} <= set(SECRETS)


@pytest.mark.parametrize("name", SECRETS)
def test_a_secret_is_read_from_its_file(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docker secrets files end with a newline; it is not part of the value."""
    monkeypatch.setenv(_variable(name) + "_FILE", str(_secret_file(tmp_path, SECRET + "\n")))
    value = getattr(Settings(_env_file=None), name)
    assert value is not None
    assert value.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("content", "value"),
    [
        ("abc", "abc"),
        ("abc\n", "abc"),
        ("abc\r\n", "abc"),
        ("abc\n\n", "abc\n"),
        (" abc \n", " abc "),
    ],
)
def test_only_one_trailing_newline_is_stripped(
    content: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTAKE_ORTHANC_PASSWORD_FILE", str(_secret_file(tmp_path, content)))
    password = Settings(_env_file=None).orthanc_password
    assert password is not None
    assert password.get_secret_value() == value


def test_a_secret_file_feeds_the_validators(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhook secret from a file satisfies the "webhooks are signed" check."""
    monkeypatch.setenv("INTAKE_WEBHOOK_URLS", "https://receiver.example.org/hook")
    monkeypatch.setenv("INTAKE_WEBHOOK_SECRET_FILE", str(_secret_file(tmp_path, SECRET)))
    settings = Settings(_env_file=None)
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == SECRET


def test_a_bad_secret_from_a_file_is_not_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTAKE_WEBHOOK_URLS", "https://receiver.example.org/hook")
    monkeypatch.setenv("INTAKE_WEBHOOK_SECRET_FILE", str(_secret_file(tmp_path, "short-Zq9\n")))
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    assert "INTAKE_WEBHOOK_SECRET" in str(caught.value)
    assert "short-Zq9" not in str(caught.value)


def test_a_variable_and_its_file_together_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One of them would be ignored without a word; the message names both, no value."""
    monkeypatch.setenv("INTAKE_ORTHANC_PASSWORD", "env-borne-secret-9876")
    monkeypatch.setenv("INTAKE_ORTHANC_PASSWORD_FILE", str(_secret_file(tmp_path, SECRET)))
    with pytest.raises(SettingsError) as caught:
        Settings(_env_file=None)
    message = str(caught.value)
    assert "INTAKE_ORTHANC_PASSWORD and INTAKE_ORTHANC_PASSWORD_FILE" in message
    assert "env-borne-secret-9876" not in message
    assert SECRET not in message


def test_a_variable_in_a_dotenv_file_and_its_file_together_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = _secret_file(tmp_path, "INTAKE_WEBHOOK_SECRET=dotenv-borne-secret-4321\n", ".env")
    monkeypatch.setenv("INTAKE_WEBHOOK_SECRET_FILE", str(_secret_file(tmp_path, SECRET)))
    with pytest.raises(SettingsError, match="INTAKE_WEBHOOK_SECRET_FILE") as caught:
        Settings(_env_file=dotenv)
    assert "dotenv-borne-secret-4321" not in str(caught.value)


def test_a_missing_secret_file_is_named_with_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "not-there"
    monkeypatch.setenv("INTAKE_ORTHANC_PASSWORD_FILE", str(missing))
    with pytest.raises(SettingsError) as caught:
        Settings(_env_file=None)
    message = str(caught.value)
    assert "INTAKE_ORTHANC_PASSWORD_FILE" in message
    assert str(missing) in message
    assert "No such file" in message


@pytest.mark.parametrize("content", [b"\xff\xfe" + SECRET.encode(), None])
def test_an_unreadable_secret_file_is_refused_without_its_content(
    content: bytes | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not UTF-8, or a directory: the message names the path and never the content."""
    path = _secret_file(tmp_path, content) if content is not None else tmp_path
    monkeypatch.setenv("INTAKE_WEBHOOK_SECRET_FILE", str(path))
    with pytest.raises(SettingsError) as caught:
        Settings(_env_file=None)
    message = str(caught.value)
    assert "INTAKE_WEBHOOK_SECRET_FILE" in message
    assert str(path) in message
    assert SECRET not in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_an_empty_file_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTAKE_ORTHANC_PASSWORD_FILE", "")
    with pytest.raises(SettingsError, match="INTAKE_ORTHANC_PASSWORD_FILE is empty"):
        Settings(_env_file=None)


def test_an_init_argument_wins_over_a_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests build ``Settings(orthanc_password=...)``; a stray ``_FILE`` is not even read."""
    monkeypatch.setenv("INTAKE_ORTHANC_PASSWORD_FILE", str(tmp_path / "not-there"))
    password = Settings(_env_file=None, orthanc_password="from-the-code").orthanc_password
    assert password is not None
    assert password.get_secret_value() == "from-the-code"


def test_other_settings_have_no_file_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTAKE_ORTHANC_USERNAME_FILE", str(_secret_file(tmp_path, "someone")))
    assert Settings(_env_file=None).orthanc_username is None


def _table_variables(text: str, heading: str) -> list[str]:
    """The names in the first column of the table under ``heading`` (`A` / `B` split)."""
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    names: list[str] = []
    for line in section.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([A-Za-z0-9_]+)`", line.split("|")[1])
    return names


@pytest.mark.parametrize(
    ("document", "heading"), [("README.md", "## Configuration"), ("docs/UPLOADS.md", "## Settings")]
)
def test_hand_written_tables_name_only_real_settings(document: str, heading: str) -> None:
    names = _table_variables((ROOT / document).read_text(encoding="utf-8"), heading)
    assert len(names) >= 4  # the table is there and was parsed
    fields = Settings.model_fields
    secrets = {_variable(name) + "_FILE" for name in SECRETS}
    unknown = [
        name
        for name in names
        if name.upper().removeprefix("INTAKE_").lower() not in fields
        and _variable(name.upper().removeprefix("INTAKE_")) not in secrets
    ]
    assert unknown == [], f"{document} documents settings that do not exist"


def test_the_default_home_is_the_installations_var_folder() -> None:
    """What `make run` in a checkout has always used: ./var/intake.db and ./var/spool."""
    settings = Settings(_env_file=None)
    assert DEFAULT_HOME == ROOT / "var"
    assert settings.home == DEFAULT_HOME
    assert settings.database_url == f"sqlite:///{ROOT / 'var' / 'intake.db'}"
    assert settings.spool_dir == ROOT / "var" / "spool"


@pytest.mark.parametrize(
    ("database_url", "spool_dir", "expected_url", "expected_spool"),
    [
        ("sqlite:///intake.db", "spool", "sqlite:///{home}/intake.db", "{home}/spool"),
        ("sqlite:///./a/b.db?timeout=5", "./s", "sqlite:///{home}/a/b.db?timeout=5", "{home}/s"),
        ("sqlite+pysqlite:///x.db", "s", "sqlite+pysqlite:///{home}/x.db", "{home}/s"),
        ("sqlite:////srv/intake.db", "/srv/spool", "sqlite:////srv/intake.db", "/srv/spool"),
        ("sqlite:///:memory:", "/srv/spool", "sqlite:///:memory:", "/srv/spool"),
        (
            "postgresql+psycopg://u:p@db/intake",
            "spool",
            "postgresql+psycopg://u:p@db/intake",
            "{home}/spool",
        ),
    ],
)
def test_relative_storage_paths_are_under_the_home(
    database_url: str,
    spool_dir: str,
    expected_url: str,
    expected_spool: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never the current folder: a command run from elsewhere finds the same files."""
    monkeypatch.chdir("/")
    monkeypatch.setenv("INTAKE_HOME", str(tmp_path))
    monkeypatch.setenv("INTAKE_DATABASE_URL", database_url)
    monkeypatch.setenv("INTAKE_SPOOL_DIR", spool_dir)
    settings = Settings(_env_file=None)
    assert settings.database_url == expected_url.format(home=tmp_path)
    assert settings.spool_dir == Path(expected_spool.format(home=tmp_path))


def test_a_relative_home_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTAKE_HOME", "state")
    settings = Settings(_env_file=None)
    assert settings.home == tmp_path / "state"
    assert settings.spool_dir == tmp_path / "state" / "spool"


def test_the_env_file_in_home_is_read_after_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "intake.env").write_text(
        "INTAKE_PUBLIC_URL=https://file.example.org/\nINTAKE_AUTH_MAX_FAILURES=3\n"
    )
    monkeypatch.setenv("INTAKE_HOME", str(tmp_path))
    monkeypatch.setenv("INTAKE_AUTH_MAX_FAILURES", "7")
    settings = Settings.load()
    assert settings.env_file == tmp_path / "intake.env"
    assert settings.public_url == "https://file.example.org/"
    assert settings.auth_max_failures == 7


def test_the_env_file_may_carry_secret_file_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = _secret_file(tmp_path, SECRET + "\n")
    (tmp_path / "intake.env").write_text(f"INTAKE_ORTHANC_PASSWORD_FILE={secret}\n")
    monkeypatch.setenv("INTAKE_HOME", str(tmp_path))
    password = Settings.load().orthanc_password
    assert password is not None
    assert password.get_secret_value() == SECRET


def test_an_env_file_can_be_named_or_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "intake.env").write_text("INTAKE_LOG_LEVEL=DEBUG\n")
    named = _secret_file(tmp_path, "INTAKE_LOG_LEVEL=WARNING\n", "other.env")
    environ = {"INTAKE_HOME": str(tmp_path)}
    assert env_file_of(environ) == tmp_path / "intake.env"
    assert env_file_of(environ | {"INTAKE_ENV_FILE": str(named)}) == named
    assert env_file_of(environ | {"INTAKE_ENV_FILE": ""}) is None
    assert env_file_of({"INTAKE_HOME": str(tmp_path / "nothing-here")}) is None
    with pytest.raises(SettingsError, match="INTAKE_ENV_FILE"):
        env_file_of({"INTAKE_ENV_FILE": str(tmp_path / "missing.env")})
    monkeypatch.setenv("INTAKE_HOME", str(tmp_path))
    monkeypatch.setenv("INTAKE_ENV_FILE", str(named))
    assert Settings.load().log_level == "WARNING"


def test_a_database_url_that_does_not_parse_is_refused_without_echoing_it() -> None:
    """deploy/compose.yml's placeholder, seen by `docker compose exec`: a settings error."""
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, database_url="built-at-start-from-the-postgres-secret")
    assert "database_url" in str(caught.value)
    assert "postgres-secret" not in str(caught.value)
