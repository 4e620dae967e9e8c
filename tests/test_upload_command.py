"""`orthanc-intake upload`: the real command, as a subprocess, against a real intake and Orthanc.

The client logic's corners (URL joining, the folder walk, retry timing, answers a real
intake cannot easily be made to give) are tested in-process at the end, without a server.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import auth, uploader
from app.dicom import orthanc_ids
from tests.support.intake import ROOT, IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


def _run(
    intake: IntakeProcess, site: str, token: str, *args: str, token_in_env: bool = True
) -> subprocess.CompletedProcess[str]:
    """The command as a site would run it; the token comes from the environment by default."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    command = [sys.executable, "-m", "app", "upload", "--url", intake.url, "--site", site, *args]
    if token_in_env:
        env["INTAKE_UPLOAD_TOKEN"] = token
    else:
        command += ["--token", token]
    return subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def _write(folder: Path, files: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"IM{n:04d}.dcm" for n in range(1, len(files) + 1)]
    for path, data in zip(paths, files, strict=True):
        path.write_bytes(data)
    return paths


def _orthanc_id(data: bytes) -> tuple[str, str]:
    """(study ID, instance ID) that Orthanc gives this file."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    ids = orthanc_ids(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return ids.study, ids.instance


def _study_instances(orthanc: OrthancProcess, study_id: str) -> set[str]:
    with orthanc.client() as client:
        response = client.get(f"/studies/{study_id}/instances")
    if response.status_code == 404:
        return set()
    response.raise_for_status()
    return {instance["ID"] for instance in response.json()}


def _wait_for_exactly(orthanc: OrthancProcess, files: list[bytes]) -> None:
    """Poll until each study of ``files`` holds exactly their instances in the private Orthanc."""
    expected: dict[str, set[str]] = {}
    for data in files:
        study, instance = _orthanc_id(data)
        expected.setdefault(study, set()).add(instance)
    for study, instances in expected.items():
        wait_until(lambda s=study, i=instances: _study_instances(orthanc, s) == i, timeout=60)


def _metric(intake: IntakeProcess, name: str, **labels: str) -> float:
    """A counter's value on the admin listener's /metrics (0 when it has no such sample)."""
    text = httpx.get(f"{intake.admin_url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


_COUNTS = dict.fromkeys(
    [
        "accepted",
        "duplicates",
        "quarantined",
        "rejected",
        "skipped",
        "failed",
        "not sent",
        "retries",
    ],
    0,
)


def _counts(summary: str) -> dict[str, int]:
    """The ``  label:  n`` lines of the human summary."""
    counts: dict[str, int] = {}
    for line in summary.splitlines():
        label, sep, value = line.strip().rpartition(":")
        if sep and line.startswith("  ") and value.strip().isdigit():
            counts[label] = int(value)
    return counts


def test_a_folder_is_walked_sent_and_summarised_as_json(
    intake: IntakeProcess, site: Site, private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """DICOM files in nested folders arrive; DICOMDIR and text are skipped; a broken one is
    rejected with the server's reason; the JSON document says all of it; exit 1."""
    export = tmp_path / "export"
    study_a = make_study(n_series=2, per_series=3)
    *study_b, broken = make_study(n_series=1, per_series=3)
    sent = _write(export / "patient-a" / "study" / "series-1", study_a[:3])
    sent += _write(export / "patient-a" / "study" / "series-2", study_a[3:])
    sent += _write(export / "patient-b" / "deeper", [*study_b, broken[:-1000]])
    (export / "notes.txt").write_text("exported by the PACS on Monday\n")
    # A real DICOMDIR is a Part 10 file too: only its name tells it apart.
    index = make_study(n_series=1, per_series=1)[0]
    (export / "DICOMDIR").write_bytes(index)

    done = _run(intake, site.name, site.token, str(export), "--json")

    assert done.returncode == 1, done.stderr
    assert done.stderr == ""  # no progress bar, no warning: stdout is not a terminal
    report = json.loads(done.stdout)
    broken_path = str(sent[-1])
    rejected = report.pop("rejected")
    assert [(r["path"], r["status"], r["reason"]) for r in rejected] == [
        (broken_path, 400, "Bad file format")
    ]
    assert "past the end" in rejected[0]["detail"]  # the server's precise reason
    assert report.pop("seconds") > 0
    assert report == {
        "accepted": 8,
        "duplicates": 0,
        "quarantined": 0,
        "skipped": [
            {
                "path": str(export / "DICOMDIR"),
                "status": None,
                "reason": "DICOMDIR (a media index, not an instance)",
                "detail": "",
            },
            {
                "path": str(export / "notes.txt"),
                "status": None,
                "reason": "not DICOM (no DICM at byte 128)",
                "detail": "",
            },
        ],
        "failed": [],
        "not_sent": 0,
        "files": 9,
        "bytes": sum(path.stat().st_size for path in sent),
        "retries": 0,
        "error": None,
    }
    _wait_for_exactly(private_orthanc, study_a + study_b)
    assert _orthanc_id(index)[1] not in private_orthanc.instances()


