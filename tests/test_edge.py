"""The public door under attack (issue 14): credentials, names, log lines and CSV cells
that a client with or without a token chooses, against a real intake on both backends.

Every test here failed on the code before its fix; each asserts the class, not the one
example the issue found (any Authorization bytes, every CSV cell, every log value).
"""

from __future__ import annotations

import base64
import csv
import io
import os
import re
import socket
import uuid
from collections.abc import Callable

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from app.access import admins, sites, tokens
from app.errors import InvalidName
from tests.conftest import SQLITE_ONLY
from tests.dicom_samples import make_instance
from tests.support.intake import Admin, IntakeProcess, Site

# One line of the text log begins like this; a forged line would too.
_LOG_LINE_START = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} ")
_FORGED = "2000-01-01 00:00:00,000 WARNING app.access.gate: security: forged"
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _exchange(port: int, head: bytes, source: str = "127.0.0.1") -> int:
    """One raw request (head only, no body) from ``source``; the answer's status."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
        s.sendall(head)
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    found = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return int(found.group(1)) if found else 0


def _request(path: str, authorization: bytes, method: str = "GET") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n".encode()
        + b"Authorization: "
        + authorization
        + b"\r\nConnection: close\r\n\r\n"
    )


def _non_ascii_checksum(token: str) -> str:
    """A token of the right length and prefix whose six checksum characters are not ASCII."""
    return token[:-6] + "\u00e9" * 6


def _source() -> str:
    """A loopback source address of its own, so one test's failures throttle no other."""
    raw = uuid.uuid4().bytes
    return f"127.{raw[0] % 200 + 20}.{raw[1]}.{raw[2] % 250 + 1}"


@pytest.fixture
def edge_admin(shared_intake: IntakeProcess) -> Admin:
    return shared_intake.add_admin(f"admin-{uuid.uuid4().hex[:10]}")


# --- 5. credentials: never a 5xx, every malformed one counted -----------------------------


@pytest.mark.parametrize("listener", ["public", "admin"])
@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_non_ascii_token_checksums_are_401_and_throttled(
    shared_intake: IntakeProcess, fresh_site: Site, listener: str, scheme: str
) -> None:
    """A token whose checksum is not ASCII is a 401 counted by the throttle: ten, then 429."""
    prefix = tokens.TOKEN_PREFIX if listener == "public" else tokens.ADMIN_TOKEN_PREFIX
    token = _non_ascii_checksum(tokens.new_token(prefix))
    if scheme == "bearer":
        credentials = b"Bearer " + token.encode("latin-1")
    else:
        credentials = b"Basic " + base64.b64encode(f"{fresh_site.name}:{token}".encode())
    port = shared_intake.public_port if listener == "public" else shared_intake.admin_port
    path = "/system" if listener == "public" else "/api/sites"
    source = _source()
    statuses = [_exchange(port, _request(path, credentials), source) for _ in range(12)]
    assert statuses[:10] == [401] * 10
    assert statuses[10:] == [429, 429]


@pytest.mark.parametrize("listener", ["public", "admin"])
def test_any_authorization_bytes_get_a_4xx(shared_intake: IntakeProcess, listener: str) -> None:
    """Whatever bytes the Authorization header holds, the answer is a 4xx, never a 5xx."""
    port = shared_intake.public_port if listener == "public" else shared_intake.admin_port
    path = "/instances" if listener == "public" else "/api/uploads"
    method = "POST" if listener == "public" else "GET"
    # Field-value bytes (RFC 9110 §5.5: no CR, LF or NUL), around the schemes' shapes.
    value_bytes = st.binary(min_size=0, max_size=120).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    )
    text = st.text(min_size=0, max_size=80)
    shaped = st.one_of(
        value_bytes,
        st.builds(lambda v: b"Bearer " + v, value_bytes),
        st.builds(
            lambda p, v: b"Bearer " + p.encode() + v, st.sampled_from(["oit_", "oia_"]), value_bytes
        ),
        st.builds(
            lambda user, password: b"Basic " + base64.b64encode(f"{user}:{password}".encode()),
            text,
            text,
        ),
        st.builds(lambda v: b"Basic " + v, value_bytes),
    )

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=bool(os.environ.get("CI")),
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(shaped)
    def probe(value: bytes) -> None:
        status = _exchange(port, _request(path, value, method), _source())
        assert 400 <= status < 500, (value, status)

    probe()


# --- 11. names: a full match, never a trailing newline ------------------------------------


