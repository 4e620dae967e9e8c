"""The browser upload page (/upload) in Debian's Chromium, against a real intake and Orthanc.

One backend (SQLite) is enough here: the page speaks HTTP to ``POST /instances`` like any
other client, and that route is tested on both databases by test_upload.py and others.
The tests share the module's SQLite intake (``shared_intake``), each with a site of its
own; the one that stops the intake starts its own.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import SHARED_SQLITE_ONLY, SQLITE_ONLY
from tests.support.browser import chromium, drop_files, watch_auth_challenges
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

STEP_TIMEOUT_MS = 15_000
UPLOAD_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context; script errors and CSP refusals fail the test."""
    context = browser.new_context(viewport={"width": 1000, "height": 1200})
    context.set_default_timeout(STEP_TIMEOUT_MS)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    # The browser logs every 4xx answer as "Failed to load resource"; those are expected.
    opened.on(
        "console",
        lambda message: (
            problems.append(message.text)
            if message.type == "error" and not message.text.startswith("Failed to load resource")
            else None
        ),
    )
    try:
        yield opened
    finally:
        context.close()
    assert problems == []


def _sop_uid(data: bytes) -> str:
    uid: str = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
    return uid


def _study_uid(data: bytes) -> str:
    uid: str = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID
    return uid


def _stored_sop_uids(orthanc: OrthancProcess, study_uid: str) -> set[str]:
    """The SOP Instance UIDs the private Orthanc holds for one study."""
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
    with orthanc.client() as client:
        response = client.post("/tools/find", json=query)
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return {instance["MainDicomTags"]["SOPInstanceUID"] for instance in found}


def _export_folder(root: Path, study: list[bytes], per_series: int) -> Path:
    """Lay ``study`` out like a CD export: nested folders, files without an extension."""
    folder = root / "export"
    for index, data in enumerate(study):
        series = folder / "PATIENT1" / "STUDY1" / f"SERIES{index // per_series + 1}"
        series.mkdir(parents=True, exist_ok=True)
        (series / f"IM{index:04d}").write_bytes(data)
    return folder


def _save_screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """Write a full-page screenshot under tmp_path and, if asked, to INTAKE_TEST_ARTIFACTS."""
    shot = tmp_path / name
    page.screenshot(path=shot, full_page=True)
    artifacts = os.environ.get("INTAKE_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy2(shot, Path(artifacts) / name))
    print(f"upload page screenshot: {shot}")  # noqa: T201 - where the person running the tests finds it
    return shot


def _open(page: Page, intake: IntakeProcess, site_name: str, token: str) -> None:
    page.goto(f"{intake.url}/upload")
    page.get_by_label("Site name").fill(site_name)
    page.get_by_label("Site token").fill(token)


@pytest.mark.orthanc
@SHARED_SQLITE_ONLY
def test_a_folder_is_sent_and_every_file_is_accounted_for(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    private_orthanc: OrthancProcess,
    page: Page,
    tmp_path: Path,
) -> None:
    """Nested folders are sent; the broken file shows the intake's reason; the rest is left out."""
    intake = shared_intake
    site = fresh_site
    study = make_study(n_series=3, per_series=4)
    folder = _export_folder(tmp_path, study, per_series=4)
    # One file as a bare data set (no preamble, DICM or File Meta), which Orthanc stores.
    meta_end = 144 + struct.unpack("<L", study[-1][140:144])[0]
    (folder / "PATIENT1" / "STUDY1" / "SERIES3" / "IM0011").write_bytes(study[-1][meta_end:])
    # DICM at offset 128, then the file stops inside the File Meta group.
    broken_whole = make_study(n_series=1, per_series=1)[0]
    broken = broken_whole[:300]
    (folder / "PATIENT1" / "broken.dcm").write_bytes(broken)
    # A DICOMDIR is a Part 10 file too: only its name keeps it out.
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (folder / "PATIENT1" / "notes.txt").write_text("burned by the PACS export tool\n")

    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    _open(page, intake, site.name, site.token)
    page.get_by_label("Choose a folder").set_input_files(folder)
    page.get_by_role("button", name="Upload", exact=True).click()

    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "done", timeout=UPLOAD_TIMEOUT_MS)
    expect(status).to_have_text(
        "Finished: 12 accepted, 0 already stored, 0 quarantined, 1 rejected, 0 failed, 2 left out."
    )
    counts = {
        "accepted": "12",
        "duplicate": "0",
        "quarantined": "0",
        "rejected": "1",
        "failed": "0",
        "waiting": "0",
        "skipped": "2",
    }
    for name, value in counts.items():
        expect(page.locator(f'[data-count="{name}"]')).to_have_text(value)
    skipped = page.locator("#skipped")
    expect(skipped).to_contain_text("2 files were left out (DICOMDIR or not DICOM): ")
    expect(skipped).to_contain_text("export/DICOMDIR")
    expect(skipped).to_contain_text("export/PATIENT1/notes.txt")
    # The same bytes sent directly get the reason the page must show, word for word.
    answer = intake.upload(site, broken)
    assert answer.status_code == 400
    reason = answer.json()["Details"]
    problem = page.locator("#problems tbody tr")
    expect(problem).to_have_count(1)
    expect(problem.locator("td")).to_have_text(
        ["export/PATIENT1/broken.dcm", "Rejected (HTTP 400)", reason]
    )
    expect(page.locator("#overall-files")).to_have_attribute("value", "13")

    expected = {_sop_uid(data) for data in study}
    wait_until(lambda: _stored_sop_uids(private_orthanc, _study_uid(study[0])) == expected)
    assert _stored_sop_uids(private_orthanc, _study_uid(broken_whole)) == set()
    assert site.token not in page.url
    assert not [url for url in requested if site.token in url]
    assert page.evaluate("[localStorage.length, sessionStorage.length]") == [0, 0]
    assert page.context.cookies() == []
    assert _save_screenshot(page, tmp_path, "upload-page.png").stat().st_size > 0


