"""Study-arrived webhooks against a real receiver on loopback: signing, retries, the admin API."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.uid import generate_uid

from app.settings import Settings
from tests.support.intake import Admin, IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

SECRET = "a webhook secret of some length"


@dataclass
class Delivered:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A tiny HTTP server that records every POST and fails the first ``fail_first`` of them."""

    url: str = ""
    fail_first: int = 0
    requests: list[Delivered] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, delivered: Delivered) -> int:
        with self.lock:
            self.requests.append(delivered)
            return 500 if len(self.requests) <= self.fail_first else 204

    def received(self) -> list[Delivered]:
        with self.lock:
            return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = state.answer(Delivered(dict(self.headers.items()), body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/intake"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Setup:
    intake: IntakeProcess
    site: Site
    admin: Admin

    def deliveries(self, **params: str) -> list[dict[str, Any]]:
        with self.intake.admin_client(self.admin) as client:
            response = client.get("/api/webhooks/deliveries", params=params)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()
        return rows


@pytest.fixture
def setup(
    make_intake: Callable[..., IntakeProcess],
    private_orthanc: OrthancProcess,
    receiver: Receiver,
) -> Setup:
    intake = make_intake(
        private_orthanc,
        study_quiet_seconds="1",
        webhook_urls=receiver.url,
        webhook_secret=SECRET,
        webhook_poll_seconds="0.2",
        webhook_retry_base_seconds="0.2",
        webhook_retry_max_seconds="0.5",
        webhook_max_attempts="3",
    )
    return Setup(intake, intake.add_site("hospital-a"), intake.add_admin())


def _upload_study(setup: Setup, n_series: int = 2, per_series: int = 2) -> list[bytes]:
    files = make_study(n_series=n_series, per_series=per_series)
    for data in files:
        assert setup.intake.upload(setup.site, data).status_code == 200
    return files


def test_a_quiet_forwarded_study_sends_one_signed_event(
    setup: Setup, receiver: Receiver, private_orthanc: OrthancProcess
) -> None:
    _upload_study(setup)
    [event] = wait_until(receiver.received, timeout=30)
    expected = "sha256=" + hmac.new(SECRET.encode(), event.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(event.headers["X-Intake-Signature"], expected)
    assert event.headers["X-Intake-Event"] == "study.arrived"
    assert event.headers["Content-Type"] == "application/json"
    payload = json.loads(event.body)
    assert payload["event"] == "study.arrived"
    assert payload["site"] == setup.site.name
    assert (payload["instances"], payload["series"]) == (4, 2)
    assert (payload["forwarded"], payload["quarantined"], payload["rejected"]) == (4, 0, 0)
    assert payload["first_received_at"] <= payload["last_received_at"]
    with private_orthanc.client() as orthanc:
        study = orthanc.get(f"/studies/{payload['orthanc_study_id']}").json()
    assert study["MainDicomTags"]["StudyInstanceUID"] == payload["study_instance_uid"]
    [row] = wait_until(lambda: setup.deliveries(state="delivered"), timeout=10)
    assert event.headers["X-Intake-Delivery"] == str(row["id"])
    assert (row["attempts"], row["last_status"], row["payload"]) == (1, 204, payload)
    # Several scans later, the settled study has made no second event. The scans are
    # proved by a second study: its event is queued by a scan at least STUDY_QUIET_SECONDS
    # (1 s) after its upload, scans running every 0.2 s, and each of them went over the
    # first study too. The deliveries table holds every event those scans queued.
    first = payload["study_instance_uid"]
    second = dcmread(io.BytesIO(_upload_study(setup, n_series=1, per_series=1)[0]))
    wait_until(lambda: setup.deliveries(state="delivered")[0]["id"] != row["id"], timeout=30)
    queued = [r["payload"]["study_instance_uid"] for r in reversed(setup.deliveries())]
    assert queued == [first, second.StudyInstanceUID]
    assert [json.loads(r.body)["study_instance_uid"] for r in receiver.received()] == queued


def test_a_study_that_grows_after_its_event_makes_a_new_one(
    setup: Setup, receiver: Receiver
) -> None:
    files = _upload_study(setup, n_series=1, per_series=1)
    wait_until(receiver.received, timeout=30)
    extra = dcmread(io.BytesIO(files[0]))
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = io.BytesIO()
    extra.save_as(out, enforce_file_format=True)
    assert setup.intake.upload(setup.site, out.getvalue()).status_code == 200
    wait_until(lambda: len(receiver.received()) == 2, timeout=30)
    counts = [json.loads(r.body)["instances"] for r in receiver.received()]
    assert counts == [1, 2]


def test_a_failing_receiver_is_retried_until_it_answers(setup: Setup, receiver: Receiver) -> None:
    receiver.fail_first = 2
    _upload_study(setup, n_series=1, per_series=2)
    [row] = wait_until(lambda: setup.deliveries(state="delivered"), timeout=30)
    assert (row["attempts"], row["last_status"], row["last_error"]) == (3, 204, None)
    sent = receiver.received()
    assert len(sent) == 3
    assert len({r.body for r in sent}) == 1
    assert {r.headers["X-Intake-Delivery"] for r in sent} == {str(row["id"])}


def test_a_receiver_that_keeps_failing_ends_failed_and_can_be_retried(
    setup: Setup, receiver: Receiver
) -> None:
    receiver.fail_first = 1000
    _upload_study(setup, n_series=1, per_series=1)
    [row] = wait_until(lambda: setup.deliveries(state="failed"), timeout=30)
    assert (row["attempts"], row["last_status"]) == (3, 500)
    assert "500" in row["last_error"]
    assert setup.deliveries(site=setup.site.name) == [row]
    assert setup.deliveries(site="no-such-site") == []

    receiver.fail_first = 0
    with setup.intake.admin_client(setup.admin) as client:
        retried = client.post(f"/api/webhooks/deliveries/{row['id']}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json()["state"] == "pending"
        wait_until(lambda: setup.deliveries(state="delivered"), timeout=30)
        again = client.post(f"/api/webhooks/deliveries/{row['id']}/retry")
        assert again.status_code == 409
        assert again.json()["error"] == "delivery_not_failed"
        missing = client.post("/api/webhooks/deliveries/999999/retry")
        assert missing.status_code == 404


def test_delivery_routes_need_an_admin(setup: Setup) -> None:
    response = httpx.get(f"{setup.intake.admin_url}/api/webhooks/deliveries")
    assert response.status_code == 401


def test_webhook_urls_without_a_secret_are_refused() -> None:
    with pytest.raises(ValidationError, match="WEBHOOK_SECRET"):
        Settings(webhook_urls=["https://example.org/hook"])
