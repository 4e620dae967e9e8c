"""multipart/form-data on POST /instances: legacy Orthanc Explorer and browser forms."""

from __future__ import annotations

import gzip
from collections.abc import Callable

from tests.conftest import SHARED_SQLITE_ONLY, SQLITE_ONLY
from tests.support.archives import make_zip
from tests.support.intake import IntakeProcess, Site, peak_rss, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

BOUNDARY = "intake-test-boundary"


def _form(parts: list[tuple[str, str | None, bytes]], *, close: bool = True) -> bytes:
    """A form-data body by hand, so malformed variants are easy to make."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += (
            (
                f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    if close:
        body += f"--{BOUNDARY}--\r\n".encode()
    return body


def _post(
    intake: IntakeProcess, site: Site, body: bytes, accept: str | None = None
) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if accept:
        headers["Accept"] = accept
    response = intake.upload(site, body, headers=headers)
    return response.status_code, response.content, dict(response.headers)


def test_a_form_upload_is_answered_like_orthanc_and_every_file_arrives(
    shared_intake: IntakeProcess,
    fresh_site: Site,
    private_orthanc: OrthancProcess,
    own_orthanc: OrthancProcess,
) -> None:
    """Orthanc answers a form upload 200 with an empty body; so does the intake.
    The reference Orthanc is one of its own (``own_orthanc``): its instances are the ones
    expected, and sent to the private Orthanc they would be there before the intake
    forwarded them."""
    intake, site = shared_intake, fresh_site
    files = make_study(n_series=1, per_series=2)
    # (Orthanc 1.10.1 takes every part for a file; the intake ignores plain form fields.)
    body = _form([("f1", "a.dcm", files[0]), ("f2", "b.dcm", files[1])])
    with own_orthanc.client() as orthanc:
        theirs = orthanc.post(
            "/instances",
            content=body,
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
    status, content, _ = _post(intake, site, body)
    assert (status, content) == (theirs.status_code, theirs.content) == (200, b"")
    with own_orthanc.client() as orthanc:
        expected = set(orthanc.get("/instances").json())
    wait_until(lambda: expected <= set(private_orthanc.instances()), timeout=60)


@SHARED_SQLITE_ONLY
def test_asking_for_json_gets_a_result_per_file(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    intake, site = shared_intake, fresh_site
    files = make_study(n_series=1, per_series=2)
    body = _form(
        [
            ("note", None, b"a plain field"),
            ("f1", "a.dcm", files[0]),
            ("f2", "b.dcm", files[1][:400]),
        ]
    )
    response = intake.upload(
        site,
        body,
        headers={
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Accept": "application/json",
        },
    )
    assert response.status_code == 200
    first, second = response.json()
    assert (first["IntakeEntry"], first["Status"]) == ("a.dcm", "Success")
    assert (second["IntakeEntry"], second["Status"]) == ("b.dcm", "Failure")
    assert second["IntakeReason"] == "malformed"


@SHARED_SQLITE_ONLY
def test_a_refused_file_makes_the_plain_answer_an_error_naming_it(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """Without JSON, a refusal cannot hide behind a 200: Orthanc's error shape, with counts."""
    intake, site = shared_intake, fresh_site
    good = make_study(1, 1)[0]
    status, content, _ = _post(
        intake, site, _form([("f1", "ok.dcm", good), ("f2", "bad.dcm", b"garbage")])
    )
    assert status == 400
    assert b"1 of 2 files refused (1 accepted); first: bad.dcm" in content
    assert b'"OrthancError":"Bad file format"' in content


@SHARED_SQLITE_ONLY
def test_a_zip_in_a_form_is_unpacked(shared_intake: IntakeProcess, fresh_site: Site) -> None:
    intake, site = shared_intake, fresh_site
    archive = make_zip([(f"{i}.dcm", f) for i, f in enumerate(make_study(1, 2))])
    status, content, _ = _post(
        intake, site, _form([("f", "study.zip", archive)]), accept="application/json"
    )
    assert status == 200, content
    assert content.count(b'"Status":"Success"') == 2


@SHARED_SQLITE_ONLY
def test_a_body_without_its_closing_boundary_stores_nothing(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    intake, site = shared_intake, fresh_site
    files = make_study(1, 2)
    body = _form([("f1", "a.dcm", files[0]), ("f2", "b.dcm", files[1])], close=False)
    status, content, _ = _post(intake, site, body, accept="application/json")
    assert status == 400
    assert b"closing boundary" in content
    again = _post(intake, site, _form([("f1", "a.dcm", files[0])]), "application/json")
    assert b'"Status":"Success"' in again[1]  # the first attempt kept nothing of a.dcm
    assert not list((intake.spool / "tmp").iterdir())


@SHARED_SQLITE_ONLY
def test_garbage_and_missing_boundaries_get_clear_errors(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    intake, site = shared_intake, fresh_site
    no_boundary = intake.upload(site, b"x", headers={"Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 415
    assert "boundary" in no_boundary.json()["Details"]
    huge_header = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n'
        f"X-Padding: {'a' * 20000}\r\n\r\ndata\r\n--{BOUNDARY}--\r\n"
    ).encode()
    status, content, _ = _post(intake, site, huge_header)
    assert status == 400
    assert b"does not parse" in content
    status, content, _ = _post(intake, site, _form([("field", None, b"x")]))
    assert status == 400
    assert b"no file part" in content


@SQLITE_ONLY  # the cap is the parser's: one intake with the setting, on one backend
def test_parts_are_capped(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    intake = make_intake(private_orthanc, max_files_per_request="2")
    site = intake.add_site("parts-capped")
    body = _form([(f"f{i}", f"{i}.dcm", f) for i, f in enumerate(make_study(1, 3))])
    status, content, _ = _post(intake, site, body)
    assert status == 413
    assert b"more than 2 parts" in content
    assert not list((intake.spool / "tmp").iterdir())
    assert not list((intake.spool / "queue").iterdir())


@SQLITE_ONLY  # the cap is the parser's: one intake with the setting, on one backend
def test_a_gzip_bomb_of_a_form_is_capped_once_inflated(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> None:
    """Compressed bytes are counted, and so are inflated ones: the cap holds for both."""
    intake = make_intake(private_orthanc, max_request_bytes=str(8 * 1024 * 1024))
    site = intake.add_site("form-bomb")
    field = ("padding", None, bytes(64 * 1024 * 1024))  # a plain field: parsed, never stored
    body = gzip.compress(_form([field]), compresslevel=9)
    assert intake.pid is not None
    before = peak_rss(intake.pid)
    response = intake.upload(
        site,
        body,
        headers={
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Encoding": "gzip",
        },
    )
    assert response.status_code == 413
    assert "inflates past the limit of 8388608 bytes" in response.json()["Details"]
    assert peak_rss(intake.pid) - before < 32 * 1024 * 1024
