"""The serving process stays small: pydicom, numpy and alembic stay out of it.

pydicom (+24 MiB at import) and the numpy it imports whenever numpy is installed
(+20 MiB) belong in the validation workers, which parse; alembic (+9 MiB) is imported
only when a schema is actually migrated. The target is a peak RSS under 150 MB while
receiving a 1 GiB instance (docs/PERFORMANCE.md), so this is the headroom.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from alembic import command
from app.db import migrations
from tests import dicom_samples as samples
from tests.support.intake import ROOT, IntakeProcess, children, current_rss, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

HEAVY = ("pydicom", "numpy", "alembic")
MB = 1000 * 1000
# Measured here: 97-99 MB for the intake process after start-up and a few uploads, on a
# migrated database (130-131 MB in the same run before pydicom and numpy left it, 106 MB
# when `serve` itself migrates and so imports alembic). ~20 MB of headroom.
MAX_SERVING_RSS = 120 * MB


def _heavy_modules_after(script: str, *args: str, **env: str) -> list[str]:
    """Run ``script`` in a fresh interpreter; the heavy modules it left in sys.modules."""
    report = f"\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys\n" + script + report, *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found: list[str] = json.loads(done.stdout.splitlines()[-1])
    return found


def _settings_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {"INTAKE_DATABASE_URL": database_url, "INTAKE_SPOOL_DIR": str(tmp_path / "spool")}


def test_building_the_apps_imports_no_parser_and_no_alembic(tmp_path: Path) -> None:
    """app.api.apps and both apps, on default settings, need none of pydicom, numpy, alembic."""
    script = (
        "from app.api.apps import create_admin_app, create_public_app\n"
        "from app.settings import Settings\n"
        "settings = Settings()\n"
        "create_public_app(settings)\n"
        "create_admin_app(settings)\n"
    )
    env = _settings_env(tmp_path, f"sqlite:///{tmp_path / 'intake.db'}")
    assert _heavy_modules_after(script, **env) == []


def test_a_started_service_validates_in_a_worker_without_importing_the_parser(
    tmp_path: Path,
) -> None:
    """Start-up on a migrated database, then a real validation: all of it in the worker."""
    url = f"sqlite:///{tmp_path / 'intake.db'}"
    migrations.upgrade(url)
    instance = samples.write(tmp_path, samples.make_instance())
    script = (
        "import asyncio\n"
        "from pathlib import Path\n"
        "from app.api.apps import create_admin_app, create_public_app\n"
        "from app.service import Service\n"
        "from app.settings import Settings\n"
        "async def main() -> None:\n"
        "    settings = Settings()\n"
        "    service = Service(settings)\n"
        "    await service.start()\n"
        "    try:\n"
        "        create_public_app(settings, service)\n"
        "        create_admin_app(settings, service)\n"
        "        summary = await service.validator.validate(Path(sys.argv[1]))\n"
        f"        assert summary.sop_instance_uid == {samples.SOP_INSTANCE_UID!r}, summary\n"
        "    finally:\n"
        "        await service.stop()\n"
        "        service.validator.close()\n"
        "asyncio.run(main())\n"
    )
    env = _settings_env(tmp_path, url) | {
        "INTAKE_VALIDATION_WORKERS": "1",
        "INTAKE_ORTHANC_URL": "http://127.0.0.1:9",  # never reached: nothing is queued
    }
    assert _heavy_modules_after(script, str(instance), **env) == []


def test_head_revision_is_alembics_head() -> None:
    """The head read from alembic/versions without alembic is the one alembic finds."""
    script = ScriptDirectory.from_config(migrations.alembic_config("sqlite://"))
    assert [migrations.head_revision()] == script.get_heads()


def test_branches_or_computed_revisions_give_no_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the files do not name one head in plain literals, alembic decides."""
    monkeypatch.setattr(migrations, "VERSIONS", tmp_path)
    (tmp_path / "a.py").write_text("revision: str = 'a'\ndown_revision: str | None = None\n")
    (tmp_path / "b.py").write_text("revision = 'b'\ndown_revision = 'a'\n")
    assert migrations.head_revision() == "b"
    (tmp_path / "c.py").write_text("revision = 'c'\ndown_revision = 'a'\n")
    assert migrations.head_revision() is None  # two heads
    (tmp_path / "c.py").write_text("revision = 'c'\ndown_revision = ('a', 'b')\n")
    assert migrations.head_revision() is None  # a merge
    (tmp_path / "c.py").write_text("revision = 'c' + ''\ndown_revision = 'b'\n")
    assert migrations.head_revision() is None  # not a literal


def test_a_database_is_current_only_at_the_head(empty_database_url: str) -> None:
    """Empty, one revision behind: not current; migrated: current."""
    assert not migrations.is_current(empty_database_url)
    migrations.upgrade(empty_database_url)
    assert migrations.is_current(empty_database_url)
    command.downgrade(migrations.alembic_config(empty_database_url), "-1")
    assert not migrations.is_current(empty_database_url)
    migrations.upgrade(empty_database_url)
    assert migrations.is_current(empty_database_url)


def test_a_database_with_an_unknown_revision_is_not_current(database_url: str) -> None:
    """A revision this code does not know goes to alembic, which refuses it, as before."""
    migrations.upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    assert not migrations.is_current(database_url)


def test_upgrading_a_current_database_imports_no_alembic(database_url: str) -> None:
    """`serve` migrates first by default: on a migrated database that costs no alembic."""
    migrations.upgrade(database_url)
    script = "from app.db import migrations\nmigrations.upgrade(sys.argv[1])\n"
    assert _heavy_modules_after(script, database_url) == []


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_serving_process_maps_no_numpy_after_an_upload(
    tmp_path: Path, private_orthanc: OrthancProcess
) -> None:
    """After a real upload is validated, acknowledged and forwarded, only the worker that
    parsed it maps numpy; the intake process does not, and stays under MAX_SERVING_RSS.
    The database is migrated first by the CLI, as DEPLOYMENT.md has it for upgrades."""
    url = f"sqlite:///{tmp_path / 'intake.db'}"
    intake = IntakeProcess(tmp_path / "intake", url, orthanc=private_orthanc)
    assert intake.cli("migrate").returncode == 0
    with intake:
        site = intake.add_site("footprint-site")
        data = make_study(n_series=1, per_series=1)[0]
        response = intake.upload(site, data)
        assert response.status_code == 200, response.text
        instance = response.json()["ID"]
        wait_until(lambda: instance in private_orthanc.instances(), timeout=30)
        pid = intake.pid
        assert pid is not None
        assert any("numpy" in _maps(child) for child in children(pid))  # the check sees it
        assert "numpy" not in _maps(pid)
        assert current_rss(pid) < MAX_SERVING_RSS
