"""Nothing acknowledged is lost: kills, restarts, duplicates and conflicts, end to end."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import create_engine, select

from app.db.models import State, Upload
from tests.support.intake import IntakeProcess, Site, children, is_alive, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


def _states(intake: IntakeProcess) -> dict[str, State]:
    engine = create_engine(intake.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Upload.receipt, Upload.state)).all()
    finally:
        engine.dispose()
    return {receipt: State(state) for receipt, state in rows}


def test_sigkill_with_a_full_queue_loses_nothing(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess
) -> None:
    """Acknowledged while Orthanc is down, SIGKILLed, restarted: every instance arrives."""
    intake = make_intake(own_orthanc)
    site = intake.add_site("hospital-k")
    own_orthanc.stop()
    files = make_study(n_series=2, per_series=5)
    ids = []
    for data in files:
        answer = intake.upload(site, data)
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["ID"])
    assert len(list((intake.spool / "queue").iterdir())) == len(files)
    intake.kill()
    own_orthanc.start()
    intake.start()
    wait_until(lambda: set(ids) <= set(own_orthanc.instances()), timeout=60)
    stored = {own_orthanc.instance_file(i) for i in ids}
    assert stored == set(files)
    wait_until(lambda: set(_states(intake).values()) == {State.FORWARDED}, timeout=30)
    wait_until(lambda: not list((intake.spool / "queue").iterdir()), timeout=30)


def test_restart_cleans_orphans_and_flags_lost_files(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess
) -> None:
    """A spool file without a row is removed; a row without its file is quarantined."""
    intake = make_intake(own_orthanc, orphan_grace_seconds="0")
    site = intake.add_site("hospital-o")
    own_orthanc.stop()
    kept, lost = make_study(n_series=1, per_series=2)
    assert intake.upload(site, kept).status_code == 200
    lost_receipt = intake.upload(site, lost).json()["IntakeReceipt"]
    intake.kill()
    (intake.spool / "queue" / f"{lost_receipt}.dcm").unlink()
    stray = intake.spool / "queue" / "0123456789abcdef0123456789abcdef.dcm"
    stray.write_bytes(b"half a file")
    own_orthanc.start()
    intake.start()
    assert not stray.exists()
    states = wait_until(
        lambda: (s := _states(intake)) and State.QUEUED not in s.values() and s, timeout=60
    )
    assert states[lost_receipt] is State.QUARANTINED
    assert sorted(states.values()) == sorted([State.FORWARDED, State.QUARANTINED])


def test_same_instance_twice_is_already_stored_and_forwarded_once(
    shared_intake: IntakeProcess, fresh_site: Site, private_orthanc: OrthancProcess
) -> None:
    intake, site = shared_intake, fresh_site
    data = make_study(n_series=1, per_series=1)[0]
    first = intake.upload(site, data).json()
    second = intake.upload(site, data).json()
    assert (first["Status"], first["IntakeState"]) == ("Success", "queued")
    assert (second["Status"], second["IntakeState"]) == ("AlreadyStored", "duplicate")
    assert first["ID"] == second["ID"]
    wait_until(lambda: _states(intake).get(first["IntakeReceipt"]) is State.FORWARDED)
    assert _states(intake)[second["IntakeReceipt"]] is State.DUPLICATE


def test_same_uid_with_different_bytes_is_a_conflict_kept_for_an_admin(
    shared_intake: IntakeProcess, fresh_site: Site, private_orthanc: OrthancProcess
) -> None:
    """Orthanc would silently keep the first copy; the intake keeps the second and says so."""
    intake, site = shared_intake, fresh_site
    original = make_study(n_series=1, per_series=1, seed=1)[0]
    # Same header (same UIDs), other pixel bytes: flip the last byte of Pixel Data.
    altered = original[:-1] + bytes([original[-1] ^ 0xFF])
    first = intake.upload(site, original).json()
    second = intake.upload(site, altered).json()
    assert second["ID"] == first["ID"]
    assert second["IntakeState"] == "quarantined"
    assert (intake.spool / "quarantine" / f"{second['IntakeReceipt']}.dcm").read_bytes() == altered
    wait_until(lambda: first["ID"] in private_orthanc.instances())
    assert private_orthanc.instance_file(first["ID"]) == original


def test_sigkill_leaves_no_worker_processes_behind(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    """Validator workers and the forwarder process notice their intake is gone and exit
    (the workers would wait for ever; the forwarder would go on delivering)."""
    intake = make_intake(private_orthanc, validation_workers="2")
    started = wait_until(lambda: len(children(intake.pid)) >= 3 and children(intake.pid))
    assert len(intake.forwarder_pids()) == 1
    # the workers, the forwarder (and multiprocessing's resource tracker)
    intake.kill()
    wait_until(lambda: not any(is_alive(child) for child in started), timeout=15)