@SHARED_SQLITE_ONLY
def test_the_drop_zone_is_reached_and_opened_from_the_keyboard(
    shared_intake: IntakeProcess, page: Page, tmp_path: Path
) -> None:
    """Tab reaches the drop zone, its focus is visible, Enter and Space open the picker."""
    intake = shared_intake
    # Playwright turns file-chooser interception on without waiting for it; a listener
    # from the start makes sure it is on before the first key press.
    page.on("filechooser", lambda _: None)
    page.goto(f"{intake.url}/upload")
    focused = []
    for _ in range(3):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
    assert focused == ["site", "token", "dropzone"]
    outline = page.locator("#dropzone").evaluate("e => getComputedStyle(e).outlineStyle")
    assert outline != "none"

    with page.expect_file_chooser() as opened:
        page.keyboard.press("Space")
    assert opened.value.is_multiple()
    with page.expect_file_chooser() as opened:
        page.keyboard.press("Enter")
    one = tmp_path / "one.dcm"
    one.write_bytes(make_study(n_series=1, per_series=1)[0])
    opened.value.set_files(one)
    expect(page.locator("#selection")).to_contain_text("1 DICOM file")
    expect(page.locator("#status")).to_have_attribute("data-state", "chosen")


@SHARED_SQLITE_ONLY
def test_a_wrong_token_is_explained_and_nothing_is_sent(
    shared_intake: IntakeProcess, page: Page, tmp_path: Path
) -> None:
    """The intake's 401 reason is shown on the page, with no login dialog and no upload."""
    intake = shared_intake
    site = intake.add_site(f"hospital-{uuid.uuid4().hex[:12]}")
    other = intake.add_site(f"hospital-{uuid.uuid4().hex[:12]}")
    folder = _export_folder(tmp_path, make_study(n_series=1, per_series=2), per_series=2)
    challenged = watch_auth_challenges(page)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(f"{request.method} {request.url}"))

    _open(page, intake, site.name, other.token)  # a real token, of another site
    page.get_by_label("Choose a folder").set_input_files(folder)
    page.get_by_role("button", name="Upload", exact=True).click()

    alert = page.get_by_role("alert")
    expect(alert).to_have_text(
        "The site name or token was not accepted (HTTP 401): unknown site or token"
    )
    expect(page.locator("#status")).to_have_attribute("data-state", "blocked")
    expect(page.locator('[data-count="waiting"]')).to_have_text("2")
    expect(page.locator('[data-count="accepted"]')).to_have_text("0")
    assert challenged == []
    assert [line for line in sent if line.startswith("POST ")] == []
    assert other.token not in page.url


@SHARED_SQLITE_ONLY
def test_a_dropped_folder_is_read_to_the_end(
    shared_intake: IntakeProcess, fresh_site: Site, page: Page, tmp_path: Path
) -> None:
    """Folders dropped with loose files are walked down, past readEntries' first batch."""
    intake = shared_intake
    site = fresh_site
    # Chromium hands a folder's entries out about 100 at a time.
    study = make_study(n_series=1, per_series=130, rows=8, cols=8)
    folder = tmp_path / "dropped"
    deep = folder / "a" / "b"
    deep.mkdir(parents=True)
    for index, data in enumerate(study[:-1]):
        (deep / f"{index:04d}.dcm").write_bytes(data)
    (folder / "a" / "readme.txt").write_text("not an image\n")
    loose = tmp_path / "loose.dcm"
    loose.write_bytes(study[-1])

    _open(page, intake, site.name, site.token)
    drop_files(page, "#dropzone", [folder, loose])
    expect(page.locator("#selection")).to_contain_text("130 DICOM files")
    page.get_by_role("button", name="Upload", exact=True).click()

    expect(page.locator("#status")).to_have_attribute(
        "data-state", "done", timeout=UPLOAD_TIMEOUT_MS
    )
    expect(page.locator('[data-count="accepted"]')).to_have_text("130")
    expect(page.locator("#skipped")).to_contain_text("1 file was left out")
    expect(page.locator("#skipped")).to_contain_text("dropped/a/readme.txt")


