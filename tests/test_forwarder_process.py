"""The forwarder's own process (app/forwarding/process.py), with a real service and Orthanc:
woken by the service, counted in its metrics, replaced when it dies, gone with its service."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any, cast

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select

from app.db.models import Upload
from app.forwarding.process import ForwarderProcess
from app.metrics import Metrics
from app.settings import Settings
from tests.support.intake import IntakeProcess, is_alive, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


def _one_forwarder(intake: IntakeProcess) -> int:
    (pid,) = wait_until(lambda: intake.forwarder_pids() or None, timeout=30)
    return int(pid)


def _row(database_url: str, receipt: str) -> Any:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                select(Upload.state, Upload.lease_owner).where(Upload.receipt == receipt)
            ).one()
    finally:
        engine.dispose()


def test_the_forwarder_runs_in_a_process_of_its_own_woken_by_the_service(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    """Its poll is a minute, so only the service's wake-up delivers within seconds; its log
    lines are the service's, and SIGINT or SIGTERM sent to it alone do not stop it."""
    intake = make_intake(private_orthanc, forward_poll_seconds="60")
    child = _one_forwarder(intake)
    wait_until(lambda: f"forwarder process {child} started" in intake.log_text(), timeout=30)
    os.kill(child, signal.SIGINT)  # a Ctrl-C reaches the whole process group
    os.kill(child, signal.SIGTERM)
    site = intake.add_site("own-process")
    for data in make_study(n_series=1, per_series=2):
        answer = intake.upload(site, data).json()
        line = f"forwarded receipt={answer['IntakeReceipt']}"
        wait_until(lambda line=line: line in intake.log_text(), timeout=15)
        assert answer["ID"] in private_orthanc.instances()
    assert intake.forwarder_pids() == [child]


def test_in_the_service_process_when_asked(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    intake = make_intake(private_orthanc, forwarder_process="false", forward_poll_seconds="60")
    site = intake.add_site("same-process")
    answer = intake.upload(site, make_study(1, 1)[0]).json()
    wait_until(lambda: answer["ID"] in private_orthanc.instances(), timeout=15)
    assert intake.forwarder_pids() == []
    assert "forwarder process" not in intake.log_text()


def test_a_dead_forwarder_process_is_replaced_and_its_deliveries_freed(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess, database_url: str
) -> None:
    """SIGKILLed mid-delivery: the service frees its lease at once (not in 300 s) and a new
    forwarder process delivers the upload."""
    intake = make_intake(own_orthanc, forward_lease_seconds="300")
    site = intake.add_site("replaced")
    first = _one_forwarder(intake)
    assert own_orthanc.pid is not None
    os.kill(own_orthanc.pid, signal.SIGSTOP)  # the delivery hangs, its lease held
    try:
        answer = intake.upload(site, make_study(1, 1)[0]).json()
        receipt = answer["IntakeReceipt"]
        wait_until(
            lambda: f":{first}/" in (_row(database_url, receipt).lease_owner or ""), timeout=15
        )
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: "freed 1 deliveries" in intake.log_text(), timeout=15)
        assert _row(database_url, receipt).lease_owner is None
    finally:
        os.kill(own_orthanc.pid, signal.SIGCONT)
    wait_until(lambda: answer["ID"] in own_orthanc.instances(), timeout=30)
    wait_until(lambda: _row(database_url, receipt).state == "forwarded", timeout=15)
    assert "the forwarder process exited with signal SIGKILL; starting another in 1 s" in (
        intake.log_text()
    )
    (second,) = intake.forwarder_pids()
    assert second != first
    # Dying young again doubles the pause; meanwhile /readyz says the forwarder is down.
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: _forwarder_check(intake) is False, timeout=2, interval=0.05)
    wait_until(lambda: _forwarder_check(intake) is True, timeout=30)
    assert "starting another in 2 s" in intake.log_text()


def _forwarder_check(intake: IntakeProcess) -> bool:
    answer = httpx.get(f"{intake.admin_url}/readyz", timeout=10)
    checks: dict[str, bool] = answer.json()["checks"]
    assert answer.status_code == (200 if all(checks.values()) else 503)
    return checks["forwarder"]


def test_the_forwarder_process_ends_with_its_service(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    """Stopped with it (SIGTERM), and gone at once when the service is SIGKILLed: its stdin
    closes, so it never delivers for a service that no longer runs."""
    intake = make_intake(private_orthanc)
    child = _one_forwarder(intake)
    intake.stop()
    assert not is_alive(child)
    assert f"forwarder process {child} stopped" in intake.log_text()
    intake.start()
    child = _one_forwarder(intake)
    intake.kill()
    wait_until(lambda: not is_alive(child), timeout=10)


def test_unreadable_result_lines_are_logged_and_not_counted() -> None:
    metrics = Metrics()
    process = ForwarderProcess(Settings(), cast(Any, None), metrics)
    for line in (b"not json\n", b'["a", "forwarded"]\n', b'[1, "forwarded", "", null]\n'):
        process._count(line)
    process._count(b'["a", "forwarded", "", 0.5]\n')
    process._count(b'["a", "retry", "unreachable", null]\n')
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }
    forwarded = (("reason", ""), ("result", "forwarded"), ("site", "a"))
    retry = (("reason", "unreachable"), ("result", "retry"), ("site", "a"))
    assert samples[("intake_forwards_total", forwarded)] == 1
    assert samples[("intake_forwards_total", retry)] == 1
    assert samples[("intake_forward_latency_seconds_count", (("site", "a"),))] == 1
    assert sum(v for (name, _), v in samples.items() if name == "intake_forwards_total") == 2
