"""The PHP admin example (examples/php) against a live intake, run by Debian's php-cli."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
from sqlalchemy import create_engine, select

from app.db.models import State, Upload
from tests.support.intake import ROOT, Admin, IntakeProcess, wait_until
from tests.support.orthanc import OrthancProcess, refusing_uploads
from tests.support.studies import make_study

SCRIPT = ROOT / "examples" / "php" / "intake-admin.php"


def _run_php(intake: IntakeProcess, admin: Admin, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["php", str(SCRIPT), *args],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "INTAKE_ADMIN_URL": intake.admin_url,
            "INTAKE_ADMIN_TOKEN": admin.token,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _php(intake: IntakeProcess, admin: Admin, *args: str) -> str:
    done = _run_php(intake, admin, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _state(intake: IntakeProcess, upload_id: int) -> State:
    engine = create_engine(intake.database_url)
    try:
        with engine.connect() as conn:
            return State(
                conn.execute(select(Upload.state).where(Upload.id == upload_id)).scalar_one()
            )
    finally:
        engine.dispose()


def test_php_lists_shows_a_study_and_retries_a_quarantined_upload(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    # Orthanc refuses uploads (a Lua filter: 403), so they end in quarantine.
    own_orthanc.extra_config["LuaScripts"] = [str(refusing_uploads(tmp_path))]
    own_orthanc.restart()
    intake = make_intake(own_orthanc)
    site = intake.add_site("php-site")
    admin = intake.add_admin("php-app")
    files = make_study(n_series=2, per_series=2)
    answers = [intake.upload(site, data).json() for data in files]
    study_uid = str(pydicom.dcmread(io.BytesIO(files[0])).StudyInstanceUID)

    quarantined = wait_until(
        lambda: (out := _php(intake, admin, "quarantine")).count("orthanc_refused") == 4 and out,
        timeout=60,
    )
    upload_ids = [int(line.split("\t")[0]) for line in quarantined.splitlines()]
    recent = _php(intake, admin, "recent", "10")
    assert recent.count("php-site") == 4
    assert recent.count("quarantined") == 4
    assert study_uid in recent

    # Fixed: Orthanc takes uploads again, then the PHP app retries each quarantined upload.
    del own_orthanc.extra_config["LuaScripts"]
    own_orthanc.restart()
    for upload_id in upload_ids:
        assert _php(intake, admin, "retry", str(upload_id)) == f"upload {upload_id} is now queued\n"
    wait_until(lambda: all(_state(intake, i) is State.FORWARDED for i in upload_ids), timeout=60)
    assert {a["ID"] for a in answers} <= set(own_orthanc.instances())

    study = _php(intake, admin, "study", "php-site", study_uid)
    assert study.startswith(
        f"study {study_uid} of php-site: 4 instances in 2 series, 4 forwarded, 0 queued, "
        "0 quarantined"
    )
    assert study.count("  series ") == 2


def test_php_reports_api_errors(intake: IntakeProcess, admin: Admin) -> None:
    done = _run_php(intake, admin, "retry", "999999")
    assert done.returncode == 1
    assert "HTTP 404 not_found" in done.stderr