@pytest.mark.parametrize("name", ["x\n", "site\n", "a\r", "ok\nsecond-line"])
def test_names_with_line_breaks_are_refused(
    shared_intake: IntakeProcess, edge_admin: Admin, name: str
) -> None:
    """No site or admin name may hold a line break (`$` accepts one before the end)."""
    with shared_intake.admin_client(edge_admin) as client:
        answer = client.post("/api/sites", json={"name": name})
    assert answer.status_code in (400, 422), answer.text
    with pytest.raises(InvalidName), shared_intake.session() as session:
        sites.add(session, name)
    with pytest.raises(InvalidName), shared_intake.session() as session:
        admins.add(session, name, "a long admin password")


# --- 6. log lines: no value can write a line of its own -----------------------------------


def _forged_lines(intake: IntakeProcess) -> list[str]:
    return [line for line in intake.log_text().splitlines() if line.startswith("2000-01-01")]


def test_a_decoded_stow_path_cannot_forge_a_log_line(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """A study UID in the URL is checked to be a UID: 400 in Orthanc's shape, one log line."""
    forged = "1.2.3%0A" + _FORGED.replace(" ", "%20")
    with shared_intake.client(fresh_site) as client:
        answer = client.post(
            f"/dicom-web/studies/{forged}",
            content=b"--b\r\n\r\n--b--\r\n",
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["HttpStatus"] == 400
    assert "not a UID" in answer.json()["Details"]
    assert _forged_lines(shared_intake) == []


def test_a_modality_with_a_line_break_cannot_forge_a_log_line(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """A site's policy refusal quotes the Modality: on one line, its controls escaped."""
    with shared_intake.session() as session:
        sites.set_policy(session, fresh_site.name, allowed_modalities=["CT"])
    modality = "MR\n" + _FORGED + "\x1b[2J"
    data = make_instance(
        Modality=modality,
        SOPInstanceUID=generate_uid(),
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )
    answer = shared_intake.upload(fresh_site, data)
    assert answer.status_code in (400, 403), answer.text
    assert _forged_lines(shared_intake) == []
    assert "\x1b" not in shared_intake.log_text()


# --- 4. CSV: no cell a spreadsheet would run ---------------------------------------------


@pytest.mark.parametrize(
    "patient_id",
    ['=HYPERLINK("http://evil.example")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3+cmd"],
)
def test_the_csv_export_neutralises_formulas_and_controls(
    shared_intake: IntakeProcess, fresh_site: Site, edge_admin: Admin, patient_id: str
) -> None:
    """Every cell of the export that a site chose is text to a spreadsheet, on one line."""
    data = make_instance(
        PatientID=patient_id,
        Modality="=1+1",
        SOPInstanceUID=generate_uid(),
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )
    answer = shared_intake.upload(fresh_site, data)
    assert answer.status_code in (200, 400), answer.text
    escaped = make_instance(
        PatientID="\x1b]0;owned\x07PID",
        SOPInstanceUID=generate_uid(),
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )
    assert shared_intake.upload(fresh_site, escaped).status_code in (200, 400)
    with shared_intake.admin_client(edge_admin) as client:
        export = client.get("/api/uploads.csv", params={"site": fresh_site.name})
    assert export.status_code == 200, export.text
    rows = list(csv.reader(io.StringIO(export.text)))
    assert len(rows) >= 3  # the header and both uploads
    cells = [cell for row in rows[1:] for cell in row]
    assert any(patient_id in cell for cell in cells)  # the value is there, as text
    for cell in cells:
        assert not cell.startswith(_FORMULA_START), cell
        assert not _CONTROL.search(cell), cell


def test_every_log_line_starts_as_a_record(shared_intake: IntakeProcess) -> None:
    """After every probe of this module, each line of the log is a record or indented."""
    for line in shared_intake.log_text().splitlines():
        if line.strip():
            assert _LOG_LINE_START.match(line) or line.startswith((" ", "\t")), line


# --- 7. never "stored" for what the archive will refuse -----------------------------------


@pytest.mark.parametrize("magic", [b"PK\x05\x06", b"PK\x03\x04"])
def test_a_zip_magic_preamble_is_an_instance_refused_not_an_empty_archive(
    shared_intake: IntakeProcess, fresh_site: Site, magic: bytes
) -> None:
    """A Part 10 file whose preamble opens with ZIP magic is a polyglot: refused (400),
    never answered `[]` as an empty archive."""
    data = make_instance(
        SOPInstanceUID=generate_uid(),
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )
    polyglot = magic + bytes(124) + data[128:]
    answer = shared_intake.upload(fresh_site, polyglot)
    assert answer.status_code == 400, answer.text
    assert answer.json()["HttpStatus"] == 400


@pytest.mark.parametrize(
    ("patient_id", "status"),
    [("P" * 256, 200), ("P" * 257, 400), ("\u00e9" * 129, 400)],
    ids=["256-bytes", "257-bytes", "258-bytes-utf8"],
)
def test_identifiers_over_orthancs_limit_are_refused_at_intake(
    shared_intake: IntakeProcess, fresh_site: Site, patient_id: str, status: int
) -> None:
    """A PatientID the private Orthanc would refuse (over 256 UTF-8 bytes) is a 400 now,
    with Orthanc's message, not a 200 that ends as `orthanc_refused`."""
    data = make_instance(
        SpecificCharacterSet="ISO_IR 192",
        PatientID=patient_id,
        SOPInstanceUID=generate_uid(),
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )
    answer = shared_intake.upload(fresh_site, data)
    assert answer.status_code == status, answer.text
    if status == 400:
        assert answer.json()["Message"] == "Bad type for a parameter"
        assert "PatientID" in answer.json()["Details"]


# --- 8. the admin API and cross-site requests, Host allow-lists ---------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "text/plain"},
        {"Content-Type": "multipart/form-data; boundary=x"},
    ],
    ids=["origin", "null-origin", "cross-site", "same-site", "form", "text", "multipart"],
)
def test_a_cross_site_state_change_on_the_admin_api_is_403(
    shared_intake: IntakeProcess, fresh_site: Site, edge_admin: Admin, headers: dict[str, str]
) -> None:
    """What a foreign page can make a browser send (with credentials it remembers) changes
    nothing; the same request from a server-side client (no such headers) does."""
    path = f"/api/sites/{fresh_site.name}/disable"
    with shared_intake.admin_client(edge_admin, basic=True) as client:
        refused = client.post(path, headers=headers, content=b"")
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "cross_site_request"
        assert client.get(f"/api/sites/{fresh_site.name}").json()["status"] == "active"
        assert client.post(path).json()["status"] == "disabled"


def test_the_admin_listener_never_invites_browsers_to_remember_a_password(
    shared_intake: IntakeProcess,
) -> None:
    with shared_intake.admin_client() as anonymous:
        answer = anonymous.get("/api/sites")
    assert answer.status_code == 401
    assert not answer.headers["www-authenticate"].lower().startswith("basic")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example"])
def test_the_admin_listener_answers_only_its_own_names(
    shared_intake: IntakeProcess, host: str
) -> None:
    """DNS rebinding: a page whose name points at 127.0.0.1 cannot read /metrics."""
    refused = httpx.get(f"{shared_intake.admin_url}/metrics", headers={"Host": host})
    assert refused.status_code == 400
    assert refused.json()["error"] == "host_not_allowed"
    assert httpx.get(f"{shared_intake.admin_url}/metrics").status_code == 200


@SQLITE_ONLY  # the listener's Host check
def test_public_allowed_hosts_refuse_other_names_in_orthancs_shape(
    make_intake: Callable[..., IntakeProcess],
) -> None:
    intake = make_intake(None, public_allowed_hosts="intake.example.org,*.trial.example")
    for host, status in [
        ("intake.example.org", 401),
        ("intake.example.org:443", 401),
        ("site-7.trial.example", 401),
        ("evil.example", 400),
        ("127.0.0.1", 400),
    ]:
        answer = httpx.get(f"{intake.url}/system", headers={"Host": host})
        assert answer.status_code == status, (host, answer.text)
        if status == 400:
            assert answer.json()["HttpStatus"] == 400
            assert "not served as" in answer.json()["Details"]


def test_a_stow_path_takes_every_uid_the_validator_takes(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """One rule for what a UID may hold, in a file and in a URL: a non-conformant study
    UID that an instance may carry (taken with a warning) is a valid STOW-RS path too."""
    study = f"2.25.1+{uuid.uuid4().int % 10**12}"
    data = make_instance(
        StudyInstanceUID=study, SeriesInstanceUID=generate_uid(), SOPInstanceUID=generate_uid()
    )
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    with shared_intake.client(fresh_site) as client:
        answer = client.post(
            f"/dicom-web/studies/{study}",
            content=body,
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
    assert answer.status_code == 200, answer.text
