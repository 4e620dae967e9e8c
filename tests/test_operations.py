"""What operators run into: a wrong Orthanc password, SIGHUP, several processes migrating."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from app.db.models import Upload
from tests.conftest import SQLITE_ONLY
from tests.support.intake import ROOT, IntakeProcess, IntakeStartError, wait_until
from tests.support.orthanc import OrthancProcess, free_port
from tests.support.studies import make_study


def _row(intake: IntakeProcess, receipt: str) -> Upload:
    engine = create_engine(intake.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(Upload).where(Upload.receipt == receipt)).one()  # type: ignore[return-value]
    finally:
        engine.dispose()


def test_a_wrong_orthanc_password_holds_uploads_instead_of_quarantining_them(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    """Orthanc's 401 is our configuration's fault, not the file's: waited out, never counted."""
    intake = make_intake(
        private_orthanc, orthanc_password="not-the-password", forward_max_attempts="2"
    )
    site = intake.add_site("held")
    answer = intake.upload(site, make_study(1, 1)[0]).json()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # bounded: well past 2 attempts at 0.2-1 s back-off
        row = _row(intake, answer["IntakeReceipt"])
        if row.attempts >= 4:
            break
        time.sleep(0.5)
    assert row.attempts >= 4
    assert row.state == "queued"
    assert row.failed_answers == 0
    assert "refused the intake's credentials" in (row.detail or "")
    assert "not-the-password" not in intake.log_text()


@SQLITE_ONLY  # a signal handler of the listeners
def test_sighup_without_tls_leaves_the_service_running(intake: IntakeProcess) -> None:
    pid = intake.pid
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: "no TLS certificate to reload" in intake.log_text(), timeout=10)
    assert intake.returncode is None
    with intake.client() as client:
        assert client.get("/system").status_code == 401  # still answering


@SQLITE_ONLY
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_event_loop_is_uvloop_unless_asked_otherwise(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, loop: str
) -> None:
    """uvloop by default (as uvicorn would choose); INTAKE_EVENT_LOOP=asyncio
    runs on Python's own loop. Either way uploads are taken and forwarded."""
    settings = {} if loop == "uvloop" else {"event_loop": "asyncio"}
    intake = make_intake(private_orthanc, **settings)
    assert f"event loop: {loop}" in intake.log_text()
    site = intake.add_site(f"on-{loop}")
    answer = intake.upload(site, make_study(1, 1)[0])
    assert answer.status_code == 200, answer.text
    receipt = answer.json()["IntakeReceipt"]
    wait_until(lambda: _row(intake, receipt).state == "forwarded", timeout=30)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_processes_starting_together_migrate_one_at_a_time(
    database_url: str, tmp_path: Path
) -> None:
    """Scale-out: two `migrate` at once on a fresh PostgreSQL both succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env["INTAKE_DATABASE_URL"] = database_url
    env["INTAKE_HOME"] = str(tmp_path)  # never a developer's var/intake.env
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "app", "migrate"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], results


@pytest.mark.parametrize("taken", ["public", "admin"])
def test_a_taken_port_ends_the_service_before_either_listener_answers(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, taken: str
) -> None:
    """One listener up without the other is a service that looks healthy and takes nothing:
    both ports are bound before anything starts, and a taken one ends the process (exit 1)."""
    intake = make_intake(private_orthanc, start=False)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        intake.public_port, intake.admin_port = free_port(), free_port()
        if taken == "public":
            intake.public_port = port
        else:
            intake.admin_port = port
        with pytest.raises(IntakeStartError, match="exited 1") as failed:
            intake.start()
        assert f"cannot listen on 127.0.0.1:{port}: address already in use" in str(failed.value)
        # Nothing else started: no forwarder process, no listener line, no traceback.
        log = intake.log_path.read_text()
        assert "forwarder process" not in log
        assert "Traceback" not in log
    finally:
        holder.close()
