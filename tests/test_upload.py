"""POST /instances end to end: a real intake process forwarding to a real Orthanc."""

from __future__ import annotations

import base64
import socket

from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


def test_upload_answers_like_orthanc_and_arrives(
    shared_intake: IntakeProcess, fresh_site: Site, private_orthanc: OrthancProcess
) -> None:
    """A raw upload gets Orthanc's answer shape, and the file reaches the private Orthanc."""
    intake, site = shared_intake, fresh_site
    data = make_study(n_series=1, per_series=1)[0]
    response = intake.upload(
        site, data, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["Status"] == "Success"
    assert body["Path"] == f"/instances/{body['ID']}"
    assert set(body) >= {"ID", "ParentPatient", "ParentSeries", "ParentStudy", "Path", "Status"}
    wait_until(lambda: body["ID"] in private_orthanc.instances(), timeout=30)
    assert private_orthanc.instance_file(body["ID"]) == data


def _raw_request(port: int, head: str, body: bytes | None) -> tuple[bytes, bytes]:
    """Send headers, read the interim answer, then (maybe) the body; return both answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        interim = sock.recv(65536)
        final = b""
        if body is not None and interim.startswith(b"HTTP/1.1 100"):
            sock.sendall(body)
            while b"\r\n\r\n" not in final or not final.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                final += chunk
        return interim, final


def test_expect_100_continue_is_answered_before_the_body(
    shared_intake: IntakeProcess, fresh_site: Site
) -> None:
    """An Orthanc peer with HttpHeaders waits for 100 Continue on bodies over 1 MiB."""
    intake, site = shared_intake, fresh_site
    data = make_study(n_series=1, per_series=1, rows=1024, cols=1024)[0]
    token = base64.b64encode(f"{site.name}:{site.token}".encode()).decode()
    head = (
        "POST /instances HTTP/1.1\r\nHost: intake\r\nExpect: 100-continue\r\n"
        f"Authorization: Basic {token}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    interim, final = _raw_request(intake.public_port, head, data)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert final.startswith(b"HTTP/1.1 200")
    assert b'"Status":"Success"' in final


def test_expect_100_continue_with_bad_credentials_gets_401_without_the_body(
    shared_intake: IntakeProcess,
) -> None:
    intake = shared_intake
    head = (
        "POST /instances HTTP/1.1\r\nHost: intake\r\nExpect: 100-continue\r\n"
        "Authorization: Bearer nope\r\nContent-Length: 5000000\r\n\r\n"
    )
    interim, _ = _raw_request(intake.public_port, head, None)
    assert interim.startswith(b"HTTP/1.1 401")
