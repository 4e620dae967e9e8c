"""SIGKILL the intake at random moments while a real Orthanc peer and scripts push to it.

A few rounds per backend here (bounded to about a minute each); ``python -m
bench.kill_rounds --rounds 50`` runs many. The seed is printed (and shown on failure):
``INTAKE_FAULT_SEED=<seed>`` replays the same kill moments; ``INTAKE_KILL_ROUNDS``
changes the number of rounds.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from tests.support.faults import KillConfig, record_figures, run_kill_rounds, upload_rows

ROUNDS = int(os.environ.get("INTAKE_KILL_ROUNDS", "5"))


def _seed() -> int:
    chosen = os.environ.get("INTAKE_FAULT_SEED")
    return int(chosen) if chosen else random.SystemRandom().randrange(2**31)


def test_sigkill_at_random_moments_loses_nothing(database_url: str, tmp_path: Path) -> None:
    """After every round's SIGKILL and restart, and once the queue drains: every 2xx (to a
    script or to the site's Orthanc) is in the private Orthanc with the bytes sent; nothing
    is there with other bytes; no row is left `received` or `queued`, none quarantined;
    no receipt forwarded twice; no file left in the spool's queue/ or tmp/."""
    config = KillConfig(rounds=ROUNDS, seed=_seed())
    report = run_kill_rounds(tmp_path, database_url, config)
    context = report.summary()
    assert report.audit is not None, context
    record_figures(
        f"intake SIGKILLed under load ({report.backend})",
        report.audit,
        upload_rows(database_url),
        rounds=report.rounds_survived,
        extra={
            "seed": config.seed,
            "busy_kills": report.busy_kills,
            "statuses": dict(report.statuses),
            "orthanc_already_stored": report.already_stored,
            "seconds": round(report.seconds),
        },
    )
    assert report.rounds_survived == config.rounds, context
    assert not report.audit.lost, context
    assert not report.audit.corrupt, context
    assert not report.audit.extra, context
    assert report.audit.found == report.audit.acknowledged, context
    assert report.audit.acknowledged > 0, context
    assert report.peer_attempts > 0, context
    assert report.states.get("received", 0) == 0, context
    assert report.states.get("queued", 0) == 0, context
    assert not report.quarantined, context
    assert not report.forwarded_twice, context
    assert not report.rows_missing, context
    assert not any(report.leftover_files.values()), context
    assert report.ok, context
