"""pydicom's bundled test files, uploaded to a real Orthanc and through the intake.

Every file the real Orthanc (Debian 1.10.1) stores is accepted by the intake too, with
the same four Orthanc IDs, unless a policy in docs/VALIDATION.md refuses it; those
files are pinned in ``POLICY_REFUSALS`` with the refusal reason the intake records.
Files the intake takes but Orthanc refuses are pinned in ``INTAKE_ONLY``: the forwarder
quarantines them as ``orthanc_refused``. Pins that no longer match what happens fail
the test, so the lists stay honest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom.data
import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from app.db.models import State, Upload
from tests.conftest import SQLITE_ONLY
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess

pytestmark = pytest.mark.orthanc

_ROOT = Path(pydicom.data.__file__).resolve().parent / "test_files"
# get_testdata_files() lists folders too (dicomdirtests/...): keep the files.
CORPUS = sorted(p for p in pydicom.data.get_testdata_files() if os.path.isfile(p))
_ID_FIELDS = ("ID", "ParentPatient", "ParentStudy", "ParentSeries")
_FORWARD_WAIT_SECONDS = 90.0

# Orthanc stores these; the intake refuses them on purpose (docs/VALIDATION.md).
# File name under test_files → the reason the intake records (Upload.reason). None in
# pydicom 3.0's files: the bare data sets (ExplVR_*NoMeta.dcm, rtstruct.dcm) and the
# files whose File Meta names another instance (rtplan.dcm, rtdose*.dcm, badVR.dcm) are
# taken with the warnings no_part10_header and meta_mismatch.
POLICY_REFUSALS: dict[str, str] = {}

# The intake takes these, Orthanc refuses them: the forwarder quarantines them as
# orthanc_refused. None in pydicom 3.0's files.
INTAKE_ONLY: set[str] = set()

# Files whose answered IDs may differ from Orthanc's: none. (rtdose_rle*.dcm, whose
# elements are all VR UN, did until app/dicom/summary.py hashed UN values as
# stored, as Orthanc does.)
KNOWN_ID_MISMATCHES: set[str] = set()


def corpus_name(path: str) -> str:
    """The file's path under pydicom's test_files folder (base names repeat)."""
    try:
        return Path(path).resolve().relative_to(_ROOT).as_posix()
    except ValueError:
        return Path(path).name


@dataclass(frozen=True)
class Answer:
    """One answer to ``POST /instances``; ``code`` is None when the connection dropped."""

    code: int | None
    body: dict[str, Any]

    @property
    def stored(self) -> bool:
        return self.code == httpx.codes.OK

    def summary(self) -> str:
        if self.code is None:
            return f"no answer ({self.body.get('Details')})"
        if self.stored:
            return f"200 {self.body.get('Status')}"
        return f"{self.code} {self.body.get('Message')}: {self.body.get('Details')}"


@dataclass(frozen=True)
class Row:
    """One corpus file: the reference Orthanc's answer and the intake's."""

    name: str
    orthanc: Answer
    intake: Answer
    reason: str | None  # the intake's recorded refusal reason (Upload.reason)
    sent: bytes = b""


def post(upload: Callable[[bytes], httpx.Response], data: bytes) -> Answer:
    try:
        response = upload(data)
    except httpx.TransportError as exc:
        return Answer(None, {"Details": f"{type(exc).__name__}: {exc}"})
    try:
        body = response.json()
    except ValueError:
        body = {"Details": response.text[:200]}
    return Answer(response.status_code, body if isinstance(body, dict) else {"Body": body})


@pytest.fixture
def reference_orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    """A real Orthanc of this test's own, not the one the intake forwards to."""
    with OrthancProcess(tmp_path / "reference-orthanc", name="reference") as orthanc:
        yield orthanc


@pytest.fixture
def engine(intake: IntakeProcess) -> Iterator[Engine]:
    """The intake's own database, read to learn each refusal's machine reason."""
    engine = create_engine(intake.database_url)
    yield engine
    engine.dispose()


def newest_upload(engine: Engine) -> tuple[int, str | None]:
    with Session(engine) as session:
        row = session.execute(
            select(Upload.id, Upload.reason).order_by(Upload.id.desc()).limit(1)
        ).one()
    return row.id, row.reason


def upload_corpus(
    reference: OrthancProcess, intake: IntakeProcess, site: Site, engine: Engine
) -> list[Row]:
    """Upload every corpus file to both, one after the other; never stop early."""
    rows: list[Row] = []
    last_id = 0
    for path in CORPUS:
        data = Path(path).read_bytes()
        orthanc = post(reference.upload, data)
        if orthanc.code is None and not reference.is_alive():
            reference.restart()
        answer = post(lambda body: intake.upload(site, body), data)
        # Only this test uploads to this intake: its newest row records this upload.
        row_id, reason = newest_upload(engine)
        if row_id <= last_id:
            reason = "<no upload row recorded>"
        last_id = row_id
        reason = None if answer.stored else reason
        rows.append(Row(corpus_name(path), orthanc, answer, reason, data))
    return rows


