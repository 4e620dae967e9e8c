"""The admin API's common queries on a large intake log, against a primary-key lookup.

Run ``python -m bench.admin_queries [--database-url URL] [--rows N] [--runs N]``. It
migrates the database, bulk-inserts N synthetic uploads (5 sites, ~20 instances per
study, 90 days), then times each query through the domain functions the routes call
(app.admin.intake_log, app.admin.studies, app.admin.stats), each in its own session as a
request would be. It prints the median of ``--runs`` runs in ms and the ratio to a
primary-key lookup measured in the same run. docs/PERFORMANCE.md records results.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.admin import intake_log, stats, studies
from app.db.migrations import upgrade
from app.db.models import Site, State, Upload
from app.db.sessions import make_engine, make_sessionmaker
from app.dicom.summary import orthanc_ids

SITES = 5
PER_STUDY = 20
DAYS = 90
BATCH = 10_000
SLOW_MS = 50.0
ROOT_UID = "1.2.826.0.1.3680043.8.498"  # pydicom's root, as the test studies use
REJECTIONS = ("not_dicom", "missing_tag", "invalid_uid", "malformed")
# What a refused upload does not record (app/intake/pipeline.py keeps none of the file's tags).
_FROM_THE_FILE = (
    "sop_class_uid",
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "patient_id",
    "transfer_syntax_uid",
    "modality",
    "orthanc_instance_id",
    "orthanc_series_id",
    "orthanc_study_id",
    "orthanc_patient_id",
)


@dataclass
class Targets:
    """Values picked during the load, for the lookups."""

    site: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    patient_id: str = ""
    orthanc_study_id: str = ""
    deep: tuple[datetime, int] | None = None


def _rows(
    count: int, site_ids: list[int], now: datetime, targets: Targets
) -> Iterator[dict[str, Any]]:
    """Synthetic uploads in arrival order: studies of ~20 instances over DAYS days."""
    rng = random.Random(4)  # noqa: S311 - synthetic data, not cryptography
    n_studies = max(1, count // PER_STUDY)
    start = now - timedelta(days=DAYS)
    step = timedelta(days=DAYS) / n_studies
    made = 0
    for study_no in range(n_studies):
        site_index = rng.randrange(len(site_ids))
        patient = f"PAT{rng.randrange(max(1, n_studies // 3)):07d}"
        study_uid = f"{ROOT_UID}.{study_no + 1}.{rng.randrange(10**9)}"
        at = start + step * study_no
        n_series = rng.randint(1, 4)
        in_study = PER_STUDY if study_no < n_studies - 1 else count - made
        for i in range(in_study):
            series_uid = f"{study_uid}.{i % n_series + 1}"
            sop_uid = f"{series_uid}.{i + 1}"
            ids = orthanc_ids(patient, study_uid, series_uid, sop_uid)
            at += timedelta(milliseconds=rng.randint(50, 900))
            roll = rng.random()
            row: dict[str, Any] = {
                "receipt": f"{made:032x}",
                "site_id": site_ids[site_index],
                "remote_addr": f"10.{site_index}.0.{rng.randint(1, 250)}",
                "received_at": at,
                "byte_size": rng.randint(100_000, 600_000),
                "sha256": rng.randbytes(32).hex(),
                "attempts": 0,
                "failed_answers": 0,
                "state": "forwarded",
                "reason": None,
                "forwarded_at": None,
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                "sop_instance_uid": sop_uid,
                "series_instance_uid": series_uid,
                "study_instance_uid": study_uid,
                "patient_id": patient,
                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                "modality": "CT",
                "orthanc_instance_id": ids.instance,
                "orthanc_series_id": ids.series,
                "orthanc_study_id": ids.study,
                "orthanc_patient_id": ids.patient,
            }
            if roll < 0.02:  # refused: nothing from the file is recorded
                row.update(
                    state="rejected",
                    reason=rng.choice(REJECTIONS),
                    **dict.fromkeys(_FROM_THE_FILE),
                )
            elif roll < 0.04:
                row.update(state="duplicate")
            elif roll < 0.05:
                row.update(state="quarantined", reason="conflict")
            elif at > now - timedelta(minutes=10) or roll < 0.06:
                row.update(state="queued", attempts=1)
            else:
                latency = timedelta(milliseconds=rng.lognormvariate(5, 1))
                row.update(attempts=1, forwarded_at=at + latency)
            if study_no == n_studies // 2 and i == 3:
                targets.site = f"site-{site_index + 1}"
                targets.study_uid, targets.series_uid, targets.sop_uid = (
                    study_uid,
                    series_uid,
                    sop_uid,
                )
                targets.patient_id, targets.orthanc_study_id = patient, ids.study
                targets.deep = (at, made + 1)
            made += 1
            yield row


def load(engine: Engine, count: int) -> Targets:
    """Sites and ``count`` uploads, inserted in batches; then the planner's statistics."""
    now = datetime.now(UTC)
    targets = Targets()
    with engine.begin() as connection:
        connection.execute(
            insert(Site), [{"name": f"site-{n + 1}", "created_at": now} for n in range(SITES)]
        )
        site_ids = list(connection.scalars(select(Site.id).order_by(Site.id)))
    started = time.perf_counter()
    batch: list[dict[str, Any]] = []
    for row in _rows(count, site_ids, now, targets):
        batch.append(row)
        if len(batch) == BATCH:
            with engine.begin() as connection:
                connection.execute(insert(Upload), batch)
            batch = []
    if batch:
        with engine.begin() as connection:
            connection.execute(insert(Upload), batch)
    print(f"loaded {count:,} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if engine.dialect.name == "postgresql":
        # What autovacuum would have done on a live database.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE uploads"))
    return targets


def _timed(sessions: sessionmaker[Session], query: Callable[[Session], object], runs: int) -> float:
    def once() -> float:
        start = time.perf_counter()
        with sessions() as session:
            query(session)
        return (time.perf_counter() - start) * 1000

    once()  # warm: pool, plan cache, pages
    return statistics.median(once() for _ in range(runs))


def cases(targets: Targets) -> list[tuple[str, Callable[[Session], object]]]:
    quiet = 300.0
    if targets.deep is None:
        raise SystemExit("--rows is too small to pick targets from")
    today = datetime.now(UTC)
    one_day = (targets.deep[0] - timedelta(hours=12), targets.deep[0] + timedelta(hours=12))
    deep_cursor = intake_log.encode_cursor(*targets.deep)
    newest = studies.latest
    return [
        (
            "(B) primary-key lookup",
            lambda s: s.execute(select(Upload.id, Upload.state).where(Upload.id == 12345)).all(),
        ),
        ("log: latest page (100)", lambda s: intake_log.search(s, intake_log.Filters())),
        (
            "log: page from a cursor 45 days back",
            lambda s: intake_log.search(s, intake_log.Filters(), cursor=deep_cursor),
        ),
        (
            "log: site, latest page",
            lambda s: intake_log.search(s, intake_log.Filters(site=targets.site)),
        ),
        (
            "log: site + 24 h range",
            lambda s: intake_log.search(
                s,
                intake_log.Filters(
                    site=targets.site, received_from=one_day[0], received_to=one_day[1]
                ),
            ),
        ),
        (
            "log: state=quarantined",
            lambda s: intake_log.search(s, intake_log.Filters(states=(State.QUARANTINED,))),
        ),
        (
            "log: by Study UID",
            lambda s: intake_log.search(s, intake_log.Filters(study_uid=targets.study_uid)),
        ),
        (
            "log: by PatientID",
            lambda s: intake_log.search(s, intake_log.Filters(patient_id=targets.patient_id)),
        ),
        (
            "log: by SOP Instance UID",
            lambda s: intake_log.search(s, intake_log.Filters(sop_uid=targets.sop_uid)),
        ),
        (
            "log: by Series UID",
            lambda s: intake_log.search(s, intake_log.Filters(series_uid=targets.series_uid)),
        ),
        (
            "log: by Orthanc study ID",
            lambda s: intake_log.search(s, intake_log.Filters(orthanc_id=targets.orthanc_study_id)),
        ),
        ("log: one record", lambda s: intake_log.show(s, 12345)),
        ("studies: latest page (50)", lambda s: newest(s, studies.StudyFilters(), quiet)),
        (
            "studies: page from a cursor 45 days back",
            lambda s: newest(s, studies.StudyFilters(), quiet, cursor=deep_cursor),
        ),
        (
            "studies: one site, latest page",
            lambda s: newest(s, studies.StudyFilters(site=targets.site), quiet),
        ),
        (
            "studies: by PatientID",
            lambda s: newest(s, studies.StudyFilters(patient_id=targets.patient_id), quiet),
        ),
        (
            "studies: one study + series",
            lambda s: studies.show(s, targets.site, targets.study_uid, quiet),
        ),
        (
            "stats: one site, 30 days",
            lambda s: stats.daily(
                s, targets.site, (today - timedelta(days=29)).date(), today.date()
            ),
        ),
        (
            "stats: all sites, 7 days",
            lambda s: stats.daily(s, None, (today - timedelta(days=6)).date(), today.date()),
        ),
    ]


def _run(url: str, rows: int, runs: int) -> int:
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    targets = load(engine, rows)
    results = [(name, _timed(sessions, query, runs)) for name, query in cases(targets)]
    baseline = results[0][1]
    backend = engine.dialect.name
    version = engine.dialect.server_version_info
    print(
        f"\n{backend} {'.'.join(map(str, version or ()))}, {rows:,} uploads, median of {runs} runs"
    )
    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"{python}, {platform.machine()}, {os.cpu_count()} CPUs, {date.today()}")
    print("| case | ms | x baseline |\n| --- | ---: | ---: |")
    slow = 0
    for name, ms in results:
        flag = " (slow)" if ms > SLOW_MS else ""
        slow += bool(flag)
        print(f"| {name}{flag} | {ms:,.2f} | {ms / baseline:,.1f} |")
    engine.dispose()
    return 1 if slow else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admin_queries", description=__doc__)
    parser.add_argument(
        "--database-url", help="an empty, throwaway database (default: a temporary SQLite file)"
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    if args.database_url:
        return _run(args.database_url, args.rows, args.runs)
    with tempfile.TemporaryDirectory(prefix="bench-admin-") as workdir:
        url = f"sqlite:///{Path(workdir) / 'intake.db'}"
        print(f"database: {make_url(url)}", file=sys.stderr)
        return _run(url, args.rows, args.runs)


if __name__ == "__main__":
    sys.exit(main())