def test_sending_a_folder_again_reports_duplicates_and_exits_0(
    intake: IntakeProcess, site: Site, tmp_path: Path
) -> None:
    """A second run of the same folder stores nothing new: every file is a duplicate."""
    _write(tmp_path / "study", make_study(n_series=1, per_series=4))

    first = _run(intake, site.name, site.token, str(tmp_path / "study"))
    again = _run(intake, site.name, site.token, str(tmp_path / "study"))

    assert first.returncode == 0, first.stdout + first.stderr
    assert _counts(first.stdout) == _COUNTS | {"accepted": 4}
    assert again.returncode == 0, again.stdout + again.stderr
    assert _counts(again.stdout) == _COUNTS | {"duplicates": 4}
    assert again.stderr == ""


def test_a_wrong_token_stops_the_run_after_one_request_with_exit_3(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """One refused request ends the run: exit 3, a clear message, the token never echoed."""
    # Two failures block the address, so the probes below count the command's requests.
    intake = make_intake(private_orthanc, auth_max_failures="2")
    intake.add_site("hospital-a")
    wrong = auth.new_token()
    _write(tmp_path / "study", make_study(n_series=1, per_series=5))

    done = _run(intake, "hospital-a", wrong, str(tmp_path / "study"), token_in_env=False)

    assert done.returncode == 3
    assert "authentication failed for site 'hospital-a'" in done.stderr
    assert "unknown site or token" in done.stderr
    assert wrong not in done.stdout + done.stderr
    assert _counts(done.stdout)["not sent"] == 4

    def probe() -> int:
        url = f"{intake.url}/instances"
        return httpx.post(url, auth=("hospital-a", wrong), content=b"x", timeout=30).status_code

    assert probe() == 401  # the command's request was the first failure, this the second
    assert probe() == 429  # so the address is blocked now: the command made exactly one
    assert _metric(intake, "intake_received_bytes_total") == 0


def test_too_many_concurrent_uploads_are_retried_until_accepted(
    intake: IntakeProcess, site: Site, private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """Real 429s (one upload at a time for the site, four in flight) are waited out."""
    # --json: the text form fails on a never-used token (app/cli.py `_show`).
    policy = intake.cli("sites", "policy", site.name, "--max-concurrent-uploads", "1", "--json")
    assert policy.returncode == 0, policy.stderr
    # 128 KiB files keep each upload busy long enough for the four to overlap.
    files = make_study(n_series=1, per_series=6, rows=256, cols=256)
    _write(tmp_path / "study", files)

    started = time.monotonic()
    done = _run(intake, site.name, site.token, str(tmp_path / "study"), "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["accepted"] == 6
    assert report["failed"] == []
    assert report["retries"] > 0
    refused = _metric(
        intake, "intake_uploads_total", outcome="rejected", reason="too_many_concurrent_uploads"
    )
    assert refused == report["retries"]
    # The intake's Retry-After (5 s) was honoured before the retries.
    assert time.monotonic() - started >= 5
    _wait_for_exactly(private_orthanc, files)


def test_a_zip_archive_is_sent_whole(
    intake: IntakeProcess, site: Site, private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """A ZIP of DICOM files (and a README the server skips) is one request; each entry counts."""
    files = make_study(n_series=1, per_series=3)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README.txt", "Exported for the intake.\n")
        for n, data in enumerate(files, 1):
            zf.writestr(f"DICOM/IM{n:04d}", data)

    done = _run(intake, site.name, site.token, str(archive), "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["accepted"], report["rejected"], report["files"]) == (3, [], 1)
    assert report["bytes"] == archive.stat().st_size
    _wait_for_exactly(private_orthanc, files)


# --- the client logic, without a server ------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://intake.example.org", "https://intake.example.org/instances"),
        ("https://intake.example.org/", "https://intake.example.org/instances"),
        ("https://host.example/intake", "https://host.example/intake/instances"),
        ("https://host.example/intake/", "https://host.example/intake/instances"),
        ("http://127.0.0.1:8000/a/b//?x=1", "http://127.0.0.1:8000/a/b/instances"),
    ],
)
def test_instances_url_keeps_a_path_prefix(given: str, expected: str) -> None:
    assert str(uploader.instances_url(given)) == expected


@pytest.mark.parametrize(
    "given", ["intake.example.org/", "ftp://intake.example.org/", "https://a:b@intake.example.org/"]
)
def test_instances_url_refuses_what_is_not_a_plain_http_url(given: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        uploader.instances_url(given)


def test_folder_walk_is_sorted_and_skips_what_is_not_an_instance(tmp_path: Path) -> None:
    """Only DICM files and ZIPs inside folders are sent, in path order; the rest is listed."""
    dicom = make_study(n_series=1, per_series=1)[0]
    root = tmp_path / "root"
    (root / "b" / "c").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "b" / "c" / "z.dcm").write_bytes(dicom)
    (root / "b" / "y").write_bytes(dicom)
    (root / "a" / "x.zip").write_bytes(b"PK\x03\x04" + bytes(200))
    (root / "a" / "dicomdir").write_bytes(dicom)
    (root / "a" / "short").write_bytes(b"tiny")
    (root / "a" / "fake.dcm").write_bytes(bytes(128) + b"DICX" + bytes(10))
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(dicom)
    (root / "a" / "link.dcm").symlink_to(outside)
    (root / "linked-folder").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(root / "a" / "pipe")
    loose = tmp_path / "loose.txt"
    loose.write_text("sent anyway: it was named on the command line")

    report = uploader.Report()
    items = uploader.collect([root, loose], report)

    assert [(i.path, i.content_type) for i in items] == [
        (root / "a" / "x.zip", "application/zip"),
        (root / "b" / "c" / "z.dcm", "application/dicom"),
        (root / "b" / "y", "application/dicom"),
        (loose, "application/dicom"),
    ]
    assert items[1].size == len(dicom)
    assert [(Path(p.path).name, p.reason) for p in report.skipped] == [
        ("dicomdir", "DICOMDIR (a media index, not an instance)"),
        ("fake.dcm", "not DICOM (no DICM at byte 128)"),
        ("link.dcm", "not a regular file"),
        ("pipe", "not a regular file"),
        ("short", "not DICOM (no DICM at byte 128)"),
    ]


def test_retry_delay_grows_honours_retry_after_and_is_capped() -> None:
    for _ in range(50):
        assert 0.5 <= uploader.retry_delay(0, None) <= 1
        assert 4 <= uploader.retry_delay(3, None) <= 8
        assert 5 <= uploader.retry_delay(0, 5) <= 6
        assert uploader.retry_delay(2, 3600) == uploader.MAX_WAIT_SECONDS
        assert uploader.retry_delay(30, None) == uploader.MAX_WAIT_SECONDS


def _serve(
    tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response], n: int = 1, **kwargs: Any
) -> uploader.Report:
    folder = tmp_path / "files"
    _write(folder, [bytes(128) + b"DICM" + bytes([k]) * 70_000 for k in range(n)])
    return uploader.upload(
        [folder],
        "http://intake.test/prefix/",
        "site-a",
        "token",
        backoff=0,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


def test_transient_failures_are_retried_and_final_answers_are_not(tmp_path: Path) -> None:
    """Connection errors, 503 and 507 are retried; 400 is final; 500 fails at once."""
    answers: dict[int, list[Any]] = {
        0: [httpx.ConnectError("refused"), 503, 507, 200],
        1: [400],
        2: [500],
        3: [429] * 10,
    }
    seen: list[tuple[str, str, str | None, int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        seen.append(
            (
                request.url.path,
                request.headers["content-type"],
                request.headers.get("content-length"),
                len(body),
            )
        )
        answer = answers[body[132]].pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer == 200:
            return httpx.Response(200, json={"Status": "Success", "IntakeState": "queued"})
        error = {"HttpStatus": answer, "Message": f"m{answer}", "Details": f"d{answer}"}
        return httpx.Response(answer, json=error, headers={"Retry-After": "0"})

    report = _serve(tmp_path, handler, n=4, retries=3)

    assert {s[:3] for s in seen} == {("/prefix/instances", "application/dicom", "70132")}
    assert {s[3] for s in seen} == {70_132}  # streamed whole, every time
    assert report.accepted == 1
    assert [(Path(p.path).name, p.status, p.reason, p.detail) for p in report.rejected] == [
        ("IM0002.dcm", 400, "m400", "d400")
    ]
    assert [(Path(p.path).name, p.status, p.reason) for p in report.failed] == [
        ("IM0003.dcm", 500, "m500"),
        ("IM0004.dcm", 429, "m429"),
    ]
    assert report.retries == 3 + 3
    assert report.exit_code == 1


def test_a_zip_answer_counts_each_entry(tmp_path: Path) -> None:
    """Orthanc answers a ZIP with one object per DICOM entry; failed entries are listed."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/zip"
        request.read()
        return httpx.Response(
            200,
            json=[
                {"Status": "Success", "IntakeState": "queued"},
                {"Status": "AlreadyStored", "IntakeState": "duplicate"},
                {"Status": "AlreadyStored", "IntakeState": "quarantined"},
                {
                    "Status": "Failure",
                    "HttpStatus": 400,
                    "IntakeReason": "malformed",
                    "Details": "short",
                },
                {"Status": "Failure", "HttpStatus": 429, "IntakeReason": "rate_limited"},
                {"Status": "Failure", "IntakeEntry": "b/c", "IntakeReason": "?"},
            ],
        )

    archive = tmp_path / "a.zip"
    archive.write_bytes(b"PK\x03\x04" + bytes(100))
    report = uploader.upload(
        [archive], "http://intake.test", "s", "t", transport=httpx.MockTransport(handler)
    )

    assert (report.accepted, report.duplicates, report.quarantined) == (1, 1, 1)
    assert report.rejected == [
        uploader.Problem(f"{archive} #4", 400, "malformed", "short"),
        uploader.Problem(f"{archive}!b/c", 200, "?"),
    ]
    assert report.failed == [uploader.Problem(f"{archive} #5", 429, "rate_limited")]
    assert f"{archive} #4: malformed (400): short" in report.summary()


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        request.read()
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return httpx.Response(200, json={"Status": "Success"})

    report = _serve(tmp_path, handler, n=12, concurrency=3)

    assert report.accepted == 12
    assert 1 < in_flight[1] <= 3


@pytest.mark.parametrize(
    ("report", "code"),
    [
        (uploader.Report(accepted=2, duplicates=1, skipped=[uploader.Problem("x", None, "")]), 0),
        (uploader.Report(accepted=2, quarantined=1), 1),
        (uploader.Report(failed=[uploader.Problem("x", 503, "")]), 1),
        (uploader.Report(not_sent=1), 1),
        (uploader.Report(rejected=[uploader.Problem("x", 400, "")], auth_error="no"), 3),
    ],
)
def test_exit_codes(report: uploader.Report, code: int) -> None:
    assert report.exit_code == code