@SHARED_SQLITE_ONLY
def test_too_many_requests_is_waited_out_and_retried(
    shared_intake: IntakeProcess, fresh_site: Site, page: Page, tmp_path: Path
) -> None:
    """429 answers (one upload at a time allowed) are retried after Retry-After, not before."""
    intake = shared_intake
    site = fresh_site
    limited = intake.cli("sites", "policy", site.name, "--max-concurrent-uploads", "1", "--json")
    assert limited.returncode == 0, limited.stderr
    # Files large enough that the page's parallel uploads overlap on the intake.
    study = make_study(n_series=1, per_series=3, rows=512, cols=512)
    folder = _export_folder(tmp_path, study, per_series=3)
    events: list[tuple[float, str, int]] = []
    page.on(
        "request",
        lambda request: (
            events.append((time.monotonic(), "request", 0)) if request.method == "POST" else None
        ),
    )
    page.on(
        "response",
        lambda response: (
            events.append((time.monotonic(), "response", response.status))
            if response.request.method == "POST"
            else None
        ),
    )

    _open(page, intake, site.name, site.token)
    page.get_by_label("Choose a folder").set_input_files(folder)
    page.get_by_role("button", name="Upload", exact=True).click()

    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "waiting", timeout=STEP_TIMEOUT_MS)
    expect(status).to_have_attribute("data-state", "done", timeout=UPLOAD_TIMEOUT_MS)
    expect(page.locator('[data-count="accepted"]')).to_have_text("3")
    expect(page.locator('[data-count="failed"]')).to_have_text("0")
    first_429 = next(at for at, kind, code in events if kind == "response" and code == 429)
    next_send = next(at for at, kind, _ in events if kind == "request" and at > first_429)
    # The intake answers Retry-After: 5 for a busy upload slot.
    assert next_send - first_429 >= 4.5


@SHARED_SQLITE_ONLY
def test_the_page_is_served_without_credentials_and_with_strict_headers(
    shared_intake: IntakeProcess,
) -> None:
    """No inline code, no framing, no referrer, no caching of the page; assets revalidate."""
    intake = shared_intake
    with httpx.Client(base_url=intake.url, timeout=30) as client:
        page = client.get("/upload")
        script = client.get("/upload/upload.js")
        again = client.get("/upload/upload.js", headers={"If-None-Match": script.headers["etag"]})
        unknown = client.get("/upload/pages.py")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy
    assert "connect-src 'self';" in policy
    assert "form-action 'none'" in policy
    assert "unsafe" not in policy
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["x-content-type-options"] == "nosniff"
    assert again.status_code == 304
    assert unknown.status_code == 404
    assert unknown.json()["HttpStatus"] == 404


@SQLITE_ONLY
def test_files_that_failed_while_the_intake_was_down_are_sent_on_retry(
    make_intake: Callable[..., IntakeProcess], page: Page, tmp_path: Path
) -> None:
    """Network errors are retried a few times, then offered to the Retry button, which works."""
    intake = make_intake(None)
    site = intake.add_site("hospital-a")
    folder = _export_folder(tmp_path, make_study(n_series=1, per_series=2), per_series=2)
    _open(page, intake, site.name, site.token)
    page.get_by_role("button", name="Upload", exact=True).click()  # checks the token
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "ready")

    intake.stop()
    page.get_by_label("Choose a folder").set_input_files(folder)
    # A few automatic attempts with back-off (about 8 to 15 seconds in all), then "failed".
    expect(status).to_have_attribute("data-state", "done", timeout=UPLOAD_TIMEOUT_MS)
    expect(page.locator('[data-count="failed"]')).to_have_text("2")
    expect(page.locator("#problems tbody tr")).to_have_count(2)
    expect(page.locator("#problems .reason").first).to_have_text(
        "The connection failed: the intake could not be reached."
    )

    intake.start()  # the same ports
    page.get_by_role("button", name="Retry failed files").click()
    expect(status).to_have_attribute("data-state", "done", timeout=UPLOAD_TIMEOUT_MS)
    expect(page.locator('[data-count="accepted"]')).to_have_text("2")
    expect(page.locator('[data-count="failed"]')).to_have_text("0")
    expect(page.locator("#problems tbody tr")).to_have_count(0)