def discrepancies(rows: list[Row]) -> list[str]:
    """Every broken rule and every stale pin, one line each."""
    found: list[str] = []
    for row in rows:
        o, i, name = row.orthanc, row.intake, row.name
        pair = f"Orthanc {o.summary()} / intake {i.summary()}"
        if o.stored and i.stored:
            differ = [f for f in (*_ID_FIELDS, "Status") if o.body.get(f) != i.body.get(f)]
            ids_differ = any(f in differ for f in _ID_FIELDS)
            if ids_differ and name not in KNOWN_ID_MISMATCHES:
                found.append(
                    f"{name}: {', '.join(differ)} differ: Orthanc {o.body}, intake {i.body}"
                )
            elif "Status" in differ:
                found.append(f"{name}: Status differs; {pair}")
            if not ids_differ and name in KNOWN_ID_MISMATCHES:
                found.append(f"{name}: stale KNOWN_ID_MISMATCHES pin, the IDs now match")
            if name in POLICY_REFUSALS or name in INTAKE_ONLY:
                found.append(f"{name}: stale pin, both accept it")
        elif o.stored:
            pinned = POLICY_REFUSALS.get(name)
            if pinned is None:
                found.append(f"{name}: refused by the intake only ({row.reason}); {pair}")
            elif row.reason != pinned:
                found.append(f"{name}: refused as {row.reason}, pinned {pinned}; {pair}")
        elif i.stored:
            if name not in INTAKE_ONLY:
                found.append(f"{name}: accepted by the intake only; {pair}")
        elif name in POLICY_REFUSALS or name in INTAKE_ONLY:
            found.append(f"{name}: stale pin, both refuse it; {pair}")
        if name in KNOWN_ID_MISMATCHES and not (o.stored and i.stored):
            found.append(f"{name}: stale KNOWN_ID_MISMATCHES pin; {pair}")
    seen = {row.name for row in rows}
    all_pins = POLICY_REFUSALS.keys() | INTAKE_ONLY | KNOWN_ID_MISMATCHES
    found += [f"{name}: pinned but not in the corpus" for name in sorted(all_pins - seen)]
    return found


def forwarding_problems(
    rows: list[Row], engine: Engine, private_orthanc: OrthancProcess
) -> list[str]:
    """Each upload taken as new reaches the private Orthanc, or is a pinned refusal."""
    new = {
        r.intake.body["IntakeReceipt"]: r for r in rows if r.intake.body.get("Status") == "Success"
    }

    def settled() -> dict[str, tuple[str, str | None, str | None]] | None:
        with Session(engine) as session:
            found = session.execute(
                select(
                    Upload.receipt, Upload.state, Upload.reason, Upload.orthanc_instance_id
                ).where(Upload.receipt.in_(list(new)))
            ).all()
        states = {u.receipt: (u.state, u.reason, u.orthanc_instance_id) for u in found}
        return None if any(s == State.QUEUED for s, _, _ in states.values()) else states

    states = wait_until(settled, timeout=_FORWARD_WAIT_SECONDS, interval=0.5)
    stored = set(private_orthanc.instances())
    problems = []
    for receipt, row in new.items():
        state, reason, orthanc_id = states[receipt]
        if row.name in INTAKE_ONLY:
            if (state, reason) != (State.QUARANTINED, "orthanc_refused"):
                problems.append(f"{row.name}: {state} ({reason}), expected orthanc_refused")
        elif state != State.FORWARDED or orthanc_id not in stored:
            # orthanc_instance_id is what the private Orthanc answered when it took the file.
            problems.append(f"{row.name}: {state} ({reason}), not in the private Orthanc")
        elif private_orthanc.instance_file(orthanc_id) != stored_form(row.sent):
            problems.append(f"{row.name}: the private Orthanc holds other bytes than were sent")
    return problems


def stored_form(sent: bytes) -> bytes:
    """What the intake forwards: the bytes as sent, a Part 10 preamble zeroed."""
    if sent[128:132] == b"DICM":
        return bytes(128) + sent[128:]
    return sent


@SQLITE_ONLY  # parsing and answers; the forwarding it checks is tested on both elsewhere
def test_intake_accepts_what_orthanc_accepts(
    reference_orthanc: OrthancProcess,
    intake: IntakeProcess,
    site: Site,
    engine: Engine,
    private_orthanc: OrthancProcess,
) -> None:
    """pydicom's files: Orthanc's verdict, IDs and Status, except pinned policy; all arrive."""
    rows = upload_corpus(reference_orthanc, intake, site, engine)
    found = discrepancies(rows)
    found += forwarding_problems(rows, engine, private_orthanc)
    assert not found, "\n".join(["", *found])
